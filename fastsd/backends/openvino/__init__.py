"""The OpenVINO backend (the CPU peer): the engine's backend, module runners for accelerate, int8 UNets."""

"""The ONNX Runtime backend: the engine's backend over an export, module runners for accelerate, LoRA on graphs."""

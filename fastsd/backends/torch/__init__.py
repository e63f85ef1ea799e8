"""The PyTorch backend: diffusers' modules in eager torch (or compiled) with fastsd's kernels."""

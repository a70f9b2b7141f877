"""Triton kernels for the SaS adapter op (forward and backward), their launchers and autograd Functions."""

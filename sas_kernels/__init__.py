"""Triton kernels for the SaS adapter op (forward and backward), their launchers and autograd Functions."""
from .sas_adapter import sas_adapter_triton, sas_backward, sas_forward

__all__ = ["sas_adapter_triton", "sas_forward", "sas_backward"]

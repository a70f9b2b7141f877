"""Triton kernels for the SaS adapter op (forward and backward) and their host launchers.

Nothing here imports ``sas``: the autograd glue that uses these launchers lives with the API
(``sas/_triton.py`` for the op, ``sas/linear_op.py`` for the whole adapted layer).
"""
from .sas_adapter import MAX_RANK, as_rows, sas_backward, sas_forward

__all__ = ["MAX_RANK", "as_rows", "sas_forward", "sas_backward"]

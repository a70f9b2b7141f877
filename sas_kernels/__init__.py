"""Triton kernels for the SaS adapter op (forward and backward) and their host launchers.

Nothing here imports ``sas``: the autograd glue that uses these launchers lives with the API
(``sas/backends/triton.py``). The launchers import Triton, which is optional, so they load on first use:
:mod:`sas.reference` reads the 8-bit kinds (:mod:`sas_kernels.saved_kinds`) on machines without Triton.
"""
from .saved_kinds import SAVED_KINDS, SavedKind

__all__ = ["MAX_RANK", "SAVED_KINDS", "SavedKind", "as_rows", "sas_forward", "sas_backward"]

_LAUNCHERS = ("MAX_RANK", "as_rows", "sas_forward", "sas_backward")


def __getattr__(name: str):
    if name in _LAUNCHERS:
        from . import sas_adapter
        # Bound here once, so later lookups (the launchers run on every layer call) find them directly.
        globals().update({launcher: getattr(sas_adapter, launcher) for launcher in _LAUNCHERS})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

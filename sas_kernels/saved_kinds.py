"""The 8-bit copies a layer may keep of its input x for dA (``SaSConfig.saved_input``), defined once.

The oracle (:func:`sas.reference.quantize_rows`), the Triton kernels (:mod:`sas_kernels.sas_adapter`) and the
C++ ops (``csrc/adapter_cpu.h``, checked against this table when :mod:`sas.backends.cpp` loads them) all read
these values. Plain PyTorch, no Triton: :mod:`sas.reference` imports it where Triton is not installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch


@dataclass(frozen=True)
class SavedKind:
    """One 8-bit kind: the ``saved_input`` value naming it, the code the kernels' ``SAVE_X``/``SAVED_X`` and the
    C++ ops' ``saved_input`` argument carry, the copy's dtype, and the largest magnitude it holds, which a
    row's absmax is scaled to."""

    name: str
    code: int
    dtype: torch.dtype
    limit: float


#: By name. The limits: int8's largest value, and float8 e4m3's largest finite value.
SAVED_KINDS: Dict[str, SavedKind] = {kind.name: kind for kind in (
    SavedKind("int8", 1, torch.int8, 127.0),
    SavedKind("fp8", 2, torch.float8_e4m3fn, 448.0),
)}

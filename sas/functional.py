"""The public SaS adapter op: input validation and backend dispatch.

``sas_adapter`` is what every :class:`sas.SaSLinear` calls. It validates its
arguments once, then hands them to one backend:

* ``triton``    - fused Triton kernels (``sas_kernels``); CUDA tensors, or CPU
                  tensors when ``TRITON_INTERPRET=1`` was set before import.
* ``cpp``       - the C++ CPU kernels (``sas._C``), when the extension was built.
* ``reference`` - :func:`sas.reference.sas_adapter`, plain PyTorch, always present.

``auto`` (the default) picks ``triton`` for CUDA tensors and ``cpp`` for CPU
tensors when they are usable, else ``reference``. The choice can be forced with
``SAS_BACKEND=auto|triton|cpp|reference``, :func:`set_backend`, or the
``backend=`` argument; a forced backend that cannot run raises instead of
silently falling back.
"""
from __future__ import annotations

import importlib
import math
import os
import warnings
from dataclasses import dataclass
from numbers import Real
from typing import Callable, Dict, Optional

import torch

from . import reference

BACKEND_CHOICES = ("auto", "triton", "cpp", "reference")


@dataclass(frozen=True)
class Backend:
    """A backend of the op: where its implementation lives and which devices it serves."""

    name: str
    module: str  # imported lazily, so a missing optional backend costs nothing
    attribute: str  # the op inside ``module``: same signature as the reference, minus ``upcast``
    supports: Callable[[torch.device], bool]


def _triton_supports(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _cpp_supports(device: torch.device) -> bool:
    return device.type == "cpu"


BACKENDS: Dict[str, Backend] = {
    "triton": Backend("triton", "sas._triton", "sas_adapter_triton", _triton_supports),
    "cpp": Backend("cpp", "sas._cpp", "sas_adapter_cpp", _cpp_supports),
}

_loaded: Dict[str, Optional[Callable]] = {}
_backend_override: Optional[str] = None


def _load(name: str) -> Optional[Callable]:
    """Import a backend's op once; ``None`` (with one warning) when it cannot be imported."""
    if name not in _loaded:
        backend = BACKENDS[name]
        try:
            _loaded[name] = getattr(importlib.import_module(backend.module), backend.attribute)
        except (ImportError, AttributeError, OSError) as exc:
            warnings.warn(f"sas: the {name!r} backend is unavailable ({exc}); using the reference path instead "
                          f"where it would have run", RuntimeWarning, stacklevel=3)
            _loaded[name] = None
    return _loaded[name]


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every later call (``None`` or ``"auto"`` restores automatic choice)."""
    global _backend_override
    if name is not None and name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_CHOICES}")
    _backend_override = None if name == "auto" else name


def get_backend() -> str:
    """The backend setting in force: :func:`set_backend`, else ``SAS_BACKEND``, else ``"auto"``."""
    if _backend_override is not None:
        return _backend_override
    name = os.environ.get("SAS_BACKEND", "auto")
    if name not in BACKEND_CHOICES:
        raise ValueError(f"SAS_BACKEND={name!r} is not one of {BACKEND_CHOICES}")
    return name


def backend_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device`` in this process."""
    if name == "reference":
        return True
    backend = BACKENDS[name]
    return backend.supports(torch.device(device)) and _load(name) is not None


def available_backends(device: torch.device) -> list:
    """Every backend that can run on ``device``, the reference last."""
    return [name for name in ("triton", "cpp") if backend_available(name, device)] + ["reference"]


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """The backend a call on ``device`` would run, given ``backend`` or the setting in force."""
    device = torch.device(device)
    name = backend if backend is not None else get_backend()
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_CHOICES}")
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp"
        return preferred if backend_available(preferred, device) else "reference"
    if name != "reference" and not backend_available(name, device):
        hint = " (set TRITON_INTERPRET=1 before importing to run Triton on CPU)" if name == "triton" else ""
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors in this process{hint}")
    return name


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def validate(x, base, A, B, h, scale, task_ids=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument for any bad input."""
    named = {"x": x, "base": base, "A": A, "B": B, "h": h}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: x is {_describe(x)} but {name} is {_describe(t)}")
        if t.device != x.device:
            raise ValueError(f"device mismatch: x is {_describe(x)} but {name} is {_describe(t)}")
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dim (..., d_in), got {_describe(x)}")
    if base.shape[:-1] != x.shape[:-1] or base.dim() != x.dim():
        raise ValueError(f"base must have x's leading dims: x is {_describe(x)}, base is {_describe(base)}")
    d_in, d_out = x.shape[-1], base.shape[-1]
    if A.dim() != 2 or A.shape[1] != d_in or A.shape[0] < 1:
        raise ValueError(f"A must be (rank >= 1, d_in={d_in}): A is {_describe(A)}, x is {_describe(x)}")
    rank = A.shape[0]
    if B.dim() != 2 or tuple(B.shape) != (d_out, rank):
        raise ValueError(f"B must be (d_out={d_out}, rank={rank}): B is {_describe(B)}, "
                         f"base is {_describe(base)}, A is {_describe(A)}")
    if h.dim() == 1:
        if h.shape[0] != rank:
            raise ValueError(f"h must be (rank={rank},): h is {_describe(h)}, A is {_describe(A)}")
        if task_ids is not None:
            raise ValueError(f"task_ids is only valid with a per-task h of shape (T, rank); h is {_describe(h)}")
        return
    if h.dim() != 2 or h.shape[1] != rank:
        raise ValueError(f"h must be (rank={rank},) or (tasks, rank={rank}): h is {_describe(h)}, A is {_describe(A)}")
    if task_ids is None:
        raise ValueError(f"h of shape {tuple(h.shape)} holds one modulation per task: pass task_ids")
    if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"task_ids must be an int32/int64 tensor, got {task_ids!r:.80}")
    if task_ids.device != x.device:
        raise ValueError(f"device mismatch: x is {_describe(x)} but task_ids is {_describe(task_ids)}")
    rows = math.prod(x.shape[:-1])
    leading = x.shape[0] if x.dim() >= 2 else rows
    if task_ids.dim() != 1 or task_ids.shape[0] not in (rows, leading):
        raise ValueError(f"task_ids must be 1-D with one id per row ({rows}) or per leading-batch element "
                         f"({leading}): task_ids is {_describe(task_ids)}, x is {_describe(x)}")
    if not task_ids.numel():
        return
    if task_ids.device.type == "cpu":
        if int(task_ids.min()) < 0 or int(task_ids.max()) >= h.shape[0]:
            raise ValueError(f"task_ids must lie in [0, {h.shape[0]}) for h of shape {tuple(h.shape)}; "
                             f"got values in [{int(task_ids.min())}, {int(task_ids.max())}]")
    else:
        # Reading the ids back would sync the host with the device on every call: the check runs on the
        # device instead and fails the stream (a RuntimeError at the next synchronization), so a wrong id
        # never silently picks a modulation. The kernels also give such rows NaN, not 0.
        in_range = ((task_ids >= 0) & (task_ids < h.shape[0])).all()
        torch._assert_async(in_range, f"sas: task_ids out of range [0, {h.shape[0]}) for h of shape {tuple(h.shape)}")


def sas_adapter(
    x: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    scale: float = 1.0,
    task_ids: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``base + scale * ((x @ A.T) * h) @ B.T``, validated, on the chosen backend.

    Arguments as in :func:`sas.reference.sas_adapter`. ``backend`` forces one
    backend for this call (see the module docstring). Differentiable in
    ``x``, ``base``, ``A``, ``B`` and ``h``.
    """
    validate(x, base, A, B, h, scale, task_ids)
    name = resolve_backend(x.device, backend)
    if name == "reference":
        return reference.sas_adapter(x, base, A, B, h, float(scale), task_ids)
    return _load(name)(x, base, A, B, h, float(scale), task_ids)


def _preload_backends() -> None:
    """Import every backend this machine can use now: ``torch.compile`` cannot trace an import,
    so a first call inside a compiled region must find its backend already loaded."""
    _load("cpp")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        _load("triton")


_preload_backends()

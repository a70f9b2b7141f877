"""Backends of the SaS op and layer, and :func:`route`: THE one place that decides what runs.

A **backend** is a family of implementations of the same maths, one :class:`Backend` record each:

* ``triton``    - Triton kernels (``sas_kernels``, :mod:`sas.backends.triton`); CUDA tensors, or CPU
                  tensors when ``TRITON_INTERPRET=1`` was set before import.
* ``cpp``       - the C++ CPU kernels (``sas._C``, :mod:`sas.backends.cpp`), when the extension was built.
* ``reference`` - :mod:`sas.reference`, plain PyTorch, always present: the oracle.

``auto`` (the default) picks ``triton`` for CUDA tensors and ``cpp`` for CPU tensors when they are
usable, else ``reference``. The choice can be forced with ``SAS_BACKEND=auto|triton|cpp|reference``,
:func:`set_backend`, or a call's ``backend=`` argument; a forced backend that cannot run raises instead of
silently falling back. A new backend is one module (exporting ``sas_adapter``, ``adapted_linear``,
``hypernetwork``, ``attach_gradient_sink`` and ``quantized_input_linear``) and one entry of :data:`_MODULES`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F

from .. import reference
from . import fold
from .runtime import compute_dtype, stream_of

__all__ = ["Backend", "BACKEND_CHOICES", "set_backend", "get_backend", "resolve_backend", "available_backends",
           "backend_for", "load", "replaced", "is_oracle", "uncheckable_reason", "route", "route_key", "adapted_linear", "compute_dtype", "stream_of"]

BACKEND_CHOICES = ("auto", "triton", "cpp", "reference")


@dataclass(frozen=True)
class Backend:
    """One backend: its op, its whole-layer op, its hypernetwork, and whether it sinks shared gradients."""

    name: str
    #: ``(x, base, A, B, h, scale, task_ids) -> y``, arguments validated (:func:`sas.functional.sas_adapter`).
    adapter: Callable
    #: ``(x, weight, bias, A, B, h, scale, task_ids) -> y``: frozen GEMM + adapter as one autograd node, all
    #: in one compute dtype (the kernel dtypes only), ``weight``/``bias`` frozen.
    layer: Callable
    #: ``(activation type, sources) -> h table or None``: h of every layer as one op, where this backend has
    #: one for these sources (``SaSShared`` runs its own node otherwise).
    hypernetwork: Optional[Callable]
    #: Whether it sinks shared gradients: when its layer backward adds the layers' gradients of a shared A/B
    #: into one total in place, the function that attaches a tensor to a sink
    #: (``sas.backends.triton.GradientSink.attach``), which ``SaSShared`` applies to the A/B it hands out.
    attach_gradient_sink: Optional[Callable]
    #: ``(x, weight, bias, A, B, h, scale, task_ids, kind, copy) -> (y, q, scale)``: :attr:`layer` keeping,
    #: for dA, the 8-bit copy of x of ``kind`` (``SaSConfig.saved_input``; ``copy``: the one another layer
    #: made of the same input, else its own) instead of x; ``q`` and ``scale`` are the copy the call made,
    #: ``None`` when it made none (``copy`` given, or no gradient for A).
    quantized_layer: Callable


def is_oracle(name: str) -> bool:
    """Whether backend ``name`` is the reference every other backend is checked against."""
    return name == REFERENCE.name


# Combinations a backend runs but cannot be checked in, and why (sas.testing reports them as skipped).
_UNCHECKABLE = {("triton", "cpu", torch.bfloat16): "Triton's interpreter returns wrong bf16 tl.dot results "
                                                   "(docs/design.md section 5); bf16 is checked on CUDA"}


def uncheckable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why backend ``name`` cannot be checked on ``device`` in ``dtype``, or ``None`` when it can."""
    return _UNCHECKABLE.get((name, torch.device(device).type, dtype))


def _triton_supports(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _cpp_supports(device: torch.device) -> bool:
    return device.type == "cpu"


# The optional backends, imported lazily (a missing one costs nothing): module, devices it serves.
_MODULES = {"triton": ("sas.backends.triton", _triton_supports), "cpp": ("sas.backends.cpp", _cpp_supports)}

REFERENCE = Backend("reference", reference.sas_adapter, reference.reference_linear, None, None,
                    reference.quantized_input_linear)

_loaded: Dict[str, Optional[Backend]] = {"reference": REFERENCE}
_backend_override: Optional[str] = None
# Bumped whenever a record or the override changes: part of every cached route's key (route_key).
_generation = 0


def load(name: str) -> Optional[Backend]:
    """Backend ``name``'s record, its module imported once; ``None`` (with one warning) when it cannot be imported."""
    if name not in _loaded:
        module_name, _ = _MODULES[name]
        try:
            module = importlib.import_module(module_name)
            _loaded[name] = Backend(name, module.sas_adapter, module.adapted_linear,
                                    module.hypernetwork, module.attach_gradient_sink, module.quantized_input_linear)
        except (ImportError, AttributeError, OSError) as exc:
            warnings.warn(f"sas: the {name!r} backend is unavailable ({exc}); using the reference path instead "
                          f"where it would have run", RuntimeWarning, stacklevel=3)
            _loaded[name] = None
    return _loaded[name]


@contextlib.contextmanager
def replaced(name: str, record: Optional[Backend]) -> Iterator[None]:
    """Backend ``name`` is ``record`` inside the block (``None``: unavailable), for tests and
    :mod:`sas.testing`; layers pick their route again on entry and on exit."""
    global _generation
    missing = object()
    previous = _loaded.get(name, missing)
    _loaded[name] = record
    _generation += 1
    try:
        yield
    finally:
        if previous is missing:
            _loaded.pop(name, None)
        else:
            _loaded[name] = previous
        _generation += 1


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every later call (``None`` or ``"auto"`` restores automatic choice)."""
    global _backend_override
    if name is not None and name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_CHOICES}")
    # No generation bump: route_key holds the setting itself, so setting the same backend again (a loop
    # of forced_backend blocks) keeps every layer's cached route instead of validating each call again.
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
    return _MODULES[name][1](torch.device(device)) and load(name) is not None


def available_backends(device: torch.device) -> list:
    """Every backend that can run on ``device``, the reference last."""
    return [name for name in _MODULES if backend_available(name, device)] + ["reference"]


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


def backend_for(device: torch.device, backend: Optional[str] = None) -> Backend:
    """The record of the backend a call on ``device`` runs (:func:`resolve_backend`)."""
    return _loaded[resolve_backend(device, backend)]


def route_key() -> tuple:
    """What a cached route depends on beyond the call's own tensors: the records and the setting in force."""
    return _generation, get_backend()


# ---------------------------------------------------------------------------------------------- routes
# Each route is ``(x, weight, bias, A, B, h, scale, task_ids) -> y`` with A, B, h in the compute dtype.

def _op_level(adapter, x, weight, bias, A, B, h, scale, task_ids):
    """``F.linear`` then the backend's op under ordinary autograd, which covers a trainable base weight and
    is what torch.compile traces (the op's ``torch.library`` registrations); the layer validated already."""
    return adapter(x.to(A.dtype), F.linear(x, weight, bias), A, B, h, float(scale), task_ids)


def _fold(adapter, x, weight, bias, A, B, h, scale, task_ids):
    """An ATen whole-layer design for one h (``task_ids`` is None here), ``adapter`` for the unfused cases."""
    return fold.adapted_linear(x, weight, bias, A, B, h, scale, "auto", adapter)


def _autocast_cast(layer, x, weight, bias, A, B, h, scale, task_ids):
    """Under autocast: cast once here with autocast off, so the kernels see one dtype."""
    dtype = A.dtype
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), A, B, h,
                     float(scale), task_ids)


def _keeping_copy(layer, kind, copies, x, weight, bias, A, B, h, scale, task_ids):
    """A quantized layer (:attr:`Backend.quantized_layer`) run with the 8-bit copy of ``x`` that ``copies``
    (``SaSShared.saved_inputs``) holds when another layer already made one of this very input (q, k and v
    of one block), else one it makes and hands to ``copies``. Under autocast the inputs are cast here,
    once, with autocast off; the copy is keyed on the caller's ``x``, before that cast."""
    keeps = torch.is_grad_enabled() and A.requires_grad  # only dA reads x
    copy = copies.get(x, kind, A.dtype) if keeps and copies is not None else None
    if torch.is_autocast_enabled(x.device.type):
        dtype = A.dtype
        with torch.autocast(x.device.type, enabled=False):
            y, q, qscale = layer(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), A, B, h,
                                 float(scale), task_ids, kind, copy)
    else:
        y, q, qscale = layer(x, weight, bias, A, B, h, scale, task_ids, kind, copy)
    if q is not None and copies is not None:
        copies.put(x, kind, A.dtype, q, qscale)
    return y


def route(backend: Backend, layer_op: str, dtype: torch.dtype, trainable_base: bool, compiling: bool,
          autocast: bool, per_element_tasks: bool, saved_input: str = "full", copies=None) -> Callable:
    """What runs for one adapted layer's call, THE one table (``docs/design.md`` section 2):

    ==============================================  ===========================================================
    situation (first match)                         route
    ==============================================  ===========================================================
    ``saved_input`` "int8"/"fp8", not compiling     :func:`_keeping_copy` of the quantized layer: the fold
    and the base frozen                             design's (``layer_op="fold"``, one h), the reference's
                                                    (``reference`` backend, float64) or the backend's own;
                                                    ``copies`` shares one copy among layers fed one input
    ``layer_op="fold"``, one h (no per-element      :func:`sas.backends.fold.adapted_linear`: an ATen
    tasks)                                          whole-layer design (also while compiling)
    ``reference`` backend, or float64               :func:`sas.reference.reference_linear` (plain autograd;
                                                    float64 is exact there, the kernels compute 32/16 bits);
                                                    under autocast its inputs cast once, autocast off
    torch.compile is tracing, or the base weight    ``F.linear`` + the backend's op: the compiler traces its
    or bias requires a gradient                     ``torch.library`` ops; autograd gives the base's gradient
    autocast on                                     the backend's layer op, inputs cast once, autocast off
    otherwise                                       the backend's layer op itself (one autograd node)
    ==============================================  ===========================================================

    (A merged layer runs its frozen ``nn.Linear`` alone, before any route: ``SaSLinear.forward``.) An
    unfrozen base weight keeps x for its own gradient anyway, so there an 8-bit copy would add memory, not
    save it; a traced layer keeps x too (the quantized layers are not ``torch.library`` ops yet).
    """
    if saved_input != "full" and not (compiling or trainable_base):
        if layer_op == "fold" and not per_element_tasks:
            layer = fold.quantized_input_linear
        elif backend is REFERENCE or dtype not in reference.KERNEL_DTYPES:
            layer = reference.quantized_input_linear
        else:
            layer = backend.quantized_layer
        return functools.partial(_keeping_copy, layer, saved_input, copies)
    if layer_op == "fold" and not per_element_tasks:
        return functools.partial(_fold, backend.adapter)
    if backend is REFERENCE or dtype not in reference.KERNEL_DTYPES:
        # Under autocast cast once as the kernels' layers do (and _keeping_copy for the 8-bit modes, so that
        # those differ from this route in dA alone).
        return functools.partial(_autocast_cast, reference.reference_linear) if autocast else reference.reference_linear
    if compiling or trainable_base:
        return functools.partial(_op_level, backend.adapter)
    if autocast:
        return functools.partial(_autocast_cast, backend.layer)
    return backend.layer


def adapted_linear(x, weight, bias, A, B, h, scale, task_ids=None, backend: Optional[str] = None,
                   layer_op: str = "kernels"):
    """One adapted layer's call through :func:`route`, unvalidated: ``A``, ``B`` and ``h`` already in
    :func:`compute_dtype` (what ``SaSLinear`` does, minus its once-per-signature validation and route cache)."""
    record = backend_for(x.device, backend)
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    run = route(record, layer_op, A.dtype, trainable, torch.compiler.is_compiling(),
                torch.is_autocast_enabled(x.device.type), task_ids is not None)
    return run(x, weight, bias, A, B, h, scale, task_ids)


def _preload() -> None:
    """Import every backend this machine can use now: ``torch.compile`` cannot trace an import,
    so a first call inside a compiled region must find its backend already loaded."""
    load("cpp")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        load("triton")


_preload()

"""Backends of the SaS op and layer, and :func:`route`: THE one place that decides what runs.

A **backend** is a family of implementations of the same maths, one :class:`Backend` record each:

* ``triton``    - Triton kernels (``sas_kernels``, :mod:`sas.backends.triton`); CUDA tensors, or CPU
                  tensors when ``TRITON_INTERPRET=1`` was set before import.
* ``cpp``       - the C++ CPU kernels (``sas._C``, :mod:`sas.backends.cpp`), when the extension was built.
* ``reference`` - :mod:`sas.reference`, plain PyTorch, always present: the oracle.

Each backend answers one capability question, :attr:`Backend.supports`: can it run a call on this device,
in this dtype, of this rank, with these tasks and this ``saved_input``? ``auto`` (the default) asks the
backends of :data:`AUTO_ORDER` for the device in turn and runs the first that can, else the reference;
such a fallback is told once per backend and reason, as a ``RuntimeWarning`` (see :func:`backend_for`).
The choice can be forced with ``SAS_BACKEND=auto|triton|cpp|reference``, :func:`set_backend`, or a call's
``backend=`` argument; a forced backend that cannot run raises with its reason instead of falling back, except
that a dtype no kernel computes (float64) runs the reference, which is exact there, whatever is forced.
A new backend is one module exporting the fields of :class:`Backend` by their names and one entry of
:data:`_MODULES`.
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

__all__ = ["Backend", "BACKEND_CHOICES", "AUTO_ORDER", "set_backend", "get_backend", "resolve_backend",
           "available_backends", "backend_for", "load", "replaced", "is_oracle", "uncheckable_reason", "route",
           "route_key", "adapted_linear", "compute_dtype", "stream_of"]

BACKEND_CHOICES = ("auto", "triton", "cpp", "reference")

#: The backends ``auto`` asks, in order, for tensors of a device type (the reference runs when none can).
AUTO_ORDER = {"cuda": ("triton",), "cpu": ("cpp",)}


@dataclass(frozen=True)
class Backend:
    """The backend contract: every field but ``name`` is exported under that very name by the backend's
    module (:func:`load` reads them by name), so the record and the modules speak one vocabulary."""

    name: str
    #: ``(device, dtype=None, rank=None, tasks=None, saved_input=None) -> None or why not``: whether this
    #: backend runs a call on tensors of ``device``, in compute ``dtype``, of ``rank``, with ``tasks`` task
    #: rows of h (1: one h), keeping ``saved_input`` of x; an argument left ``None`` is not asked about.
    supports: Callable[..., Optional[str]]
    #: ``(x, base, A, B, h, scale, task_ids) -> y``, arguments validated (:func:`sas.functional.sas_adapter`).
    sas_adapter: Callable
    #: ``(x, weight, bias, A, B, h, scale, task_ids) -> y``: frozen GEMM + adapter as one autograd node, all
    #: in one compute dtype, ``weight``/``bias`` frozen.
    adapted_linear: Callable
    #: ``(x, weight, bias, A, B, h, scale, task_ids, kind, copy) -> (y, q, scale)``: :attr:`adapted_linear`
    #: keeping, for dA, the 8-bit copy of x of ``kind`` (``SaSConfig.saved_input``; ``copy``: the one another
    #: layer made of the same input, else its own) instead of x; ``q`` and ``scale`` are the copy the call
    #: made, ``None`` when it made none (``copy`` given, or no gradient for A).
    quantized_input_linear: Callable
    #: ``(activation type, sources) -> h table or None``: h of every layer as one op, where this backend has
    #: one for these sources (``SaSShared`` runs its own node otherwise).
    hypernetwork: Optional[Callable]
    #: Whether it sinks shared gradients: when its layer backward adds the layers' gradients of a shared A/B
    #: into one total in place, the function that attaches a tensor to a sink
    #: (``sas.backends.triton.GradientSink.attach``), which ``SaSShared`` applies to the A/B it hands out.
    attach_gradient_sink: Optional[Callable]

    @classmethod
    def of_module(cls, name: str, module) -> "Backend":
        """The record of backend module ``module`` (``AttributeError`` when it lacks a field)."""
        return cls(name, **{f.name: getattr(module, f.name) for f in dataclasses.fields(cls) if f.name != "name"})


def is_oracle(name: str) -> bool:
    """Whether backend ``name`` is the reference every other backend is checked against."""
    return name == REFERENCE.name


# Combinations a backend runs but cannot be checked in, and why (sas.testing reports them as skipped).
_UNCHECKABLE = {("triton", "cpu", torch.bfloat16): "Triton's interpreter returns wrong bf16 tl.dot results "
                                                   "(docs/design.md section 5); bf16 is checked on CUDA"}


def uncheckable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why backend ``name`` cannot be checked on ``device`` in ``dtype``, or ``None`` when it can."""
    return _UNCHECKABLE.get((name, torch.device(device).type, dtype))


def _reference_supports(device, dtype=None, rank=None, tasks=None, saved_input=None) -> Optional[str]:
    return None  # plain PyTorch: every device, dtype, rank, task count and saved_input


# The optional backends, imported lazily (a missing one costs nothing).
_MODULES = {"triton": "sas.backends.triton", "cpp": "sas.backends.cpp"}

REFERENCE = Backend("reference", _reference_supports, reference.sas_adapter, reference.reference_linear,
                    reference.quantized_input_linear, None, None)

_loaded: Dict[str, Optional[Backend]] = {"reference": REFERENCE}
_backend_override: Optional[str] = None
# Bumped whenever a record or the override changes: part of every cached route's key (route_key).
_generation = 0
# The (backend, reason) pairs an automatic fallback was already told for: each is told once per process.
_told = set()


def load(name: str) -> Optional[Backend]:
    """Backend ``name``'s record, its module imported once; ``None`` (with one warning) when it cannot be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = Backend.of_module(name, importlib.import_module(_MODULES[name]))
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


def _device_refusal(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on tensors of ``device`` in this process, or ``None``."""
    record = load(name)
    if record is None:
        return "it could not be imported"
    return record.supports(device)


def needs_triton_interpreter(names, device: torch.device) -> bool:
    """Whether running the backends ``names`` on ``device`` needs Triton's interpreter, not yet chosen in this
    process (``TRITON_INTERPRET=1`` must be set before the kernels are imported)."""
    return (torch.device(device).type == "cpu" and "triton" in names
            and os.environ.get("TRITON_INTERPRET") != "1")


def backend_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device`` in this process."""
    return _device_refusal(name, torch.device(device)) is None


def available_backends(device: torch.device) -> list:
    """Every backend that can run on ``device``, the reference last."""
    return [name for name in _MODULES if backend_available(name, device)] + ["reference"]


def backend_for(device: torch.device, backend: Optional[str] = None, *, dtype: Optional[torch.dtype] = None,
                rank: Optional[int] = None, tasks: Optional[int] = None,
                saved_input: Optional[str] = None) -> Backend:
    """The record of the backend a call on ``device`` runs, given ``backend`` or the setting in force and,
    where given, the call's compute ``dtype``, ``rank``, task rows and ``saved_input`` (:attr:`Backend.supports`).

    ``auto`` runs the first backend of :data:`AUTO_ORDER` that supports the call, else the reference; when
    a backend that runs on the device cannot run the call, that is told once per backend and reason as a
    ``RuntimeWarning``: a warning because the call silently loses its kernels otherwise (a slower, larger
    path the user should learn of), once because routes are picked per layer and input signature, and the
    same reason for every layer of a model is one finding, not one per layer. A forced backend that cannot
    run on the device raises ``RuntimeError``; one that cannot run the call raises ``ValueError`` naming the
    reason, except for a dtype no kernel computes (float64), which runs the reference: it is exact there.
    """
    device = torch.device(device)
    name = backend if backend is not None else get_backend()
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_CHOICES}")
    if name == "reference":
        return REFERENCE
    forced = name != "auto"
    for candidate in (name,) if forced else AUTO_ORDER.get(device.type, ()):
        refusal = _device_refusal(candidate, device)
        if refusal is not None:
            if forced:
                raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors in this process "
                                   f"({refusal})")
            continue
        record = _loaded[candidate]
        refusal = record.supports(device, dtype, rank, tasks, saved_input)
        if refusal is None:
            return record
        if forced and (dtype is None or dtype in reference.KERNEL_DTYPES):
            raise ValueError(f"backend {name!r} cannot run this call: {refusal}")
        if (candidate, refusal) not in _told:
            _told.add((candidate, refusal))
            warnings.warn(f"sas: backend {candidate!r} cannot run this call ({refusal}); the reference runs it "
                          f"instead", RuntimeWarning, stacklevel=3)
    return REFERENCE


def resolve_backend(device: torch.device, backend: Optional[str] = None, **call) -> str:
    """The name of the backend a call on ``device`` would run (:func:`backend_for`, ``call`` its keywords)."""
    return backend_for(device, backend, **call).name


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
    """A quantized layer (:attr:`Backend.quantized_input_linear`) run with the 8-bit copy of ``x`` that ``copies``
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


def route(backend: Backend, layer_op: str, trainable_base: bool, compiling: bool, autocast: bool,
          per_element_tasks: bool, saved_input: str = "full", copies=None) -> Callable:
    """What runs for one adapted layer's call, THE one table (``docs/design.md`` section 2):

    ==============================================  ===========================================================
    situation (first match)                         route
    ==============================================  ===========================================================
    ``saved_input`` "int8"/"fp8", not compiling     :func:`_keeping_copy` of the quantized layer: the fold
    and the base frozen                             design's (``layer_op="fold"``, one h), else the backend's
                                                    own (the reference's where it was chosen);
                                                    ``copies`` shares one copy among layers fed one input
    ``layer_op="fold"``, one h (no per-element      :func:`sas.backends.fold.adapted_linear`: an ATen
    tasks)                                          whole-layer design (also while compiling)
    the ``reference`` backend                       :func:`sas.reference.reference_linear` (plain autograd);
                                                    under autocast its inputs cast once, autocast off
    the base weight or bias requires a gradient,    ``F.linear`` + the backend's op: the compiler traces its
    or torch.compile is tracing a backend whose     ``torch.library`` ops; autograd gives the base's gradient
    layer is no ``torch.library`` op (Triton)
    autocast on                                     the backend's layer op, inputs cast once, autocast off
    otherwise                                       the backend's layer op itself (one autograd node; under
                                                    torch.compile one op of the graph each way, see below)
    ==============================================  ===========================================================

    ``backend`` is the record :func:`backend_for` chose for the call, so it supports the call's device,
    dtype (float64 gets the reference, exact there), rank, tasks and ``saved_input``. (A merged layer runs its
    frozen ``nn.Linear`` alone, before any route: ``SaSLinear.forward``.) An
    unfrozen base weight keeps x for its own gradient anyway, so there an 8-bit copy would add memory, not
    save it; a traced layer keeps x too (the quantized layers are not ``torch.library`` ops yet).

    A backend whose layer is a ``torch.library`` op with a fake implementation and its own autograd (C++:
    ``sas::cpu_adapted_linear``) is traced as that op: AOTAutograd records its forward and backward ops
    (``cpu_adapted_linear_forward`` and ``cpu_adapter_backward``, which adds ``g @ W0`` into its own dx in
    place), which Inductor neither splits nor breaks the graph on. Through ``F.linear`` + the adapter op instead, the
    adapter's y was a second pass over the frozen output and dx a sum of two (rows, d_in) tensors: MiniLM's
    compiled step went from 1.34x to 1.15x the frozen floor in one run
    (bench/results/cpu-amd-epyc_2026-12-07_step_profile.md), and from 1.15x to 1.10x when the dx GEMM moved
    into the backward op (as a graph op, Inductor ran it out of place, copying dx first).
    """
    if saved_input != "full" and not (compiling or trainable_base):
        if layer_op == "fold" and not per_element_tasks:
            layer = fold.quantized_input_linear
        else:
            layer = backend.quantized_input_linear
        return functools.partial(_keeping_copy, layer, saved_input, copies)
    if layer_op == "fold" and not per_element_tasks:
        return functools.partial(_fold, backend.sas_adapter)
    if backend is REFERENCE:
        # Under autocast cast once as the kernels' layers do (and _keeping_copy for the 8-bit modes, so that
        # those differ from this route in dA alone).
        return functools.partial(_autocast_cast, reference.reference_linear) if autocast else reference.reference_linear
    if trainable_base or (compiling and not isinstance(backend.adapted_linear, torch._ops.OpOverloadPacket)):
        return functools.partial(_op_level, backend.sas_adapter)
    if autocast:
        return functools.partial(_autocast_cast, backend.adapted_linear)
    return backend.adapted_linear


def adapted_linear(x, weight, bias, A, B, h, scale, task_ids=None, backend: Optional[str] = None,
                   layer_op: str = "kernels"):
    """One adapted layer's call through :func:`route`, unvalidated: ``A``, ``B`` and ``h`` already in
    :func:`compute_dtype` (what ``SaSLinear`` does, minus its once-per-signature validation and route cache)."""
    record = backend_for(x.device, backend, dtype=A.dtype, rank=A.shape[0], tasks=h.shape[0] if h.dim() == 2 else 1,
                         saved_input="full")
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    run = route(record, layer_op, trainable, torch.compiler.is_compiling(),
                torch.is_autocast_enabled(x.device.type), task_ids is not None)
    return run(x, weight, bias, A, B, h, scale, task_ids)


def _preload() -> None:
    """Import every backend this machine can use now: ``torch.compile`` cannot trace an import,
    so a first call inside a compiled region must find its backend already loaded."""
    load("cpp")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        load("triton")


_preload()

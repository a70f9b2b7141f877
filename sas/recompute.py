"""``SaSConfig(saved_input="recompute")``: an adapted layer keeps no copy of its input ``x`` where ``x`` can be
rebuilt bit for bit from what its producer's own backward keeps anyway (docs/memory.md, "Exact recomputation").
It is the default saved_input (``sas.config.DEFAULT_SAVED_INPUT``; docs/memory.md, "Which default").

One mechanism, nothing model-family specific:

1. ``sas.inject`` registers a forward hook (:func:`watch_producers`) on every *recognised producer* of the model
   (:func:`producer_kind`). When such a module runs with gradients on and its backward keeps its input, the hook
   notes on its output tensor a :class:`Rebuild`: the module, its input, its own parameters as the forward saw
   them (FSDP2 swaps them; ``torch.func.functional_call`` passes others), their version counters and the
   autocast state. The note lives on the output tensor, so it goes when the output goes.
2. An adapted layer whose ``x`` carries a note (:func:`saved_form`) casts ``x`` to its compute dtype itself and
   runs its usual route (any backend: reference, C++, Triton) under ``saved_tensors_hooks`` (:func:`run_rebuilding`)
   whose pack hook replaces every saved tensor on the storage of that cast ``x`` by a small handle, and whose
   unpack hook runs the producer's ``forward`` again on the kept input with the noted parameters, under the
   noted autocast state, casts it as the forward did and returns the same view of it. The kernels are untouched.

Recognised producers (:func:`producer_kind`), and why their backward keeps their input:

* ``nn.LayerNorm`` and its subclasses (timm's ``LayerNorm``): ``native_layer_norm`` saves its input, when it runs
  in its input's dtype (under autocast a float32 residual stream is normalised in float32; an input cast on the
  way, as timm's ``fast_norm`` casts it to the autocast dtype, is not the tensor saved, and is refused).
* RMSNorm as Hugging Face writes it (:data:`FLOAT32_RMSNORMS`: ``LlamaRMSNorm``, ``MistralRMSNorm``,
  ``Qwen2RMSNorm``, ``T5LayerNorm``, matched by class name): they cast their input to float32 first and square
  it (``pow`` saves the float32 tensor), so a float32 input is itself what they keep.
* Elementwise activations that save their input: ``nn.GELU``, ``nn.SiLU`` (not in place; subclasses too), and the
  ``transformers.activations`` classes of :data:`TRANSFORMERS_ACTIVATIONS`, when the output has the input's
  dtype. (Not ``ReLU``, whose backward keeps its output, nor ``LinearActivation``, which returns its input.)

A producer is used only when its input requires a gradient (otherwise its backward keeps nothing: block 0's
first norm, fed the frozen embedding, is such a case) and its output is a new tensor. An adapted layer with
no usable note keeps what the full mode keeps; :func:`memory_plan` says which and why. Layers fed the same
output (q, k and v) share one rebuild: its result is held until the last of them has unpacked it.

Also here, for every mode but "full": an ``x`` whose storage is the result of an autograd node that saves its
own result (:data:`RESULT_SAVING_NODES`: the fused attention ops; ViT's ``attn.proj`` is fed a view of it) is
kept anyway, so the layer keeps ``x`` itself (no bytes of its own) instead of an 8-bit copy or a rebuild.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._merge_state import MergeableLinear

#: Hugging Face RMSNorms that cast their input to float32 and keep that float32 tensor (see the module doc).
FLOAT32_RMSNORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "T5LayerNorm"})
#: ``transformers.activations`` classes whose backward keeps their input (each multiplies by it, or calls
#: an ATen activation that saves it); tests/api/test_recompute.py checks each against the installed transformers.
TRANSFORMERS_ACTIVATIONS = frozenset({
    "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "ClippedGELUActivation",
    "AccurateGELUActivation", "MishActivation", "PytorchGELUTanh", "GELUTanh", "SiLUActivation"})
#: Autograd nodes that keep their own result for their backward: the fused attention ops.
RESULT_SAVING_NODES = frozenset({
    "ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductFlashAttentionBackward0",
    "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0"})

# The attribute a producer's output carries: its Rebuild, or why it cannot be rebuilt (a str).
_NOTE = "_sas_rebuild"


def producer_kind(module: nn.Module) -> Optional[str]:
    """``"norm"`` (keeps an input of its own dtype), ``"float32-norm"`` (keeps a float32 input) or
    ``"activation"`` for a recognised producer, else ``None``."""
    cls = type(module)
    if isinstance(module, nn.LayerNorm):  # and subclasses that only change how forward calls it (timm's)
        return "norm"
    if cls.__name__ in FLOAT32_RMSNORMS:
        return "float32-norm"
    if isinstance(module, nn.GELU) or (isinstance(module, nn.SiLU) and not module.inplace):
        return "activation"
    if cls.__module__ == "transformers.activations" and cls.__name__ in TRANSFORMERS_ACTIVATIONS:
        return "activation"
    return None


def watch_producers(model: nn.Module) -> int:
    """Register :func:`_note_output` on every recognised producer of ``model`` (once); returns how many."""
    count = 0
    for module in model.modules():
        if producer_kind(module) is not None:
            if _note_output not in module._forward_hooks.values():
                # First, so it sees forward()'s own output: a later hook that replaces the output makes the
                # adapted layer see another tensor, which carries no note.
                module.register_forward_hook(_note_output, prepend=True)
            count += 1
    return count


def unwatch_producers(model: nn.Module) -> None:
    """Remove what :func:`watch_producers` registered."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if hook is _note_output]:
            del module._forward_hooks[key]


def _note_output(module: nn.Module, args: tuple, output) -> None:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not isinstance(output, torch.Tensor):
        return
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or output.is_inference():
        return
    source = args[0]
    kind = producer_kind(module)
    if not source.requires_grad:
        reason = "its producer's input needs no gradient, so its backward keeps nothing to rebuild from"
    elif (source.dtype != torch.float32) if kind == "float32-norm" else (source.dtype != output.dtype):
        reason = (f"its producer keeps a cast of its {str(source.dtype).replace('torch.', '')} input, not the "
                  f"input itself")
    elif output.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        reason = "its producer wrote its output over its input"
    else:
        setattr(output, _NOTE, Rebuild(module, source, output))
        return
    setattr(output, _NOTE, reason)


class Rebuild:
    """One noted producer output: what runs its producer again, bit for bit, and the rebuilt tensors
    (one per compute dtype) held while a layer that packed a handle has not unpacked it yet."""

    __slots__ = ("module", "source", "parameters", "versions", "autocast", "output", "output_version",
                 "rebuilt", "pending")

    def __init__(self, module: nn.Module, source: torch.Tensor, output: torch.Tensor):
        self.module = module
        self.source = source  # the same storage its node saved: holding it costs nothing
        self.parameters = dict(module._parameters)  # as the forward saw them (FSDP2, functional_call swap them)
        self.versions = [source._version] + [p._version for p in self.parameters.values() if p is not None]
        device_type = source.device.type
        self.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        self.output = weakref.ref(output)  # not the tensor: the note lives on it
        self.output_version = output._version
        self.rebuilt: Dict[torch.dtype, torch.Tensor] = {}
        self.pending = 0

    def valid_for(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is still the very output this notes (not written in place since)."""
        return self.output() is x and x._version == self.output_version

    def check_versions(self) -> None:
        tensors = [self.source] + [p for p in self.parameters.values() if p is not None]
        output = self.output()
        for tensor, version in zip(tensors + [output], self.versions + [self.output_version]):
            if tensor is not None and tensor._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: the input, a parameter or the output of {type(self.module).__name__} that an "
                    f"adapted layer (SaSConfig.saved_input='recompute') rebuilds its input from is at version "
                    f"{tensor._version}; expected version {version} instead.")

    def tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """The producer's output again, cast to ``dtype`` as the forward cast it (shared while pending)."""
        self.check_versions()
        found = self.rebuilt.get(dtype)
        if found is None:
            device_type, enabled, autocast_dtype = self.autocast
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=enabled):
                output = _forward_with(self.module, self.parameters, self.source)
            found = output.to(dtype)
            self.rebuilt[dtype] = found
        self.pending -= 1
        if self.pending <= 0:  # every layer that packed a handle has its copy: hold it no longer
            self.rebuilt.clear()
        return found


def _forward_with(module: nn.Module, parameters: Dict[str, Optional[torch.Tensor]], source: torch.Tensor):
    """``module.forward(source)`` with ``parameters`` in place of its own (restored after), no hooks run."""
    current = dict(module._parameters)
    try:
        module._parameters.update(parameters)
        return module.forward(source)
    finally:
        module._parameters.update(current)


class _Handle:
    """What a layer's saved tensor on the storage of its cast input becomes: its rebuild and its geometry."""

    __slots__ = ("rebuild", "dtype", "geometry")

    def __init__(self, rebuild: Rebuild, dtype: torch.dtype, geometry: Optional[tuple]):
        self.rebuild, self.dtype, self.geometry = rebuild, dtype, geometry

    def unpack(self) -> torch.Tensor:
        x = self.rebuild.tensor(self.dtype)
        return x if self.geometry is None else x.as_strided(*self.geometry)


def kept_by_autograd(x: torch.Tensor) -> Optional[str]:
    """The name of the autograd node that keeps ``x``'s storage anyway (its own result), else ``None``."""
    base = x._base if x._base is not None else x
    node = base.grad_fn
    name = None if node is None else type(node).__name__
    return name if name in RESULT_SAVING_NODES else None


# ---------------------------------------------------------------------------- what one call keeps

@dataclass
class _Decision:
    layer: nn.Module
    form: str  # "full", "int8", "fp8", "recompute", "kept", "none"
    source: str  # what the form rests on: a producer, a node, a reason
    x: torch.Tensor
    dtype: torch.dtype


_planning: Optional[List[_Decision]] = None  # set by memory_plan while its forward runs


def saved_form(layer, x: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> Tuple[str, Optional[Rebuild]]:
    """What this call of ``layer`` (saved_input not "full") keeps of ``x`` for dA: ``(the saved_input its route
    runs, the Rebuild to run it under or None)``. Traced calls keep what the route keeps (``torch.compile``
    partitions saved tensors itself, and saved-tensor hooks are not traced)."""
    mode = layer.saved_input
    if torch.compiler.is_compiling():
        return ("full" if mode == "recompute" else mode), None
    routed, rebuild, form, source = mode, None, mode, ""
    if not (torch.is_grad_enabled() and A.requires_grad):
        routed, form, source = ("full" if mode == "recompute" else mode), "none", "A takes no gradient here"
    elif x.numel() and kept_by_autograd(x) is not None:
        routed, form, source = "full", "kept", kept_by_autograd(x)
    elif mode == "recompute":
        note = getattr(x, _NOTE, None)
        routed = "full"  # a rebuilt x is the full mode's x
        if isinstance(note, Rebuild) and note.valid_for(x) and x.numel():
            rebuild, source = note, type(note.module).__name__
        else:
            form = "full"
            source = note if isinstance(note, str) else (
                "its input was written in place after its producer ran" if isinstance(note, Rebuild)
                else "its input is not the output of a recognised producer")
    if _planning is not None:
        _planning.append(_Decision(layer, form, source, x, dtype))
    return routed, rebuild


def run_rebuilding(run, rebuild: Rebuild, x: torch.Tensor, dtype: torch.dtype, *args):
    """``run(x, *args)`` (a route) keeping, of ``x`` cast to ``dtype``, only a handle to ``rebuild``.

    The cast is made here, with autocast off as the routes make it, so the route's own cast returns it and
    every saved tensor on its storage is known by that storage. Saved-tensor hooks already active outside
    (the bench's counting, checkpointing, CPU offloading) still see every other saved tensor; the handle
    keeps the producer's input only where they keep what they are given (an observer); where they replace
    it (checkpointing keeps nothing, offloading moves it), ``x`` is handed to them as in the full mode."""
    with torch.autocast(x.device.type, enabled=False):
        cast = x.to(dtype)
    # The hooks read plain numbers, never ``cast`` itself: autograd keeps both hooks alive with every tensor
    # saved under them (A, B, h, u too), so a closure over ``cast`` kept every layer's x until the backward
    # (the counted ViT-B/16 step peak was 1.417x the frozen model's, above the full mode's 1.394x).
    storage = cast.untyped_storage().data_ptr()
    version, shape, stride, offset = cast._version, cast.shape, cast.stride(), cast.storage_offset()
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    observed: List[bool] = []  # whether the outer hooks keep the producer's input as given (asked once)

    def pack(t):
        if t.untyped_storage().data_ptr() == storage and t.dtype == dtype and t._version == version:
            if outer_pack is not None:
                if not observed:
                    observed.append(outer_pack(rebuild.source) is rebuild.source)
                if not observed[0]:
                    return outer_pack(t)
            rebuild.pending += 1
            same = t.shape == shape and t.stride() == stride and t.storage_offset() == offset
            return _Handle(rebuild, dtype, None if same else (t.shape, t.stride(), t.storage_offset() - offset))
        return t if outer_pack is None else outer_pack(t)

    def unpack(packed):
        if isinstance(packed, _Handle):
            return packed.unpack()
        return packed if outer_unpack is None else outer_unpack(packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return run(cast, *args)


# ---------------------------------------------------------------------------- the per-layer report

@dataclass(frozen=True)
class LayerMemory:
    """What one adapted layer keeps for its backward in one forward (:func:`memory_plan`).

    ``keeps``: ``"x"`` (its input in the compute dtype), ``"x, shared"`` (the same storage another layer
    already keeps), ``"int8 copy"``/``"fp8 copy"`` (shared likewise), ``"rebuilt"`` (nothing of x: rebuilt
    from ``source``), ``"kept anyway"`` (``source`` keeps it), ``"nothing"`` (no gradient of A here).
    ``bytes_per_row``: the bytes it adds per row of x (leading dims flattened), ``u`` included (float32,
    ``rank`` per row, when any adapter tensor takes a gradient)."""

    name: str
    keeps: str
    source: str
    rows: int
    in_features: int
    bytes_per_row: int

    @property
    def bytes(self) -> int:
        return self.rows * self.bytes_per_row


def _is_sas_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a ``SaSLinear``, told by what it has: ``sas.layer`` imports this module, so
    importing it back would make a cycle. Of the mergeable layers only SaS's has a ``saved_input``."""
    return isinstance(module, MergeableLinear) and hasattr(module, "saved_input")


def memory_plan(model: nn.Module, example_inputs: Sequence) -> List[LayerMemory]:
    """Say, for every adapted layer call of one forward, what it keeps for the backward and how many bytes.

    Runs ``model(*example_inputs)`` once with gradients on (nothing is backpropagated). The bytes are the
    layer's own model (docs/memory.md): ``x`` in its compute dtype, or the 8-bit copy plus a float32 scale per
    row, unless a layer before it in this forward kept the same storage; nothing of ``x`` when rebuilt or kept
    anyway; plus ``u``. tests/api/test_recompute.py checks them against counted bytes.

    Args:
        model: an adapted model.
        example_inputs: the positional arguments of one forward.

    Returns:
        One :class:`LayerMemory` per adapted layer call, in call order.

    Raises:
        Exception: whatever ``model(*example_inputs)`` raises.

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"]))
        >>> [(m.name, m.keeps, m.bytes_per_row) for m in sas.memory_plan(model, (torch.randn(3, 8),))]
        [('0', 'x', 40)]
    """
    global _planning
    from .backends import compute_dtype

    names = {id(m): n for n, m in model.named_modules() if _is_sas_layer(m)}
    decisions: List[_Decision] = []

    def note_full(module, args):  # "full" layers never call saved_form: their decision is made here
        if module.saved_input == "full" and not module.merged:
            x = args[0]
            kept = kept_by_autograd(x) if x.numel() else None  # the full route keeps x: shared with that node
            form, source = ("none", "A takes no gradient here") if not module.A.requires_grad else (
                ("kept", kept) if kept is not None else ("full", ""))
            decisions.append(_Decision(module, form, source, x, compute_dtype(x, module.base_layer.weight)))

    handles = [m.register_forward_pre_hook(note_full) for m in model.modules() if _is_sas_layer(m)]
    previous, _planning = _planning, decisions
    try:
        with torch.enable_grad():
            model(*example_inputs)
    finally:
        _planning = previous
        for handle in handles:
            handle.remove()
    plan, kept_x, kept_copies = [], set(), set()
    for decision in decisions:
        layer, x, dtype = decision.layer, decision.x, decision.dtype
        rows = x.numel() // max(x.shape[-1], 1)
        trains = any(p.requires_grad for p in layer.shared.parameters())
        u_bytes = layer.A.shape[0] * torch.promote_types(dtype, torch.float32).itemsize if trains else 0
        form, source, x_bytes = decision.form, decision.source, 0
        if form == "full":
            key = (x.untyped_storage().data_ptr(), dtype) if dtype == x.dtype else None  # a cast is a new tensor
            keeps = "x, shared" if key in kept_x else "x"
            x_bytes = 0 if key in kept_x else dtype.itemsize * layer.in_features
            if key is not None:
                kept_x.add(key)
        elif form in ("int8", "fp8"):
            key = (id(x), x._version, form)  # SaSShared.saved_inputs shares one copy of one x
            keeps = f"{form} copy, shared" if key in kept_copies else f"{form} copy"
            x_bytes = 0 if key in kept_copies else layer.in_features + 4
            kept_copies.add(key)
        else:
            keeps = {"recompute": "rebuilt", "kept": "kept anyway", "none": "nothing"}[form]
        plan.append(LayerMemory(names.get(id(layer), "?"), keeps, source, rows, layer.in_features,
                                x_bytes + u_bytes))
    return plan


def format_plan(plan: Sequence[LayerMemory]) -> str:
    """``plan`` as a markdown table."""
    lines = ["| layer | keeps | because | rows | bytes per row |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {m.name} | {m.keeps} | {m.source} | {m.rows} | {m.bytes_per_row:,} |" for m in plan]
    return "\n".join(lines)

"""The shared-parameter owner of an adapted model: A/B per sharing group, the layer embeddings, the
hypernetwork, the task embeddings, and the per-forward cache of h and of A/B in the compute dtype.

Given the :class:`sas.backends.Backend` record of the device, it imports no backend module: the record
says whether the backend has its own hypernetwork op and whether it sinks shared gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, reference

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
# Per activation module type: the function itself (called directly on the hot path: a module call
# costs several microseconds of Python), and d(activation)/d(pre) applied to a gradient, given the
# pre-activation and the activation.
_ACTIVATION_FUNCTIONS = {
    nn.Tanh: (torch.tanh, lambda grad, pre, out: torch.ops.aten.tanh_backward(grad, out)),
    nn.ReLU: (torch.relu, lambda grad, pre, out: torch.ops.aten.threshold_backward(grad, out, 0)),
    nn.GELU: (F.gelu, lambda grad, pre, out: torch.ops.aten.gelu_backward(grad, pre)),
}

# Output weights of H start this small so every h_l starts near 1 (ViT-B/16 rank 8: ~2% off at the median, ~10% at most)
# (h = 1 + H(e)), i.e. the adapter starts as a plain shared low-rank update.
HYPER_OUTPUT_INIT_STD = 1e-2


def hypernetwork_table(activation: type, embedding: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
                       weight2: torch.Tensor, bias2: torch.Tensor,
                       task_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``1 + W2 act(W1 e + b1) + b2`` (``(..., r)``), or with ``task_embeddings`` (T, k) ``(..., T, r)``, from
    the tensors given (never a module's own: ``torch.func.functional_call`` and parametrisations
    substitute them). ``activation`` is the activation's module type (a key of the activation table)."""
    if task_embeddings is None:
        return _hypernetwork_saving(activation, embedding, weight1, bias1, weight2, bias2)[0]
    # W1 (e + tau) + b1 = (W1 e + b1) + W1 tau: W1 runs on the L + T embeddings, not on L * T sums.
    # The task-side products are elementwise-multiply-and-sum rather than GEMMs because a GEMM's
    # rounding of one row depends on how many rows it has (MKL's remainder rows: F.linear over
    # T task rows gave different bits for T < 12), and a task's h must not change when tasks are
    # added (sas.add_task promises bit-identical outputs for the existing ones).
    task_part = (task_embeddings.unsqueeze(-2) * weight1).sum(-1)  # (T, hidden)
    act = _ACTIVATION_FUNCTIONS[activation][0]
    hidden = act(F.linear(embedding, weight1, bias1).unsqueeze(-2) + task_part)  # (..., T, hidden)
    return 1.0 + ((hidden.unsqueeze(-2) * weight2).sum(-1) + bias2)  # (..., T, r)


def _hypernetwork_saving(activation: type, embedding, weight1, bias1, weight2, bias2):
    """``(h, pre, hidden)`` for single-task embeddings (L, k): h and what :func:`_hypernetwork_backward` needs."""
    pre = F.linear(embedding, weight1, bias1)
    hidden = _ACTIVATION_FUNCTIONS[activation][0](pre)
    return 1.0 + F.linear(hidden, weight2, bias2), pre, hidden


def _hypernetwork_backward(activation: type, grad_h, embedding, weight1, weight2, pre, hidden, needs) -> list:
    """Gradients of (embedding, W1, b1, W2, b2) for ``grad_h`` (L, r), written out by hand: seven small
    ops per model backward instead of recomputing the MLP and running autograd over it (about twice
    the ops plus a nested engine call, which dominated a one-layer model's host time). Reads the
    embedding, W1 and W2 as the forward saw them, and the forward's ``pre``/``hidden``."""
    needs_e, needs_w1, needs_b1, needs_w2, needs_b2 = needs
    grads = [None] * 5
    if needs_w2:
        grads[3] = grad_h.t().mm(hidden)
    if needs_b2:
        grads[4] = grad_h.sum(0)
    if needs_e or needs_w1 or needs_b1:
        grad_hidden = grad_h.mm(weight2)
        grad_pre = _ACTIVATION_FUNCTIONS[activation][1](grad_hidden, pre, hidden)
        if needs_w1:
            grads[1] = grad_pre.t().mm(embedding)
        if needs_b1:
            grads[2] = grad_pre.sum(0)
        if needs_e:
            grads[0] = grad_pre.mm(weight1)
    return grads


def _without_autocast(device: torch.device):
    """A context in which autocast is off on ``device``: the hypernetwork always computes in its
    parameters' dtype. It is a few hundred multiply-adds per layer, so low precision buys nothing, and
    under autocast its F.linear calls would otherwise save half-precision activations that its
    backward (run outside autocast) multiplies with the float32 weights."""
    device_type = device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class HyperNetwork(nn.Module):
    """``h = 1 + W2 act(W1 e + b1) + b2``: maps a layer embedding (k,) to its modulation (r,).

    With task embeddings ``tau`` (T, k) it computes ``h_{t,l} = 1 + W2 act(W1 (e_l + tau_t) + b1) + b2``
    for every task at once, ``(..., T, r)``: a task shifts the layer embedding, and the nonlinearity
    makes the shift's effect layer-specific. A new task therefore costs k numbers and no new weights.
    h is computed in the parameters' dtype also under autocast.
    """

    def __init__(self, embed_dim: int, hidden: int, rank: int, activation: str = "tanh"):
        super().__init__()
        self.hidden = nn.Linear(embed_dim, hidden)
        self.activation = _ACTIVATIONS[activation]()
        self.output = nn.Linear(hidden, rank)
        nn.init.normal_(self.output.weight, std=HYPER_OUTPUT_INIT_STD)
        nn.init.zeros_(self.output.bias)

    def forward(self, embedding: torch.Tensor, task_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        modules = self._modules
        hidden_layer, output_layer = modules["hidden"]._parameters, modules["output"]._parameters
        with _without_autocast(embedding.device):
            return hypernetwork_table(type(modules["activation"]), embedding, hidden_layer["weight"],
                                      hidden_layer["bias"], output_layer["weight"], output_layer["bias"],
                                      task_embeddings)


class SaSShared(nn.Module):
    """Owns every SaS tensor of a model once: the shared A/B per sharing group,
    one embedding per adapted layer, the hypernetwork, and with ``num_tasks > 1`` one embedding per task.

    ``down[key]`` is A ``(r, d_in)`` (Kaiming-uniform), ``up[key]`` is B
    ``(d_out, r)`` (zeros, so the adapted model equals the base model at init).
    ``task_embeddings[t]`` is task t's ``(k,)`` embedding, one Parameter per task so that each task can
    be frozen (and left out of an optimizer) on its own; they start at zero, so every task starts as the
    single-task adapter. With ``num_tasks == 1`` there are none and h is ``(r,)`` per layer.
    Layers hold a plain reference to this module and look their tensors up by key.
    """

    def __init__(self, rank: int, embed_dim: int, hyper_hidden: int, hyper_activation: str,
                 down_shapes: Dict[str, int], up_shapes: Dict[str, int], num_layers: int, num_tasks: int = 1,
                 config=None, layer_names: Optional[List[str]] = None):
        super().__init__()
        self.rank = rank
        # What sas.inject built this from (None for a standalone SaSLinear's owner): save_adapter writes both.
        self.config = config
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.down = nn.ParameterDict()
        for key, d_in in down_shapes.items():
            weight = torch.empty(rank, d_in)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            self.down[key] = nn.Parameter(weight)
        self.up = nn.ParameterDict({key: nn.Parameter(torch.zeros(d_out, rank)) for key, d_out in up_shapes.items()})
        if config is not None and not config.train_down:  # LoRA-FA style: A stays as initialized or loaded
            self.down.requires_grad_(False)
        self.embeddings = nn.Parameter(torch.randn(num_layers, embed_dim))
        self.hyper = HyperNetwork(embed_dim, hyper_hidden, rank, hyper_activation)
        self.task_embeddings = nn.ParameterList(
            [nn.Parameter(torch.zeros(embed_dim)) for _ in range(num_tasks)] if num_tasks > 1 else [])

        # Per-dtype cache of h (and of A/B cast to another dtype): see layer_tensors.
        self._cache: Dict[tuple, _CacheEntry] = {}
        # The last 8-bit copy of a layer input (SaSConfig.saved_input), for the next layer fed the same tensor.
        self.saved_inputs = SavedInputCopies()

    def __getstate__(self):
        # Cached tensors carry autograd graphs, which copy.deepcopy and pickle refuse; they are rebuilt on use.
        state = self.__dict__.copy()
        state["_cache"] = {}
        state["saved_inputs"] = SavedInputCopies()  # weak references, which pickle refuses
        return state

    def forward(self, inputs):
        """Pass ``inputs`` through unchanged.

        The owner sits in the model's module tree only to own tensors; a container that calls
        every child in turn (``nn.Sequential``) calls it last, and it must not change the output.
        """
        return inputs

    @property
    def num_tasks(self) -> int:
        return max(len(self.task_embeddings), 1)

    def append_task(self, embedding: nn.Parameter) -> None:
        """Add one task embedding; the config (a copy, never the user's object) records the new count."""
        self.task_embeddings.append(embedding)
        if self.config is not None:
            self.config = dataclasses.replace(self.config, num_tasks=self.num_tasks)

    def _tasks(self) -> Optional[torch.Tensor]:
        """Every task embedding as one (T, k) tensor, or ``None`` for a single-task adapter."""
        return torch.stack(tuple(self.task_embeddings)) if len(self.task_embeddings) else None

    def modulation(self, layer_index: int) -> torch.Tensor:
        """``h_l`` (r,) of one layer; ``(num_tasks, r)`` with several tasks."""
        return self.hyper(self.embeddings[layer_index], self._tasks())

    def modulations(self) -> torch.Tensor:
        """``h`` of every layer at once under plain autograd: (num_layers, r), or (num_layers, num_tasks, r)
        with several tasks (all of them, not only those in the batch: it is the same few launches, and a
        task's h then never depends on which other tasks share its batch)."""
        return self.hyper(self.embeddings, self._tasks())

    def modulation_sources(self) -> Tuple[torch.Tensor, ...]:
        """Every tensor :meth:`modulations` reads: the cache is valid while none of them changed."""
        # Read through the modules' dicts: this runs on every layer call, and nn.Module.__getattr__ for
        # each of these tensors cost more than everything else the cache lookup does.
        hyper = self._modules["hyper"]._modules
        hidden, output = hyper["hidden"]._parameters, hyper["output"]._parameters
        sources = (self._parameters["embeddings"], hidden["weight"], hidden["bias"], output["weight"], output["bias"])
        tasks = self._modules["task_embeddings"]._parameters
        return sources + tuple(tasks.values()) if tasks else sources

    # Running the hypernetwork and casting A/B once per layer would cost, on ViT-B, 48 tiny MLPs plus
    # about 150 casts per forward, each a separate kernel launch in forward and backward. Instead h of
    # every layer (one node, _ModulationTable) and the casts are computed once per forward and shared:
    # an entry is recomputed when a layer that already took from it asks again (a new forward, or a
    # checkpointed segment's recomputation) or when a tensor it was computed from changed (version
    # counters: an optimizer step, load_state_dict). No hooks on the user's model are needed, and
    # gradient checkpointing stays exact: entries are kept apart by grad mode, so a segment's no-grad
    # first pass never hands a detached h to layers that need gradients, and the node saves no tensors
    # through save_for_backward, so a non-reentrant recomputation sees the forward's saved tensors.
    # A write that bypasses version counters (through ``.data``, or to an inference tensor, which has
    # none) is seen from the next forward that runs a layer again; a forward over layers not run since
    # such a write would still get the h from before it (seeing it would mean reading the tensors'
    # values on every layer call: a device op and a host sync each).
    def layer_tensors(self, layer_index: int, down_key: str, up_key: str, dtype: torch.dtype):
        """``(A, B, h_l)`` of one layer in ``dtype``."""
        if torch.compiler.is_compiling():  # traced once; the compiler deduplicates and fuses
            return (self.down[down_key].to(dtype), self.up[up_key].to(dtype), self.modulation(layer_index).to(dtype))
        entry = self._entry(dtype, layer_index)
        A, B = self.down[down_key], self.up[up_key]
        if A.dtype != dtype or entry.attach_gradient_sink is not None:
            A, B = entry.shared(A), entry.shared(B)
        return A, B, entry.modulations[layer_index]

    def _entry(self, dtype: torch.dtype, layer_index: int) -> "_CacheEntry":
        sources = self.modulation_sources()
        try:  # inline, not a call: this runs on every layer call
            stamp = tuple((id(t), t._version) for t in sources)
        except RuntimeError:  # an inference tensor among them (rare, so the common case pays no test)
            stamp = _inference_stamp(sources)
        # Per CUDA stream too: a layer running on another stream than the one that made an entry would read
        # its tensors with no event ordering the two (the entry is ours, so the user cannot wait on it).
        key = (dtype, sources[0].device, backends.runtime.stream_of(sources[0]), torch.is_grad_enabled(),
               torch.is_inference_mode_enabled())
        entry = self._cache.get(key)
        # A layer asking twice means a new forward began (or a checkpointed segment is recomputed, or a
        # layer runs twice in one forward): recomputing then also catches writes that bypass version
        # counters (``.data``, gradcheck, inference tensors). An entry made because a layer ran twice in one
        # forward counts the forward's first layer as served too, so the next forward's first layer
        # recomputes rather than taking an h from before such a write.
        if entry is None or entry.stamp != stamp or layer_index in entry.served:
            backend = backends.backend_for(key[1])
            # Only a backend whose layer backward adds shared gradients in place needs sink-attached A/B.
            sink = backend.attach_gradient_sink if key[3] else None
            table = self._modulation_table(sources, stamp, dtype, backend)
            first = layer_index if entry is None or layer_index == entry.first else entry.first
            self._cache[key] = entry = _CacheEntry(sources, stamp, table, dtype, sink, first)
        entry.served.add(layer_index)
        return entry

    def _modulation_table(self, sources, stamp: tuple, dtype: torch.dtype, backend) -> Tuple[torch.Tensor, ...]:
        versions = tuple(version for _, version in stamp)
        # Plain ops without a gradient to track, and for inference tensors (made under torch.inference_mode(),
        # no version counter): they cannot be trained, and plain ops let PyTorch decide what they allow.
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in sources)) or None in versions:
            return self.modulations().to(dtype).unbind(0)
        activation = type(self.hyper.activation)
        # The backend's own hypernetwork op where it has one (C++: one op each way, with no Python).
        table = backend.hypernetwork(activation, sources) if backend.hypernetwork is not None else None
        if table is not None:
            return table.to(dtype).unbind(0)
        return _ModulationTable.apply(activation, dtype, versions, *sources).unbind(0)


class SavedInputCopies:
    """The 8-bit copy (``SaSConfig.saved_input``) of the last layer input one was made of, so that the
    layers fed the same tensor (q, k and v of a block, called one after another) keep ONE copy between
    them, as they keep one saved x in the full mode.

    One slot, keyed on the input tensor itself (a weak reference, so a dead input never matches a new
    tensor at its address), its version counter (a write in place makes another input), the kind, the
    compute dtype and the CUDA stream. The slot holds the copy weakly too: it lives exactly as long as a
    layer's saved tensors keep it (the backward, or checkpointing's discarding of saved tensors, frees it),
    and no copy outlives its backward because of this cache.
    """

    __slots__ = ("_key", "_input", "_q", "_scale")

    def __init__(self) -> None:
        self._key, self._input, self._q, self._scale = None, None, None, None

    @staticmethod
    def _key_of(x: torch.Tensor, kind: str, dtype: torch.dtype):
        try:
            version = x._version
        except RuntimeError:  # an inference tensor: no version counter, so no way to see writes; not shared
            return None
        return id(x), version, kind, dtype, backends.runtime.stream_of(x)

    def get(self, x: torch.Tensor, kind: str, dtype: torch.dtype) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(q, scale)`` made of this very ``x`` (same object, unchanged) in ``kind`` and ``dtype``, or ``None``."""
        if self._key is None or self._input() is not x or self._key != self._key_of(x, kind, dtype):
            return None
        q, scale = self._q(), self._scale()
        return None if q is None or scale is None else (q, scale)

    def put(self, x: torch.Tensor, kind: str, dtype: torch.dtype, q: torch.Tensor, scale: torch.Tensor) -> None:
        key = self._key_of(x, kind, dtype)
        if key is not None:
            self._key, self._input, self._q, self._scale = key, weakref.ref(x), weakref.ref(q), weakref.ref(scale)


def _inference_stamp(tensors) -> tuple:
    """``(id, version)`` of each tensor, the version ``None`` for an inference tensor (made under
    ``torch.inference_mode()``), which has no version counter."""
    return tuple((id(t), None if t.is_inference() else t._version) for t in tensors)


class _CacheEntry:
    """One forward's h of every layer in one dtype, and its A/B: cast to that dtype, and with
    ``attach_gradient_sink`` (the backend's, when it sinks shared gradients) applied to each. Valid while
    ``stamp`` matches.
    Holds the ``sources`` the stamp describes, so no other tensor can take one of their ids while it lives.
    ``first`` is the layer that began the forward this entry serves (see ``SaSShared._entry``)."""

    def __init__(self, sources: tuple, stamp: tuple, modulations: Tuple[torch.Tensor, ...], dtype: torch.dtype,
                 attach_gradient_sink, first: int):
        self.sources, self.stamp, self.modulations, self.dtype = sources, stamp, modulations, dtype
        self.attach_gradient_sink = attach_gradient_sink
        self.first = first
        self.served: set = {first}  # layers that took their h from this entry, and the forward's first
        self._shared: Dict[int, Tuple[int, torch.Tensor, torch.Tensor]] = {}  # id -> (version, source, result)

    def shared(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the layers of this forward use it, made once while ``t`` is unchanged (same object and version)."""
        try:
            version = t._version
        except RuntimeError:  # an inference tensor has no version counter
            version = None
        hit = self._shared.get(id(t))
        if hit is None or hit[0] != version or hit[1] is not t:
            result = t.to(self.dtype)
            if self.attach_gradient_sink is not None and result.requires_grad:
                result = self.attach_gradient_sink(result)
            hit = self._shared[id(t)] = (version, t, result)
        return hit[2]


# What the modulation table reads, in SaSShared.modulation_sources' order (task embeddings follow), for messages.
_SOURCE_NAMES = ("embeddings", "hyper.hidden.weight", "hyper.hidden.bias", "hyper.output.weight", "hyper.output.bias")
# The sources the hand-written single-task backward reads: the embeddings, W1 and W2 (b1 and b2 only
# shaped pre and hidden, which the forward saved).
_HAND_WRITTEN_BACKWARD_READS = (0, 1, 3)


def _check_unchanged(sources, versions, indices) -> None:
    """Raise as autograd does for a saved tensor written in place between the forward and the backward."""
    for i in indices:
        t = sources[i]
        if t._version != versions[i]:
            name = _SOURCE_NAMES[i] if i < len(_SOURCE_NAMES) else f"task_embeddings.{i - len(_SOURCE_NAMES)}"
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"the SaS adapter's {name} {list(t.shape)} is at version {t._version}; expected version "
                f"{versions[i]} instead. Write it after the backward (e.g. optimizer.step() after loss.backward()), "
                f"or run the forward again after writing it")


class _ModulationTable(torch.autograd.Function):
    """h of every layer (and task) as one autograd node: :func:`hypernetwork_table` of the source tensors
    (``SaSShared.modulation_sources``), computed in their dtype with autocast off.

    The node keeps what its backward needs on ``ctx`` (the source tensors, the activations), never
    through ``save_for_backward``: checkpointing packs saved tensors of a segment and compares them
    with its recomputation, and a table computed in one pass but cached for the next must not take
    part in that. Having no saved tensors also lets two backward passes (reentrant checkpointing's
    inner one, then the outer one) run through the same node. Since autograd's version check does not
    cover ``ctx``, the backward checks the sources' versions itself (once per model backward). A
    single-task table uses the hand-written backward; a multi-task one, or a double backward
    (``create_graph``), recomputes the table under autograd and differentiates it.
    """

    @staticmethod
    def forward(ctx, activation, dtype, versions, embeddings, *weights_and_tasks):
        weight1, bias1, weight2, bias2, *tasks = weights_and_tasks
        with _without_autocast(embeddings.device):
            if tasks:
                h = hypernetwork_table(activation, embeddings, weight1, bias1, weight2, bias2, torch.stack(tasks))
                ctx.activations = None
            else:
                h, *ctx.activations = _hypernetwork_saving(activation, embeddings, weight1, bias1, weight2, bias2)
        ctx.activation, ctx.sources, ctx.versions, ctx.input_dtype = activation, (embeddings, *weights_and_tasks), \
            versions, h.dtype
        return h.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[3:]
        grad = grad.to(ctx.input_dtype)
        sources, activation = ctx.sources, ctx.activation
        if ctx.activations is not None and not torch.is_grad_enabled():
            _check_unchanged(sources, ctx.versions, _HAND_WRITTEN_BACKWARD_READS)
            grads = _hypernetwork_backward(activation, grad, sources[0], sources[1], sources[3], *ctx.activations,
                                           needs)
        else:
            _check_unchanged(sources, ctx.versions, range(len(sources)))

            def table(embeddings, weight1, bias1, weight2, bias2, *tasks):
                return hypernetwork_table(activation, embeddings, weight1, bias1, weight2, bias2,
                                          torch.stack(tasks) if tasks else None)

            with _without_autocast(grad.device):
                grads = reference.regrad(table, sources, needs, grad, create_graph=torch.is_grad_enabled())
        return (None, None, None, *grads)


def find_shared(model: nn.Module) -> Optional[SaSShared]:
    shared = getattr(model, "sas_shared", None)
    return shared if isinstance(shared, SaSShared) else None

"""SaS modules: the shared-parameter owner, the hypernetwork and the ``SaSLinear`` wrapper."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, fused_linear, linear_op, reference
from . import _task_state

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
# Per activation module type: the function itself (called directly on the hot path: a module call
# costs several microseconds of Python), and d(activation)/d(pre) applied to a gradient, given the
# pre-activation and the activation.
_ACTIVATION_FUNCTIONS = {
    nn.Tanh: (torch.tanh, lambda grad, pre, out: torch.ops.aten.tanh_backward(grad, out)),
    nn.ReLU: (torch.relu, lambda grad, pre, out: torch.ops.aten.threshold_backward(grad, out, 0)),
    nn.GELU: (F.gelu, lambda grad, pre, out: torch.ops.aten.gelu_backward(grad, pre)),
}

# The activation codes of the C++ op torch.ops.sas.cpu_hypernetwork (csrc/layer_cpu.cpp), which runs the
# single-task hypernetwork with its autograd in C++ when the C++ backend serves the device.
_CPP_ACTIVATION_CODES = {nn.Tanh: 0, nn.ReLU: 1, nn.GELU: 2}

# Output weights of H start this small so every h_l starts within about 1% of 1
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
                 down_shapes: Dict[str, int], up_shapes: Dict[str, int], num_layers: int, num_tasks: int = 1):
        super().__init__()
        self.rank = rank
        self.down = nn.ParameterDict()
        for key, d_in in down_shapes.items():
            weight = torch.empty(rank, d_in)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            self.down[key] = nn.Parameter(weight)
        self.up = nn.ParameterDict({key: nn.Parameter(torch.zeros(d_out, rank)) for key, d_out in up_shapes.items()})
        self.embeddings = nn.Parameter(torch.randn(num_layers, embed_dim))
        self.hyper = HyperNetwork(embed_dim, hyper_hidden, rank, hyper_activation)
        self.task_embeddings = nn.ParameterList(
            [nn.Parameter(torch.zeros(embed_dim)) for _ in range(num_tasks)] if num_tasks > 1 else [])

        # Per-dtype cache of h (and of A/B cast to another dtype): see layer_tensors.
        self._cache: Dict[tuple, _CacheEntry] = {}

    def __getstate__(self):
        # Cached tensors carry autograd graphs, which copy.deepcopy and pickle refuse; they are rebuilt on use.
        state = self.__dict__.copy()
        state["_cache"] = {}
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
        if A.dtype != dtype or entry.sink_gradients:
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
        key = (dtype, sources[0].device, linear_op._stream_of(sources[0]), torch.is_grad_enabled(),
               torch.is_inference_mode_enabled())
        entry = self._cache.get(key)
        # A layer asking twice means a new forward began (or a checkpointed segment is recomputed, or a
        # layer runs twice in one forward): recomputing then also catches writes that bypass version
        # counters (``.data``, gradcheck, inference tensors). An entry made because a layer ran twice in one
        # forward counts the forward's first layer as served too, so the next forward's first layer
        # recomputes rather than taking an h from before such a write.
        if entry is None or entry.stamp != stamp or layer_index in entry.served:
            # Only the Triton layer backward adds shared gradients in place (linear_op.GradientSink).
            sink = key[3] and functional.resolve_backend(key[1]) == "triton"
            table = self._modulation_table(sources, stamp, dtype)
            first = layer_index if entry is None or layer_index == entry.first else entry.first
            self._cache[key] = entry = _CacheEntry(sources, stamp, table, dtype, sink, first)
        entry.served.add(layer_index)
        return entry

    def _modulation_table(self, sources, stamp: tuple, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
        versions = tuple(version for _, version in stamp)
        # Plain ops without a gradient to track, and for inference tensors (made under torch.inference_mode(),
        # no version counter): they cannot be trained, and plain ops let PyTorch decide what they allow.
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in sources)) or None in versions:
            return self.modulations().to(dtype).unbind(0)
        activation = type(self.hyper.activation)
        if (len(sources) == 5 and activation in _CPP_ACTIVATION_CODES
                and functional.resolve_backend(sources[0].device) == "cpp"):
            # Single task on the C++ backend: forward and backward are one C++ op each, with no Python.
            # The op turns autocast off itself and checks the versions of what its backward reads.
            table = torch.ops.sas.cpu_hypernetwork(*sources, _CPP_ACTIVATION_CODES[activation])
            return table.to(dtype).unbind(0)
        return _ModulationTable.apply(activation, dtype, versions, *sources).unbind(0)


def _inference_stamp(tensors) -> tuple:
    """``(id, version)`` of each tensor, the version ``None`` for an inference tensor (made under
    ``torch.inference_mode()``), which has no version counter."""
    return tuple((id(t), None if t.is_inference() else t._version) for t in tensors)


class _CacheEntry:
    """One forward's h of every layer in one dtype, and its A/B: cast to that dtype, and with
    ``sink_gradients`` attached to a :class:`sas.linear_op.GradientSink` each. Valid while ``stamp`` matches.
    Holds the ``sources`` the stamp describes, so no other tensor can take one of their ids while it lives.
    ``first`` is the layer that began the forward this entry serves (see ``SaSShared._entry``)."""

    def __init__(self, sources: tuple, stamp: tuple, modulations: Tuple[torch.Tensor, ...], dtype: torch.dtype,
                 sink_gradients: bool, first: int):
        self.sources, self.stamp, self.modulations, self.dtype = sources, stamp, modulations, dtype
        self.sink_gradients = sink_gradients
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
            if self.sink_gradients and result.requires_grad:
                result = linear_op.GradientSink.attach(result)
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


class SaSLinear(nn.Module):
    """A frozen ``nn.Linear`` (kept as ``base_layer``) plus the SaS update

    ``y = base_layer(x) + s * ((x @ A.T) * h_l) @ B.T``

    with ``A``/``B`` taken from the shared owner and ``h_l`` from its hypernetwork.
    The shared owner is referenced, not registered, so each shared tensor appears
    once in the model's ``state_dict`` (under the owner's name).
    """

    def __init__(self, base_layer: nn.Linear, shared: SaSShared, layer_index: int,
                 down_key: str, up_key: str, scale: float, owns_shared: bool = False, layer_op: str = "adapter"):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SaSLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        if owns_shared:
            self.shared = shared  # registered: a standalone layer owns its tensors
        else:
            object.__setattr__(self, "shared", shared)
        self.layer_index = layer_index
        self.down_key = down_key
        self.up_key = up_key
        self.scale = float(scale)
        self.layer_op = layer_op  # "adapter" or "fused": see SaSConfig.layer_op
        self._validated: Optional[tuple] = None  # the last input signature forward() fully validated
        # Merge state (see merge). The flag is a persistent buffer so it travels with the weights in a
        # state_dict: loading a merged model's weights into an unmerged one must not add the update twice.
        # forward() reads the Python mirror, never the device tensor (no host sync per call).
        self.register_buffer("sas_merged", torch.zeros((), dtype=torch.bool, device=base_layer.weight.device))
        self._merged = False
        self._merge_record: Optional[tuple] = None  # (weight, its _write_stamp after merge, its copy before merge)
        self._merged_task: Optional[int] = None
        self.register_load_state_dict_pre_hook(_merged_flag_follows_weight)
        self.register_load_state_dict_post_hook(_sync_merged_flag)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, scale: float = 1.0, embed_dim: int = 8,
                    hyper_hidden: int = 32, hyper_activation: str = "tanh", layer_op: str = "adapter") -> "SaSLinear":
        """A standalone adapted layer that owns its own A, B and hypernetwork (for single-layer use)."""
        shared = SaSShared(rank, embed_dim, hyper_hidden, hyper_activation,
                           {"layer": linear.in_features}, {"layer": linear.out_features}, 1)
        shared.to(device=linear.weight.device, dtype=linear.weight.dtype)
        linear.requires_grad_(False)
        return cls(linear, shared, 0, "layer", "layer", scale, owns_shared=True, layer_op=layer_op)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def A(self) -> torch.Tensor:
        return self.shared.down[self.down_key]

    @property
    def B(self) -> torch.Tensor:
        return self.shared.up[self.up_key]

    def modulation(self) -> torch.Tensor:
        return self.shared.modulation(self.layer_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        try:
            task = _task_state.layer_tasks(self.shared, x)  # None, one task (int) or one id per batch element
            base_parameters = self._modules["base_layer"]._parameters  # not __getattr__: see modulation_sources
            weight, bias = base_parameters["weight"], base_parameters["bias"]
            # The fused designs fold a single h into the weight; a batch of per-element tasks takes the adapter path.
            if self.layer_op == "fused" and not isinstance(task, torch.Tensor):
                A, B, h = self.shared.layer_tensors(self.layer_index, self.down_key, self.up_key,
                                                    linear_op.compute_dtype(x, weight))
                h, _ = _task_modulation(h, task)
                return fused_linear.sas_linear(x, weight, bias, A, B, h, self.scale)
            if torch.compiler.is_compiling():
                # The compiler traces the op-level path: its torch.library ops are what it knows how to trace.
                base = self.base_layer(x)
                A, B, h = self.shared.layer_tensors(self.layer_index, self.down_key, self.up_key, base.dtype)
                h, task_ids = _task_modulation(h, task)
                return functional.sas_adapter(x.to(base.dtype), base, A, B, h, self.scale, task_ids)
            dtype = linear_op.compute_dtype(x, weight)
            A, B, h = self.shared.layer_tensors(self.layer_index, self.down_key, self.up_key, dtype)
            h, task_ids = _task_modulation(h, task)
            signature = (x.dtype, x.device, x.dim(), x.shape[-1], dtype, h.shape, task_ids is None)
            if signature != self._validated:  # full checks once per input signature, then none
                if x.dim() < 1 or x.shape[-1] != self.in_features:
                    raise ValueError(f"SaSLinear takes x of shape (..., in_features={self.in_features}), "
                                     f"got {tuple(x.shape)}")
                functional.validate(x.to(dtype), weight.new_empty(()).to(dtype).expand(*x.shape[:-1], self.out_features),
                                    A, B, h, self.scale, task_ids)
                self._validated = signature
            return linear_op.adapted_linear(x, weight, bias, A, B, h, self.scale, task_ids)
        except Exception:
            # A bad x fails somewhere inside (an IndexError for a 0-dim x, an autocast error for a meta
            # one): name it instead. The check runs only after a failure (a try costs nothing), so the
            # hot path pays nothing for it.
            problem = self._input_problem(x)
            if problem is not None:
                raise problem from None
            raise

    def _input_problem(self, x) -> Optional[Exception]:
        """The ``TypeError``/``ValueError`` naming ``x`` when it cannot be this layer's input, else ``None``."""
        if not isinstance(x, torch.Tensor):
            return TypeError(f"SaSLinear takes x as a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            return ValueError(f"SaSLinear takes x of shape (..., in_features={self.in_features}), got {tuple(x.shape)}")
        weight = self.base_layer.weight
        if x.is_meta and not weight.is_meta:
            return ValueError(f"SaSLinear got x on the meta device, which holds no values; its weights are on "
                              f"{weight.device}")
        if x.device != weight.device:
            return ValueError(f"device mismatch: x is on {x.device} but SaSLinear's weights are on {weight.device}")
        return None

    @property
    def merged(self) -> bool:
        """Whether the update is folded into ``base_layer.weight`` (saved as the ``sas_merged`` buffer)."""
        return self._merged

    def _set_merged(self, merged: bool) -> None:
        self._merged = merged
        with _writable(self.sas_merged):
            self.sas_merged.fill_(merged)

    @torch.no_grad()
    def delta_weight(self, task: Optional[int] = None) -> torch.Tensor:
        """``s * B @ diag(h_l) @ A`` in float32, the update folded in by :meth:`merge`; ``h_{t,l}`` of
        ``task`` when the adapter has several tasks (there it is required)."""
        A, B = self.A.float(), self.B.float()
        h, _ = _task_modulation(self.modulation(), _task_state.check_task(self.shared, task))
        return self.scale * (B * h.float()) @ A

    @property
    def merged_task(self) -> Optional[int]:
        """The task whose update :meth:`merge` folded in (``None`` when unmerged or single-task)."""
        return self._merged_task

    @torch.no_grad()
    def _fold(self, task: Optional[int]) -> Tuple[Optional[torch.Tensor], Optional[str]]:
        """``(the merged weight, None)``, or ``(None, why merging would refuse)``."""
        delta = self.delta_weight(task)
        if not torch.isfinite(delta).all():
            return None, "the SaS update contains NaN or Inf"
        weight = self.base_layer.weight
        folded = (weight.float() + delta).to(weight.dtype)
        if (torch.isfinite(weight) & ~torch.isfinite(folded)).any():
            largest = torch.finfo(weight.dtype).max
            return None, (f"the merged weight overflows {weight.dtype} (an entry of W0 + update is beyond "
                          f"{largest:g}); keep the model unmerged or merge it in a wider dtype (e.g. model.float())")
        return folded, None

    def merge_refusal(self, task: Optional[int] = None) -> Optional[str]:
        """Why :meth:`merge` of ``task`` would refuse (``None`` when it would not)."""
        return self._fold(task)[1]

    @torch.no_grad()
    def merge(self, task: Optional[int] = None) -> None:
        """Fold the update (of ``task``, required with several tasks) into ``base_layer.weight``;
        refuses (``ValueError``, weight untouched) a non-finite update or a merged weight that
        overflows the weight's dtype.

        Keeps a copy of the weight as it was (one more weight of memory while merged), so that
        :meth:`unmerge` restores it bit for bit even if the adapter changes while merged.
        """
        if self.merged:
            warnings.warn("SaSLinear is already merged; merge() did nothing", UserWarning, stacklevel=2)
            return
        folded, reason = self._fold(task)
        if reason is not None:
            raise ValueError(f"refusing to merge: {reason}")
        weight = self.base_layer.weight
        before = weight.detach().clone()
        with _writable(weight):
            weight.copy_(folded)
        self._merge_record = (weight, _write_stamp(weight), before)
        self._merged_task = task if self.shared.num_tasks > 1 else None
        self._set_merged(True)

    def _weight_as_merged(self) -> bool:
        """Whether the weight is still the one :meth:`merge` wrote, so that its kept copy describes it."""
        weight, stamp, _ = self._merge_record or (None, None, None)
        # Any write since merge (load_state_dict, an optimizer step, copy_) changes the stamp, and
        # restoring the copy would undo it; .to(dtype/device) keeps the Parameter and its version.
        return weight is self.base_layer.weight and stamp == _write_stamp(weight)

    def unmerge_refusal(self) -> Optional[str]:
        """Why :meth:`unmerge` would refuse (``None`` when it would not)."""
        if not self._weight_as_merged():
            return ("its weight before merge is not known: the merged weight was loaded (e.g. from a merged "
                    "model's state_dict) or written since merge; load the base weights and the adapter instead")
        if not torch.isfinite(self.delta_weight(self._merged_task)).all():
            return "the SaS update contains NaN or Inf"
        return None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``base_layer.weight`` exactly as it was before :meth:`merge`.

        The update is not subtracted (that drifts by rounding, and by every adapter change made while
        merged): the copy taken by :meth:`merge` is put back. Refuses (``ValueError``, nothing changed)
        when that copy no longer describes the weight, or when the current update is non-finite.
        """
        if not self.merged:
            warnings.warn("SaSLinear is not merged; unmerge() did nothing", UserWarning, stacklevel=2)
            return
        reason = self.unmerge_refusal()
        if reason is not None:
            raise ValueError(f"refusing to unmerge: {reason}")
        weight, _, before = self._merge_record
        with _writable(weight):
            weight.copy_(before)
        self._merge_record = None
        self._merged_task = None
        self._set_merged(False)

    def __getstate__(self):
        # copy.deepcopy and pickle give the copy a new weight tensor with a version counter of its own:
        # the record keeps only whether the weight was still as merge left it, and the copy re-stamps it.
        state = super().__getstate__()
        if self._merge_record is not None:
            weight, _, before = self._merge_record
            state["_merge_record"] = (weight, self._weight_as_merged(), before)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self._merge_record is not None:
            weight, unchanged, before = self._merge_record
            self._merge_record = (weight, _write_stamp(weight) if unchanged else None, before)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.A.shape[0]}, "
                f"layer={self.layer_index}, down={self.down_key!r}, up={self.up_key!r}, scale={self.scale}, "
                f"op={self.layer_op}, "
                f"merged={self.merged}")


def _writable(tensor: torch.Tensor):
    """A context in which ``tensor`` may be written in place: an inference tensor (made under
    ``torch.inference_mode()``) only accepts in-place writes inside inference mode."""
    return torch.inference_mode() if tensor.is_inference() else contextlib.nullcontext()


# Integer dtypes of each floating-point width, to read a weight's bits.
_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Elements per step of the fingerprint, to bound its int64 temporaries (about 32 MiB each).
_FINGERPRINT_CHUNK = 1 << 22
# An odd 64-bit mixing constant (the golden ratio's, 0x9E3779B97F4A7C15, less its top bit so it fits int64).
_FINGERPRINT_MIX = 0x1E3779B97F4A7C15


def _bits_fingerprint(tensor: torch.Tensor) -> int:
    """A 64-bit fingerprint of ``tensor``'s bits: ``sum(bits_i * m_i) mod 2**64`` with a distinct odd
    multiplier per position, so any change of one element, and all but a 2**-64 share of other changes,
    give another value."""
    bits = tensor.detach().reshape(-1).view(_BITS_DTYPES[tensor.element_size()])
    total = 0
    for start in range(0, bits.numel(), _FINGERPRINT_CHUNK):
        chunk = bits[start:start + _FINGERPRINT_CHUNK].long()
        positions = torch.arange(start, start + chunk.numel(), device=chunk.device)
        total += int(((positions * _FINGERPRINT_MIX) | 1).mul_(chunk).sum())  # int64 products wrap mod 2**64
    return total % (1 << 64)


def _write_stamp(weight: torch.Tensor) -> tuple:
    """What changes when ``weight`` is written: its version counter, or for an inference tensor (which
    has none) a fingerprint of its bits."""
    return ("bits", _bits_fingerprint(weight)) if weight.is_inference() else ("version", weight._version)


def _task_modulation(h: torch.Tensor, task) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(h, task_ids)`` for the op: a single task's row of a per-task ``h`` (T, r), or ``h`` with the ids."""
    if isinstance(task, int):
        return h[task], None
    return h, task


def _merged_flag_follows_weight(layer: SaSLinear, state_dict, prefix, *_unused) -> None:
    """Load-state pre-hook: a state without ``sas_merged`` (saved before the flag existed, or partial)."""
    key = prefix + "sas_merged"
    if key not in state_dict:
        # With the base weight in it, the state is an unmerged one from before the flag; without it, the
        # weight stays as it is and so does the flag.
        carries_weight = prefix + "base_layer.weight" in state_dict
        state_dict[key] = torch.zeros((), dtype=torch.bool) if carries_weight else layer.sas_merged.clone()


def _sync_merged_flag(layer: SaSLinear, _incompatible_keys) -> None:
    layer._merged = bool(layer.sas_merged)
    if not layer._merged:  # an unmerged state was loaded: no update, and no task, is folded in any more
        layer._merge_record = None
        layer._merged_task = None


def adapted_layers(model: nn.Module) -> List[SaSLinear]:
    return [m for m in model.modules() if isinstance(m, SaSLinear)]


def find_shared(model: nn.Module) -> Optional[SaSShared]:
    shared = getattr(model, "sas_shared", None)
    return shared if isinstance(shared, SaSShared) else None

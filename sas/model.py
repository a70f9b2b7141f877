"""Whole-model operations: inject an adapter (SaS, or SSL/SSB scaling) into any ``nn.Module``, merge/unmerge,
count parameters."""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from . import recompute
from ._merge_state import _writable
from ._sharding import refuse_sharded_weights
from ._task_state import check_task
from .config import SaSConfig
from .layer import SaSLinear
from .multitask import refuse_open_contexts_for_other_tasks
from .scaling import ScalingConfig, ScalingLinear, ScalingShared
from .shared import HyperNetwork, SaSShared
from .targets import matches, regex_fullmatches

#: The configs :func:`inject` takes, the layers it makes, and the owner it registers as ``SHARED_ATTRIBUTE``.
AdapterConfig = Union[SaSConfig, ScalingConfig]
AdaptedLayer = Union[SaSLinear, ScalingLinear]

SHARED_ATTRIBUTE = "sas_shared"

#: Half-precision base weights get a float32 adapter (see :func:`adapter_dtype`).
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: Module names (the last part of a dotted name) of the task heads Hugging Face models create freshly
#: initialised: ``*ForSequenceClassification``/``*ForTokenClassification``/``*ForImageClassification`` name it
#: ``classifier`` (``score`` in the decoder families), ``*ForQuestionAnswering`` ``qa_outputs``.
HF_TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")


@dataclass(frozen=True)
class LayerPlan:
    """Where one adapted layer sits and which shared tensors it uses (a scaling layer uses none by key)."""

    name: str
    in_features: int
    out_features: int
    down_key: Optional[str]
    up_key: Optional[str]
    aliases: Tuple[str, ...] = ()  # other names the same nn.Linear instance is reachable under


# Parents that read a child Linear's weight themselves instead of calling the child, so a SaSLinear
# there would be skipped or crash the forward: nn.MultiheadAttention always uses out_proj.weight, and
# nn.TransformerEncoderLayer's inference fast path passes linear1/linear2 weights to one fused kernel.
READS_CHILD_WEIGHT = {nn.MultiheadAttention: ("out_proj",), nn.TransformerEncoderLayer: ("linear1", "linear2")}

def _role(name: str, config: SaSConfig) -> str:
    """The target pattern a layer matched; for a regex target, its name with layer indices removed."""
    if isinstance(config.targets, str):
        return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)
    return next(t for t in config.targets if matches(name, t))


def _key(text: str) -> str:
    """A ParameterDict key (no dots allowed) that still reads like the role."""
    return re.sub(r"[^0-9A-Za-z_]", "_", text.replace("*", "N"))


def _linears(model: nn.Module) -> List[Tuple[nn.Linear, List[str]]]:
    """Every not yet adapted ``nn.Linear`` below ``model`` with every name it is reachable under."""
    names: Dict[int, Tuple[nn.Linear, List[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and isinstance(module, nn.Linear):
            names.setdefault(id(module), (module, []))[1].append(name)
    return list(names.values())


def _chosen(linears: List[Tuple[nn.Linear, List[str]]],
            config: AdapterConfig) -> List[Tuple[nn.Linear, List[str], str]]:
    """``(module, names, the first name that matched)`` of every targeted Linear."""
    every_name = [n for _, names in linears for n in names]
    listing = ", ".join(every_name) or "(none)"
    if isinstance(config.targets, str):
        hits = {n for n, hit in zip(every_name, regex_fullmatches(config.targets, every_name)) if hit}
        if not hits:
            raise ValueError(f"targets {config.targets!r} match no nn.Linear in the model; "
                             f"its Linear layers are: {listing}")
    else:
        for target in config.targets:
            if not any(matches(n, target) for n in every_name):
                raise ValueError(f"targets entry {target!r} matches no nn.Linear in the model; "
                                 f"its Linear layers are: {listing}")
        hits = {n for n in every_name if any(matches(n, t) for t in config.targets)}
    return [(module, names, next(n for n in names if n in hits))
            for module, names in linears if any(n in hits for n in names)]


def _refuse_weight_readers(model: nn.Module, chosen) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    for _, names, _ in chosen:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            for kind, children in READS_CHILD_WEIGHT.items():
                if isinstance(parent, kind) and child in children:
                    raise ValueError(f"cannot adapt {name!r}: its parent {type(parent).__name__} reads "
                                     f"{child}.weight itself instead of calling {child!r}, so the adapter would "
                                     f"be bypassed or the forward would fail; leave it out of targets")


def _refuse_adapted(model: nn.Module) -> None:
    """Raise if ``model`` already holds adapter modules (SaS or scaling) anywhere below it.

    Adapting again would wrap the adapted layers' ``base_layer`` and the hypernetwork's own Linears
    (a regex such as ``".*"`` matches them), and an adapter cannot be extended by a second one.
    """
    found = [f"{type(module).__name__} at {name or '(the model itself)'!r}"
             for name, module in model.named_modules() if isinstance(module, ADAPTER_MODULES)]
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ValueError(f"model already has SaS injected ({shown}); inject adapts a base model once and cannot add "
                         f"layers to an existing adapter: inject into the base model, before any part of it is "
                         f"adapted, with targets naming every layer to adapt")


def plan_injection(model: nn.Module, config: AdapterConfig) -> List[LayerPlan]:
    """Which Linear layers ``config`` adapts in ``model`` and their shared keys; changes nothing.

    A Linear instance reachable under several names is adapted once, under all of them (one layer,
    one embedding), if any of its names is targeted. A model that already holds SaS modules (its
    own adapter or an adapted submodule) is refused.
    """
    _refuse_adapted(model)
    kind = kind_of(config, "config_class")
    matched = _chosen(_linears(model), config)
    _refuse_weight_readers(model, matched)
    chosen = [(name, module) for module, _, name in matched]
    aliases = {name: tuple(n for n in names if n != name) for _, names, name in matched}
    return kind.plan(config, chosen, aliases)


def _plan_scaling(config: ScalingConfig, chosen, aliases) -> List[LayerPlan]:
    """One scale per layer: no sharing groups."""
    return [LayerPlan(name, module.in_features, module.out_features, None, None, aliases[name])
            for name, module in chosen]


def _plan_sas(config: SaSConfig, chosen, aliases) -> List[LayerPlan]:
    """The sharing group of each layer's A and B (``config.sharing``, split by shape where shapes differ)."""
    group_of = {}
    for name, module in chosen:
        shape = (module.in_features, module.out_features)
        if config.sharing == "layer":
            group = _key(name)
        elif config.sharing == "shape":
            group = f"{shape[0]}x{shape[1]}"
        else:
            group = _key(_role(name, config))
        group_of[name] = (group, shape)
    # A role whose layers differ in shape cannot share one A/B: split it by shape.
    shapes_per_group: Dict[str, set] = {}
    for group, shape in group_of.values():
        shapes_per_group.setdefault(group, set()).add(shape)
    plans = []
    for name, _ in chosen:
        group, shape = group_of[name]
        if len(shapes_per_group[group]) > 1:
            group = f"{group}_{shape[0]}x{shape[1]}"
        down = f"in{shape[0]}" if config.share_down_by_input_dim else group
        plans.append(LayerPlan(name, shape[0], shape[1], down, group, aliases[name]))
    return plans


def _trainable_modules(model: nn.Module, config: AdapterConfig) -> List[nn.Module]:
    """The modules ``config.trainable_modules`` names; raises for an entry that matches none."""
    modules = []
    for pattern in config.trainable_modules:
        hits = [m for n, m in model.named_modules() if n and matches(n, pattern)]
        if not hits:
            raise ValueError(f"trainable_modules entry {pattern!r} matches no module of the model")
        modules.extend(hits)
    return modules


def build_shared(plans: List[LayerPlan], config: AdapterConfig, device, dtype) -> Union[SaSShared, ScalingShared]:
    """The shared owner for ``plans``; on the meta device it only describes keys and shapes."""
    with torch.device(device):
        shared = kind_of(config, "config_class").build_shared(plans, config)
    return shared.to(dtype=dtype)


def _build_sas_shared(plans: List[LayerPlan], config: SaSConfig) -> SaSShared:
    return SaSShared(
        config.rank, config.embed_dim, config.hyper_hidden, config.hyper_activation,
        down_shapes={p.down_key: p.in_features for p in plans},
        up_shapes={p.up_key: p.out_features for p in plans},
        num_layers=len(plans),
        num_tasks=config.num_tasks,
        config=config,
        layer_names=[p.name for p in plans],
    )


def _build_scaling_shared(plans: List[LayerPlan], config: ScalingConfig) -> ScalingShared:
    return ScalingShared(config, [p.name for p in plans], [(p.in_features, p.out_features) for p in plans])


def adapter_dtype(config: AdapterConfig, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`inject` gives a new adapter's tensors on a base of ``base_dtype`` (the kind decides)."""
    return kind_of(config, "config_class").adapter_dtype(base_dtype)


def _sas_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """A SaS adapter on a float16/bfloat16 base is float32 (master weights): each layer still computes in
    the base's dtype, ``SaSShared.layer_tensors`` casting A, B and h to it once per forward (as under
    FSDP's mixed-precision policy), and the optimizer updates float32 values, so small steps are not
    rounded away."""
    return torch.float32 if base_dtype in HALF_DTYPES else base_dtype


def _scaling_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """A scaling adapter multiplies the input by its scales itself and keeps the base's dtype."""
    return base_dtype


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace every targeted ``nn.Linear`` of ``model`` by an adapted layer, in place.

    With a :class:`SaSConfig` the layers are :class:`SaSLinear` and one :class:`SaSShared` (as
    ``model.sas_shared``) owns A/B per sharing group, one embedding per layer and the hypernetwork.
    With a :class:`ScalingConfig` they are :class:`ScalingLinear` and one :class:`ScalingShared` (under
    the same name) owns every layer's scales. Freezes every base parameter; unfreezes
    ``config.trainable_modules``.

    The adapter's tensors take the base weights' dtype, except that a SaS adapter on a float16/bfloat16
    base is float32 (:func:`adapter_dtype`). A Hugging Face model whose freshly initialised task head
    (``classifier``, ``score``, ``qa_outputs``) is left out of ``trainable_modules`` gets a warning: the
    head would stay at its random init.

    Args:
        model: the base model; its ``nn.Linear`` layers that ``config.targets`` names are adapted.
        config: a :class:`SaSConfig` (SaS) or a :class:`ScalingConfig` (SSL/SSB scaling).

    Returns:
        ``model`` itself, adapted.

    Raises:
        TypeError: ``config`` is neither config.
        ValueError: before the model changes: targets (or an entry of a targets list) that match no
            ``nn.Linear``, a ``trainable_modules`` entry that matches no module, a layer whose parent reads its
            weight directly, or a model that is already adapted.

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"]))
        >>> type(model[0]).__name__, model[0].base_layer.weight.requires_grad
        ('SaSLinear', False)
    """
    _inject(model, config)
    _warn_frozen_task_head(model, config)
    return model


def _inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """:func:`inject` without its advice (``sas.load_adapter`` injects a saved adapter as it was trained)."""
    kind = kind_of(config, "config_class")
    if kind is None:
        names = " or a ".join(k.config_class.__name__ for k in ADAPTER_KINDS)
        raise TypeError(f"inject takes a {names}, got {type(config).__name__}")
    plans = plan_injection(model, config)
    trainable = _trainable_modules(model, config)  # checked before the model changes
    modules = dict(model.named_modules(remove_duplicate=False))
    reference_weight = modules[plans[0].name].weight
    shared = build_shared(plans, config, reference_weight.device, adapter_dtype(config, reference_weight.dtype))
    model.requires_grad_(False)
    for index, plan in enumerate(plans):
        layer = kind.make_layer(modules[plan.name], shared, index, plan, config)
        for name in (plan.name,) + plan.aliases:
            parent_name, _, child_name = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child_name, layer)
    model.add_module(SHARED_ATTRIBUTE, shared)
    if getattr(config, "saved_input", "full") == "recompute":
        recompute.watch_producers(model)  # the layers rebuild inputs these produce (sas.recompute)
    for module in trainable:
        module.requires_grad_(True)
    return model


def _warn_frozen_task_head(model: nn.Module, config: AdapterConfig) -> None:
    """Warn when a Hugging Face model's task head stays frozen: ``from_pretrained`` initialises it at random
    (its weights are not in a base checkpoint), so a frozen one caps the adapted model at chance level."""
    if not type(model).__module__.startswith("transformers."):
        return
    frozen = [name for name, module in model.named_modules()
              if name.rpartition(".")[2] in HF_TASK_HEAD_NAMES and not isinstance(module, ADAPTER_MODULES)
              and any(True for _ in module.parameters())
              and not any(p.requires_grad for p in module.parameters())]
    if frozen:
        warnings.warn(f"{type(model).__name__}'s task head {frozen[0]!r} stays frozen: it is not in "
                      f"trainable_modules ({config.trainable_modules}), so it keeps its random initialisation; "
                      f"add it (trainable_modules=[{frozen[0]!r}]) unless it is trained already",
                      UserWarning, stacklevel=3)


def find_adapter(model: nn.Module) -> Optional[Union[SaSShared, ScalingShared]]:
    """The owner of ``model``'s adapter (``model.sas_shared``): SaS's or a scaling adapter's, else ``None``.
    Both hold the ``config`` and the ``layer_names`` the adapter was built with."""
    owner = getattr(model, SHARED_ATTRIBUTE, None)
    return owner if kind_of(owner, "owner_class") is not None else None


def _require_adapted(model: nn.Module) -> List[AdaptedLayer]:
    layers = [m for m in model.modules() if kind_of(m, "layer_class") is not None]
    if not layers:
        names = " or ".join(k.layer_class.__name__ for k in ADAPTER_KINDS)
        raise ValueError(f"model has no adapted layers ({names}); call sas.inject first")
    return layers


def _describe(layer: AdaptedLayer) -> str:
    """How merge and unmerge name a layer in their refusals."""
    return f"{layer.layer_index} ({kind_of(layer, 'layer_class').describe(layer)})"


def _refuse_tied_weights(model: nn.Module, layers: List[AdaptedLayer]) -> None:
    """Raise if a layer's frozen weight shares memory with any other tensor of the model.

    Merging writes into the weight in place, so a tied user (an embedding tied to an output head, or
    another adapted layer) would silently change too.
    """
    owners: Dict[tuple, Dict[tuple, str]] = {}  # storage -> {(module id, attribute): a name}
    for module_name, module in model.named_modules(remove_duplicate=False):
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for attribute, tensor in tensors:
            if tensor.numel() and tensor.device.type != "meta":
                storage = (tensor.device, tensor.untyped_storage().data_ptr())
                name = f"{module_name}.{attribute}" if module_name else attribute
                owners.setdefault(storage, {}).setdefault((id(module), attribute), name)
    for layer in layers:
        weight = layer.base_layer.weight
        if not weight.numel() or weight.device.type == "meta":
            continue
        users = owners.get((weight.device, weight.untyped_storage().data_ptr()), {})
        own = users.get((id(layer.base_layer), "weight"), "base_layer.weight")
        others = sorted(name for key, name in users.items() if key != (id(layer.base_layer), "weight"))
        if others:
            raise ValueError(f"refusing to merge: the frozen weight {own!r} shares its memory with {others} "
                             f"(tied weights), which merging would change too; untie them first (e.g. give "
                             f"the layer its own copy: nn.Parameter(weight.detach().clone())) or keep the "
                             f"model unmerged")


def merge(model: nn.Module, task: Optional[int] = None) -> nn.Module:
    """Fold every layer's ``s * B diag(h_l) A`` into its frozen weight (zero-overhead inference); for a
    scaling adapter, replace it by ``b[:, None] * W0 * a[None, :]`` (SSB; ``W0 * a[None, :]`` for SSL).

    With ``num_tasks > 1`` name the task: ``h_{task,l}`` is folded in and the merged model serves that
    task only (a ``sas.tasks`` context asking for another task is refused while merged).
    :func:`unmerge` gives back the multi-task model.

    All updates are computed and checked before any weight changes, so a refusal leaves the model
    untouched. Merging twice warns and does nothing.

    - Each layer keeps a copy of its weight as it was, so :func:`unmerge` restores the frozen weights
      bit for bit, also after the adapter changed while merged. The copies cost one more copy of
      every adapted weight until unmerge.
    - A frozen weight that shares memory with another tensor (tied weights) is refused: merging
      would change the other user too.
    - The merged state is saved with the weights: every ``SaSLinear`` has a boolean buffer
      ``sas_merged`` in the ``state_dict``. Loading a merged model's ``state_dict`` into an injected
      model marks its layers merged, so the update is not applied twice; such a model cannot be
      unmerged (its pre-merge weights are not in the state), it serves merged inference.

    Args:
        model: an adapted model (:func:`inject`).
        task: the task to fold in; required when the adapter has ``num_tasks > 1``, else ``None``.

    Returns:
        ``model`` itself, merged.

    Raises:
        ValueError: nothing changed: a model without adapted layers, ``task=None`` with ``num_tasks > 1``
            (or a task on an adapter without tasks), a model merged for another task, a ``sas.tasks`` context
            for another task open in any thread, a tied frozen weight, a non-finite update or a merged weight
            that overflows its dtype, FSDP-sharded weights.

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"]))
        >>> x = torch.randn(3, 8)
        >>> adapted = model(x)
        >>> torch.allclose(sas.merge(model)(x), adapted, atol=1e-6)
        True
    """
    layers = _require_adapted(model)
    refuse_sharded_weights(layers, "merge")
    shared = layers[0].shared
    kind = kind_of(shared, "owner_class")
    task = kind.merge_task(shared, task, "merge it")
    merged_for = {layer.merged_task for layer in layers if layer.merged}
    if merged_for - {task}:
        raise ValueError(f"refusing to merge task {task}: the model is merged for task {sorted(merged_for)[0]}; "
                         f"call sas.unmerge(model) first")
    pending = [layer for layer in layers if not layer.merged]
    if not pending:
        warnings.warn("model is already merged; merge() did nothing", UserWarning, stacklevel=2)
        return model
    kind.refuse_other_task_contexts(shared, task)
    _refuse_tied_weights(model, pending)
    for layer in pending:
        reason = layer.merge_refusal(task)
        if reason is not None:
            raise ValueError(f"refusing to merge: layer {_describe(layer)}: {reason}")
    for layer in pending:
        layer.merge(task)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: put every frozen weight back exactly as it was before merging.

    Every layer is checked before any changes, so a refusal leaves the whole model merged.

    Args:
        model: an adapted model merged by :func:`merge` (an unmerged model is returned as it is).

    Returns:
        ``model`` itself, unmerged.

    Raises:
        ValueError: the whole model stays merged: the current update is non-finite, or a weight was loaded
            or written since merge, so that what merge remembered no longer describes it.

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"]))
        >>> frozen = model[0].base_layer.weight.clone()
        >>> torch.equal(sas.unmerge(sas.merge(model))[0].base_layer.weight, frozen)
        True
    """
    layers = [layer for layer in _require_adapted(model) if layer.merged]
    refuse_sharded_weights(layers, "unmerge")
    for layer in layers:
        reason = layer.unmerge_refusal()
        if reason is not None:
            raise ValueError(f"refusing to unmerge layer {_describe(layer)}: {reason}")
    for layer in layers:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, task: Optional[int] = None) -> nn.Module:
    """Fold the adapter into the frozen weights and take it out: the plain base model, for serving or export.

    Every adapted layer (:class:`SaSLinear`, SSL/SSB :class:`ScalingLinear`) is replaced, under every name
    it is reachable by, by its own ``nn.Linear`` holding ``W0 + update`` (the weight :func:`merge` writes);
    ``model.sas_shared`` and the layers' buffers and hooks go with them. ``save_pretrained``/``state_dict``
    then hold the keys of the unadapted architecture (``...query.weight``, not ``...base_layer.weight``), so
    the result loads into a fresh base model (``from_pretrained``, ``load_state_dict``) with the adapted
    outputs. ``trainable_modules`` stay as trained; which parameters require grad is left as it is. A model
    already merged (for this task) is unloaded as it is. Unlike :func:`merge` no copy of the weights is kept:
    the base weights are gone; use :func:`unload` for them.

    Args:
        model: an adapted model, or an adapted layer itself.
        task: the task to keep; required when the adapter has ``num_tasks > 1``.

    Returns:
        ``model`` without its adapter (the base ``nn.Linear`` when ``model`` is itself an adapted layer).

    Raises:
        ValueError: as :func:`merge` refuses, before anything changes: FSDP shards, ``task=None`` with
            ``num_tasks > 1``, tied weights, a non-finite update or one that overflows the weight's dtype.

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"]))
        >>> x = torch.randn(3, 8)
        >>> adapted = model(x)
        >>> plain = sas.merge_and_unload(model)
        >>> type(plain[0]).__name__, torch.allclose(plain(x), adapted, atol=1e-6)
        ('Linear', True)
    """
    layers = _require_adapted(model)
    refuse_sharded_weights(layers, "merge_and_unload")
    shared = layers[0].shared
    kind = kind_of(shared, "owner_class")
    task = kind.merge_task(shared, task, "call merge_and_unload")
    kind.refuse_other_task_contexts(shared, task)
    merged_for = {layer._merged_task for layer in layers if layer.merged}
    if merged_for - {task}:
        raise ValueError(f"refusing to merge task {task}: the model is merged for task {sorted(merged_for)[0]}; "
                         f"call sas.unmerge(model) first")
    pending = [layer for layer in layers if not layer.merged]
    _refuse_tied_weights(model, pending)
    folded = []
    for layer in pending:
        weight, reason = layer._fold(task)
        if reason is not None:
            raise ValueError(f"refusing to merge: layer {_describe(layer)}: {reason}")
        folded.append(weight)
    with torch.no_grad():
        for layer, weight in zip(pending, folded):
            with _writable(layer.base_layer.weight):
                layer.base_layer.weight.copy_(weight)
    return _take_out_adapter(model, layers)


def unload(model: nn.Module) -> nn.Module:
    """Take the adapter out without folding it: the base model back, its weights bit for bit as before
    :func:`sas.inject`.

    Merged layers are unmerged first. Each adapted layer is replaced by its ``nn.Linear``;
    ``model.sas_shared`` is removed. Which parameters require grad is left as it is.

    Args:
        model: an adapted model, or an adapted layer itself.

    Returns:
        ``model`` without its adapter (the base ``nn.Linear`` for an adapted layer).

    Raises:
        ValueError: nothing changed: FSDP shards, or a merged layer that :func:`unmerge` refuses (a merged
            weight that was loaded, not merged here, has no known base).

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> base = nn.Sequential(nn.Linear(8, 8))
        >>> x = torch.randn(3, 8)
        >>> before = base(x)
        >>> model = sas.inject(base, sas.SaSConfig(rank=2, targets=["0"]))
        >>> torch.equal(sas.unload(model)(x), before)
        True
    """
    layers = _require_adapted(model)
    refuse_sharded_weights(layers, "unload")
    if any(layer.merged for layer in layers):
        unmerge(model)
    return _take_out_adapter(model, layers)


def _take_out_adapter(model: nn.Module, layers: List[AdaptedLayer]) -> nn.Module:
    """Put each layer's ``base_layer`` where the layer was, under every name, and drop the shared owner."""
    if kind_of(model, "layer_class") is not None:
        return model.base_layer
    adapted = {id(layer) for layer in layers}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in adapted:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, module.base_layer)
    if find_adapter(model) is not None:
        delattr(model, SHARED_ATTRIBUTE)
    recompute.unwatch_producers(model)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """A context in which ``model`` computes as its base model.

    Every adapted layer runs its frozen ``nn.Linear`` alone, so outputs equal the unadapted model's exactly
    (no ``sas.tasks`` context needed). ``trainable_modules`` are not adapter layers: they stay as trained (no
    copy of their initial values is kept). Nothing is moved or copied: the module tree, ``state_dict`` and
    parameters stay as they are, and on exit (also on an exception) the adapter is back.

    Args:
        model: an adapted model.

    Yields:
        ``model``, computing as its base model until the block ends.

    Raises:
        ValueError: a merged model (its frozen weights hold the update): :func:`unmerge` it first.

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> base = nn.Sequential(nn.Linear(8, 8))
        >>> x = torch.randn(3, 8)
        >>> before = base(x)
        >>> model = sas.inject(base, sas.SaSConfig(rank=2, targets=["0"]))
        >>> with sas.disable_adapter(model):
        ...     torch.equal(model(x), before)
        True
    """
    layers = _require_adapted(model)
    if any(layer.merged for layer in layers):
        raise ValueError("model is merged: its frozen weights hold the adapter's update, so disabling the adapter "
                         "cannot give the base model; call sas.unmerge(model) first")
    # An instance attribute `forward` wins over the class's for nn.Module.__call__; kept, so contexts nest.
    previous = [(layer, layer.__dict__.get("forward")) for layer in layers]
    for layer in layers:
        layer.__dict__["forward"] = layer.base_layer.forward
    try:
        yield model
    finally:
        for layer, forward in previous:
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = forward


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once."""
    params = list(model.parameters())  # nn.Module.parameters() already yields each tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_table(model: nn.Module) -> List[Tuple[str, str, int]]:
    """Rows ``(name, shape, count)`` of every trainable tensor."""
    return [(n, "x".join(map(str, p.shape)), p.numel()) for n, p in model.named_parameters() if p.requires_grad]


def print_trainable_parameters(model: nn.Module) -> None:
    """Print every trainable tensor, then trainable / total and the adapter's share of the base model."""
    rows = parameter_table(model)
    width = max([len(n) for n, _, _ in rows] + [9])
    print(f"{'parameter':<{width}}  {'shape':>12}  {'count':>10}")
    for name, shape, count in rows:
        print(f"{name:<{width}}  {shape:>12}  {count:>10,}")
    trainable, total = count_parameters(model)
    owner = find_adapter(model)
    adapter = sum(p.numel() for p in owner.parameters()) if owner is not None else 0
    label = kind_of(owner, "owner_class").label(owner) if owner is not None else SAS.label(owner)
    base = total - adapter
    print(f"trainable: {trainable:,} || total: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
          f" || {label} extra: {adapter:,} ({100 * adapter / max(base, 1):.4f}% of the base model)")


# ---------------------------------------------------------------------------------------------- adapter kinds

def _check_tasks(shared: SaSShared, task: Optional[int], how: str) -> Optional[int]:
    return check_task(shared, task)


def _no_tasks(shared: ScalingShared, task: Optional[int], how: str) -> None:
    if task is not None:
        raise ValueError(f"a {shared.kind} adapter has no tasks; {how} with task=None, got task={task!r}")
    return None


def _no_task_contexts(shared: ScalingShared, task: Optional[int]) -> None:
    return None  # a scaling adapter has no tasks, so no sas.tasks context can ask for another


@dataclass(frozen=True)
class AdapterKind:
    """One adapter method behind the hooks :func:`inject`, :func:`merge`, :func:`unmerge`, :func:`unload`,
    :func:`merge_and_unload`, :mod:`sas.io` and :func:`print_trainable_parameters` call, as PEFT's base tuner
    puts each method behind ``_create_and_replace``, merge, unmerge and unload. Folding a layer's update in
    and taking it out again are the layer's own :class:`sas._merge_state.MergeableLinear` hooks."""

    #: The ``adapter_kind`` a saved description carries (:data:`sas.scaling.ADAPTER_CONFIGS`).
    name: str
    config_class: type
    #: The module registered as ``model.sas_shared`` that owns every tensor of the adapter once.
    owner_class: type
    #: The module that replaces each adapted ``nn.Linear``.
    layer_class: type
    #: Every module class the adapter adds (a model holding one is adapted already).
    modules: Tuple[type, ...]
    #: ``(config, [(name, linear)], {name: aliases}) -> [LayerPlan]``: the targeted layers and their shared keys.
    plan: Callable[..., List[LayerPlan]]
    #: ``(plans, config) -> owner``, built under the target device.
    build_shared: Callable[..., nn.Module]
    #: ``base dtype -> dtype of the adapter's tensors``.
    adapter_dtype: Callable[[torch.dtype], torch.dtype]
    #: ``(linear, owner, index, plan, config) -> layer``.
    make_layer: Callable[..., nn.Module]
    #: ``layer -> str``: how refusals name the layer (after its index).
    describe: Callable[[nn.Module], str]
    #: ``(owner, task, how) -> task``: the task merging folds in, checked (``how`` completes the refusal).
    merge_task: Callable[..., Optional[int]]
    #: ``(owner, task)``: raise while a ``sas.tasks`` context for another task is open.
    refuse_other_task_contexts: Callable[..., None]
    #: ``owner -> str``: the adapter's name in :func:`print_trainable_parameters`.
    label: Callable[[Optional[nn.Module]], str]


SAS = AdapterKind(
    "sas", SaSConfig, SaSShared, SaSLinear, (SaSLinear, SaSShared, HyperNetwork), _plan_sas, _build_sas_shared,
    _sas_dtype,
    lambda linear, shared, index, plan, config: SaSLinear(linear, shared, index, plan.down_key, plan.up_key,
                                                          config.scale, layer_op=config.layer_op),
    lambda layer: f"{layer.down_key}/{layer.up_key}", _check_tasks, refuse_open_contexts_for_other_tasks,
    lambda owner: "SaS")
SCALING = AdapterKind(
    "scaling", ScalingConfig, ScalingShared, ScalingLinear, (ScalingLinear, ScalingShared), _plan_scaling,
    _build_scaling_shared, _scaling_dtype,
    lambda linear, shared, index, plan, config: ScalingLinear(linear, shared, index),
    lambda layer: layer.name, _no_tasks, _no_task_contexts, lambda owner: owner.kind.upper())
ADAPTER_KINDS = (SAS, SCALING)
#: Every module class an adapter of any kind adds.
ADAPTER_MODULES = tuple(module for kind in ADAPTER_KINDS for module in kind.modules)


def kind_of(obj, role: str) -> Optional[AdapterKind]:
    """The adapter kind whose ``role`` class (``"config_class"``, ``"owner_class"`` or ``"layer_class"``)
    ``obj`` is an instance of, else ``None``."""
    return next((kind for kind in ADAPTER_KINDS if isinstance(obj, getattr(kind, role))), None)

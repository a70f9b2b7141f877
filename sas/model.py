"""Whole-model operations: inject SaS into any ``nn.Module``, merge/unmerge, count parameters."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from .config import SaSConfig
from .layer import SaSLinear, SaSShared, adapted_layers, find_shared

SHARED_ATTRIBUTE = "sas_shared"


@dataclass(frozen=True)
class LayerPlan:
    """Where one adapted layer sits and which shared tensors it uses."""

    name: str
    in_features: int
    out_features: int
    down_key: str
    up_key: str


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _role(name: str, config: SaSConfig) -> str:
    """The target pattern a layer matched; for a regex target, its name with layer indices removed."""
    if isinstance(config.targets, str):
        return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)
    return next(t for t in config.targets if _matches(name, t))


def _key(text: str) -> str:
    """A ParameterDict key (no dots allowed) that still reads like the role."""
    return re.sub(r"[^0-9A-Za-z_]", "_", text.replace("*", "N"))


def _is_target(name: str, config: SaSConfig) -> bool:
    if isinstance(config.targets, str):
        return re.fullmatch(config.targets, name) is not None
    return any(_matches(name, t) for t in config.targets)


def plan_injection(model: nn.Module, config: SaSConfig) -> List[LayerPlan]:
    """Which Linear layers ``config`` adapts in ``model`` and their shared keys; changes nothing."""
    if find_shared(model) is not None:
        raise ValueError("model already has SaS injected; inject into a fresh base model")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, SaSLinear)]
    chosen = [(n, m) for n, m in linears if _is_target(n, config)]
    if not chosen:
        names = ", ".join(n for n, _ in linears) or "(none)"
        raise ValueError(f"targets {config.targets!r} match no nn.Linear in the model; its Linear layers are: {names}")
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
    for name, module in chosen:
        group, shape = group_of[name]
        if len(shapes_per_group[group]) > 1:
            group = f"{group}_{shape[0]}x{shape[1]}"
        down = f"in{shape[0]}" if config.share_down_by_input_dim else group
        plans.append(LayerPlan(name, shape[0], shape[1], down, group))
    return plans


def _trainable_modules(model: nn.Module, config: SaSConfig) -> List[nn.Module]:
    """The modules ``config.trainable_modules`` names; raises for an entry that matches none."""
    modules = []
    for pattern in config.trainable_modules:
        hits = [m for n, m in model.named_modules() if n and _matches(n, pattern)]
        if not hits:
            raise ValueError(f"trainable_modules entry {pattern!r} matches no module of the model")
        modules.extend(hits)
    return modules


def build_shared(plans: List[LayerPlan], config: SaSConfig, device, dtype) -> SaSShared:
    """The shared owner for ``plans``; on the meta device it only describes keys and shapes."""
    with torch.device(device):
        shared = SaSShared(
            config.rank, config.embed_dim, config.hyper_hidden, config.hyper_activation,
            down_shapes={p.down_key: p.in_features for p in plans},
            up_shapes={p.up_key: p.out_features for p in plans},
            num_layers=len(plans),
        )
    return shared.to(dtype=dtype)


def inject(model: nn.Module, config: SaSConfig) -> nn.Module:
    """Replace every targeted ``nn.Linear`` of ``model`` by a :class:`SaSLinear`, in place.

    Creates one :class:`SaSShared` (as ``model.sas_shared``) owning A/B per sharing
    group, one embedding per layer and the hypernetwork; freezes every base
    parameter; unfreezes ``config.trainable_modules``. Returns ``model``. Bad targets or
    ``trainable_modules`` raise before the model changes.
    """
    plans = plan_injection(model, config)
    trainable = _trainable_modules(model, config)  # checked before the model changes
    reference_weight = dict(model.named_modules())[plans[0].name].weight
    shared = build_shared(plans, config, reference_weight.device, reference_weight.dtype)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for index, plan in enumerate(plans):
        parent_name, _, child_name = plan.name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = SaSLinear(modules[plan.name], shared, index, plan.down_key, plan.up_key, config.scale,
                          layer_op=config.layer_op)
        setattr(parent, child_name, layer)
    model.add_module(SHARED_ATTRIBUTE, shared)
    model.register_forward_pre_hook(shared.begin_forward)
    model.register_forward_hook(shared.end_forward, always_call=True)
    shared.config = config
    shared.layer_names = [p.name for p in plans]
    for module in trainable:
        module.requires_grad_(True)
    return model


def _require_adapted(model: nn.Module) -> List[SaSLinear]:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no SaSLinear layers; call sas.inject first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every layer's ``s * B diag(h_l) A`` into its frozen weight (zero-overhead inference).

    All updates are computed and checked before any weight changes, so a
    non-finite update leaves the model untouched. Merging twice warns and does nothing.
    """
    layers = _require_adapted(model)
    pending = [layer for layer in layers if not layer.merged]
    if not pending:
        warnings.warn("model is already merged; merge() did nothing", UserWarning, stacklevel=2)
        return model
    with torch.no_grad():
        for layer in pending:
            if not torch.isfinite(layer.delta_weight()).all():
                raise ValueError(f"refusing to merge: the SaS update of layer {layer.layer_index} "
                                 f"({layer.down_key}/{layer.up_key}) contains NaN or Inf")
    for layer in pending:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: subtract every folded update again."""
    for layer in _require_adapted(model):
        if layer.merged:
            layer.unmerge()
    return model


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
    shared = find_shared(model)
    adapter = sum(p.numel() for p in shared.parameters()) if shared is not None else 0
    base = total - adapter
    print(f"trainable: {trainable:,} || total: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
          f" || SaS extra: {adapter:,} ({100 * adapter / max(base, 1):.4f}% of the base model)")

"""SSL and SSB: scale a frozen ``nn.Linear``'s input columns (SSL), or its input columns and output rows
(SSB), with learned vectors (Si, Yang, Shen, arXiv 2407.05417; docs/subspace.md).

With the frozen layer ``y = x @ W0.T + b0`` and ``W0`` of shape ``(d_out, d_in)``:

* SSL: ``W = W0 * a[None, :]``, so ``y = (a * x) @ W0.T + b0``; ``a`` is ``(d_in,)``.
* SSB: ``W = b[:, None] * W0 * a[None, :]``, so ``y = b * ((a * x) @ W0.T) + b0``; ``b`` is ``(d_out,)``.

Both scales start at ones (the adapted model is the base model), the bias is never scaled, and both
merge into ``W0``. The adapter's tensors live once in a :class:`ScalingShared` owner (``model.sas_shared``,
the attribute a SaS adapter's owner has), one ``a`` (and ``b``) per adapted layer, so saving, loading and
the state_dict keys work as for SaS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from ._merge_state import MergeableLinear
from .config import VIT_TARGETS, JsonConfig, SaSConfig, _check_choice

SCALING_KINDS = ("ssl", "ssb")


@dataclass
class ScalingConfig(JsonConfig):
    """Configuration of an SSL or SSB adapter (docs/subspace.md).

    Every field's ``metadata["help"]`` says what it does; ``__post_init__`` rejects bad values with a
    message naming the field. The fields SaS has too are checked by :class:`sas.SaSConfig`'s rules.
    """

    kind: Optional[str] = field(
        default=None,
        metadata={"help": f"Which scaling, one of {SCALING_KINDS}: 'ssl' learns a (d_in,) per layer and computes "
                          "y = (a * x) @ W0.T + b0; 'ssb' also learns b (d_out,): y = b * ((a * x) @ W0.T) + b0."})
    targets: Union[str, List[str]] = field(
        default_factory=lambda: list(VIT_TARGETS),
        metadata={"help": "Which nn.Linear modules to adapt. A str is a regex that must fully match the module "
                          "name; a list holds exact module names or dotted suffixes (e.g. 'attn.qkv')."})
    trainable_modules: List[str] = field(
        default_factory=list,
        metadata={"help": "Names or dotted suffixes of extra modules that stay trainable, e.g. ['head']."})
    base_model_name: Optional[str] = field(
        default=None, metadata={"help": "Architecture the adapter was made for; checked on load when set."})

    def __post_init__(self):
        _check_choice("kind", self.kind, SCALING_KINDS)
        common = SaSConfig(targets=self.targets, trainable_modules=self.trainable_modules,
                           base_model_name=self.base_model_name)
        self.targets, self.trainable_modules = common.targets, common.trainable_modules


# ------------------------------------------------------------------------------------------ the maths

def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], input_scale: torch.Tensor,
                  output_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fast path: ``output_scale * ((x * input_scale) @ weight.T) + bias`` (SSL when ``output_scale`` is None).

    The scales act on the activations around the one frozen GEMM, so the backward is that GEMM's
    ``dx`` alone plus O(rows * width) elementwise work (no weight-sized gradient). Under autocast the
    output has the GEMM's dtype, as an ``nn.Linear``'s has.
    """
    if output_scale is None:
        return F.linear(x * input_scale, weight, bias)
    product = F.linear(x * input_scale, weight)
    scaled = product * output_scale.to(product.dtype)
    # In place: the product's backward reads its inputs, not its output (addcmul's backward costs two more
    # multiplications than mul's, one more op in all).
    return scaled if bias is None else scaled.add_(bias)


def scaled_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            input_scale: torch.Tensor, output_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle, plain autograd written as the method is defined: ``F.linear`` with the scaled weight
    ``W = output_scale[:, None] * weight * input_scale[None, :]``. Exact in float64."""
    return F.linear(x, scaled_weight(weight, input_scale, output_scale), bias)


def scaled_weight(weight: torch.Tensor, input_scale: torch.Tensor,
                  output_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``output_scale[:, None] * weight * input_scale[None, :]`` (``weight * input_scale`` for SSL)."""
    folded = weight * input_scale
    return folded if output_scale is None else output_scale[:, None] * folded


# ------------------------------------------------------------------------------------------ modules

class ScalingShared(nn.Module):
    """Owns every scale of a model once: ``input_scale[i]`` (d_in,) and, for SSB, ``output_scale[i]``
    (d_out,) of adapted layer ``i`` (``layer_names[i]``), all starting at ones. Layers hold a plain
    reference to it, as SaS layers do to :class:`sas.SaSShared`."""

    def __init__(self, config: ScalingConfig, layer_names: List[str], shapes: List[Tuple[int, int]]):
        super().__init__()
        self.config = config
        self.layer_names = list(layer_names)
        self.input_scale = nn.ParameterList([nn.Parameter(torch.ones(d_in)) for d_in, _ in shapes])
        self.output_scale = nn.ParameterList(
            [nn.Parameter(torch.ones(d_out)) for _, d_out in shapes] if config.kind == "ssb" else [])

    @property
    def kind(self) -> str:
        return self.config.kind

    def forward(self, inputs):
        """Pass ``inputs`` through unchanged: a container that calls every child (``nn.Sequential``) calls
        the owner too, and it must not change the output."""
        return inputs

    def scales(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(input_scale, output_scale)`` of layer ``index``; the output scale is None for SSL."""
        key = str(index)
        # Read through the lists' dicts: this runs on every layer call, and ParameterList.__getitem__ and
        # nn.Module.__getattr__ cost more than the rest of the lookup.
        modules = self._modules
        return (modules["input_scale"]._parameters[key], modules["output_scale"]._parameters.get(key))


class ScalingLinear(MergeableLinear):
    """A frozen ``nn.Linear`` (kept as ``base_layer``) with SSL or SSB scales from the shared owner:

    ``y = b * ((a * x) @ W0.T) + b0`` (SSB), ``y = (a * x) @ W0.T + b0`` (SSL).

    Merging folds the scales into ``W0`` and keeps a copy of it, so unmerging restores it bit for bit;
    the merged flag is the ``sas_merged`` buffer of the ``state_dict``, as for :class:`sas.SaSLinear`.
    """

    def __init__(self, base_layer: nn.Linear, shared: ScalingShared, layer_index: int):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"ScalingLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # referenced, not registered: each scale is saved once
        self.layer_index = layer_index
        self._signature: Optional[tuple] = None  # the last input signature forward() validated and routed
        self._route = None  # scaled_linear, or the oracle where the reference backend is forced
        self._init_merge_state(base_layer.weight.device)  # see MergeableLinear; no tasks: _merged_task stays None

    @property
    def kind(self) -> str:
        return self.shared.kind

    @property
    def name(self) -> str:
        """The module name the layer was adapted under."""
        return self.shared.layer_names[self.layer_index]

    def scales(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.shared.scales(self.layer_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged:
            return self.base_layer(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ScalingLinear takes x as a torch.Tensor, got {type(x).__name__}")
        base_parameters = self._modules["base_layer"]._parameters
        weight, bias = base_parameters["weight"], base_parameters["bias"]
        input_scale, output_scale = self.shared.scales(self.layer_index)
        if torch.compiler.is_compiling():  # traced: checked in the graph, nothing cached on the module
            run = self._checked_route(x, weight)
        else:  # full checks and the route once per input signature, then none
            try:
                signature = (x.dtype, x.device, x.dim(), x.shape[-1], torch.is_autocast_enabled(x.device.type),
                             backends.route_key())
            except Exception:  # a 0-dim x has no shape[-1], a meta x no autocast state: name the problem
                self._checked_route(x, weight)
                raise
            if signature != self._signature:
                self._route = self._checked_route(x, weight)
                self._signature = signature
            run = self._route
        return run(x, weight, bias, input_scale, output_scale)

    def _checked_route(self, x: torch.Tensor, weight: torch.Tensor):
        """Validate ``x`` against the frozen layer and pick the route: the oracle where the reference backend
        is forced (``sas.set_backend("reference")``, ``SAS_BACKEND=reference``), else the fast path (plain
        ATen ops, the same on every device and backend, also where no kernel backend is built)."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"ScalingLinear takes x of shape (..., in_features={self.in_features}), "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"ScalingLinear takes a floating-point x, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"device mismatch: x is on {x.device} but ScalingLinear's weights are on "
                             f"{weight.device}")
        backends.compute_dtype(x, weight)  # outside autocast x must have the weight's dtype
        if backends.is_oracle(backends.get_backend()):
            return scaled_linear_reference
        return scaled_linear

    # -- merge (MergeableLinear: the copy kept at merge, the flag, unmerge) ------------------------------

    @torch.no_grad()
    def _fold(self, task: Optional[int]) -> Tuple[Optional[torch.Tensor], Optional[str]]:
        """``(the merged weight, None)``, or ``(None, why merging would refuse)``. The product is formed in
        float32 (float64 for a float64 weight), then rounded once to the weight's dtype."""
        if task is not None:
            return None, f"a {self.kind} adapter has no tasks; merge it with task=None, got task={task!r}"
        input_scale, output_scale = self.scales()
        if not all(torch.isfinite(s).all() for s in (input_scale, output_scale) if s is not None):
            return None, "the scales contain NaN or Inf"
        weight = self.base_layer.weight
        wide = torch.promote_types(weight.dtype, torch.float32)
        folded = scaled_weight(weight.to(wide), input_scale.to(wide),
                               None if output_scale is None else output_scale.to(wide)).to(weight.dtype)
        if (torch.isfinite(weight) & ~torch.isfinite(folded)).any():
            return None, (f"the merged weight overflows {weight.dtype} (an entry of the scaled W0 is beyond "
                          f"{torch.finfo(weight.dtype).max:g}); keep the model unmerged or merge it in a wider "
                          f"dtype (e.g. model.float())")
        return folded, None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"layer={self.layer_index}, merged={self.merged}")


def scaling_layers(model: nn.Module) -> List[ScalingLinear]:
    return [m for m in model.modules() if isinstance(m, ScalingLinear)]


# ------------------------------------------------------------------------------------------ saved descriptions

#: The config class of each ``adapter_kind`` a saved adapter's description names. Descriptions written
#: before scaling adapters existed name none: they hold a SaS adapter.
ADAPTER_CONFIGS = {"sas": SaSConfig, "scaling": ScalingConfig}


def adapter_kind(config: Union[SaSConfig, ScalingConfig]) -> str:
    """The ``adapter_kind`` a description of an adapter built from ``config`` carries."""
    return next(kind for kind, cls in ADAPTER_CONFIGS.items() if isinstance(config, cls))


def config_from_description(description: dict) -> Union[SaSConfig, ScalingConfig]:
    """The config of a saved adapter's (checked) description, of the class its ``adapter_kind`` names."""
    kind = description.get("adapter_kind", "sas")
    if not isinstance(kind, str) or kind not in ADAPTER_CONFIGS:
        raise ValueError(f"field 'adapter_kind' must be one of {tuple(ADAPTER_CONFIGS)}, got {kind!r}")
    return ADAPTER_CONFIGS[kind].from_dict(description["config"])

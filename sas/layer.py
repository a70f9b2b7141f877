"""``SaSLinear``: a frozen ``nn.Linear`` plus the SaS update, with A/B and h from the shared owner."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from . import _task_state, backends, recompute, validation
from ._merge_state import MergeableLinear
from .config import DEFAULT_SAVED_INPUT, SAVED_INPUT_CHOICES, SaSConfig, _check_choice, canonical_layer_op
from .shared import SaSShared


class SaSLinear(MergeableLinear):
    """A frozen ``nn.Linear`` (kept as ``base_layer``) plus the SaS update

    ``y = base_layer(x) + s * ((x @ A.T) * h_l) @ B.T``

    with ``A``/``B`` taken from the shared owner and ``h_l`` from its hypernetwork.
    The shared owner is referenced, not registered, so each shared tensor appears
    once in the model's ``state_dict`` (under the owner's name).
    """

    def __init__(self, base_layer: nn.Linear, shared: SaSShared, layer_index: int,
                 down_key: str, up_key: str, scale: float, owns_shared: bool = False, layer_op: str = "kernels",
                 saved_input: Optional[str] = None):
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
        self.layer_op = canonical_layer_op(layer_op)  # "kernels" or "fold": see SaSConfig.layer_op
        if saved_input is None:  # the shared owner's config decides (inject), else the default
            saved_input = shared.config.saved_input if shared.config is not None else DEFAULT_SAVED_INPUT
        _check_choice("saved_input", saved_input, SAVED_INPUT_CHOICES)
        self.saved_input = saved_input  # what the backward keeps of x: see SaSConfig.saved_input
        self._signature: Optional[tuple] = None  # the last input signature forward() validated and routed
        self._route = None  # what runs for that signature
        self._init_merge_state(base_layer.weight.device)  # see MergeableLinear

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, scale: float = 1.0, embed_dim: int = 8,
                    hyper_hidden: int = 32, hyper_activation: str = "tanh", layer_op: str = "kernels",
                    saved_input: str = DEFAULT_SAVED_INPUT, train_down: bool = True) -> "SaSLinear":
        """A standalone adapted layer that owns its own A, B and hypernetwork (for single-layer use).

        ``linear`` is frozen and wrapped; the adapter's tensors take its device and dtype.

        Args:
            linear: the ``nn.Linear`` to adapt.
            rank, scale, embed_dim, hyper_hidden, hyper_activation, layer_op, saved_input, train_down: as the
                :class:`sas.SaSConfig` fields of those names, checked as it checks them.

        Returns:
            A :class:`SaSLinear` around ``linear``.

        Raises:
            ValueError: an argument :class:`sas.SaSConfig` refuses (a non-positive rank, a non-finite scale, an
                unknown ``saved_input``, ...).

        Example:
            >>> import torch, sas
            >>> from torch import nn
            >>> layer = sas.SaSLinear.from_linear(nn.Linear(8, 4), rank=2)
            >>> layer(torch.randn(3, 8)).shape, layer.base_layer.weight.requires_grad
            (torch.Size([3, 4]), False)
        """
        config = SaSConfig(rank=rank, scale=scale, embed_dim=embed_dim, hyper_hidden=hyper_hidden,
                           hyper_activation=hyper_activation, layer_op=layer_op, saved_input=saved_input,
                           train_down=train_down)
        shared = SaSShared(config.rank, config.embed_dim, config.hyper_hidden, config.hyper_activation,
                           {"layer": linear.in_features}, {"layer": linear.out_features}, 1)
        shared.to(device=linear.weight.device, dtype=linear.weight.dtype)
        shared.down.requires_grad_(config.train_down)
        linear.requires_grad_(False)
        return cls(linear, shared, 0, "layer", "layer", config.scale, owns_shared=True, layer_op=config.layer_op,
                   saved_input=config.saved_input)

    @property
    def A(self) -> torch.Tensor:
        return self.shared.down[self.down_key]

    @property
    def B(self) -> torch.Tensor:
        return self.shared.up[self.up_key]

    def modulation(self) -> torch.Tensor:
        return self.shared.modulation(self.layer_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged:
            return self.base_layer(x)
        try:
            task = _task_state.layer_tasks(self.shared, x)  # None, one task (int) or one id per batch element
            base_parameters = self._modules["base_layer"]._parameters  # not __getattr__: see modulation_sources
            weight, bias = base_parameters["weight"], base_parameters["bias"]
            dtype = backends.compute_dtype(x, weight)
            A, B, h = self.shared.layer_tensors(self.layer_index, self.down_key, self.up_key, dtype)
            h, task_ids = _task_modulation(h, task)
            # What this call keeps of x, as the saved_input its route runs: sas.recompute decides per call.
            saved_input, rebuild = ("full", None) if self.saved_input == "full" else \
                recompute.saved_form(self, x, A, dtype)
            if torch.compiler.is_compiling():  # traced: checked in the graph, nothing cached on the module
                run = self._checked_route(x, weight, bias, A, B, h, task_ids, dtype, True, saved_input)
            else:  # full checks and the route once per input signature, then none
                signature = (x.dtype, x.device, x.dim(), x.shape[-1], dtype, h.shape, task_ids is None,
                             weight.requires_grad, bias is not None and bias.requires_grad,
                             torch.is_autocast_enabled(x.device.type), saved_input, backends.route_key())
                if signature != self._signature:
                    self._route = self._checked_route(x, weight, bias, A, B, h, task_ids, dtype, False, saved_input)
                    self._signature = signature
                run = self._route
            if rebuild is not None:
                return recompute.run_rebuilding(run, rebuild, x, dtype, weight, bias, A, B, h, self.scale, task_ids)
            return run(x, weight, bias, A, B, h, self.scale, task_ids)
        except Exception:
            # A bad x fails somewhere inside (an IndexError for a 0-dim x, an autocast error for a meta
            # one): name it instead. The check runs only after a failure (a try costs nothing), so the
            # hot path pays nothing for it.
            problem = self._input_problem(x)
            if problem is not None:
                raise problem from None
            raise

    def _checked_route(self, x, weight, bias, A, B, h, task_ids, dtype, compiling: bool, saved_input: str):
        """Validate this call's arguments in full and pick its route (:func:`sas.backends.route`) for what
        the call keeps of x (``saved_input``: "full", "int8" or "fp8")."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"SaSLinear takes x of shape (..., in_features={self.in_features}), got {tuple(x.shape)}")
        frozen_output = weight.new_empty(()).to(dtype).expand(*x.shape[:-1], self.out_features)  # no memory
        validation.validate(x.to(dtype), frozen_output, A, B, h, self.scale, task_ids)
        trainable_base = weight.requires_grad or (bias is not None and bias.requires_grad)
        tasks = h.shape[0] if h.dim() == 2 else 1
        backend = backends.backend_for(x.device, dtype=dtype, rank=A.shape[0], tasks=tasks, saved_input=saved_input)
        autocast = torch.is_autocast_enabled(x.device.type)
        return backends.route(backend, self.layer_op, trainable_base, compiling, autocast, task_ids is not None,
                              saved_input, self.shared.saved_inputs)

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

    def _folded_task(self, task: Optional[int]) -> Optional[int]:
        return task if self.shared.num_tasks > 1 else None

    def _update_refusal(self) -> Optional[str]:
        if not torch.isfinite(self.delta_weight(self._merged_task)).all():
            return "the SaS update contains NaN or Inf"
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.A.shape[0]}, "
                f"layer={self.layer_index}, down={self.down_key!r}, up={self.up_key!r}, scale={self.scale}, "
                f"op={self.layer_op}, saved_input={self.saved_input}, "
                f"merged={self.merged}")


def _task_modulation(h: torch.Tensor, task) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(h, task_ids)`` for the op: a single task's row of a per-task ``h`` (T, r), or ``h`` with the ids."""
    if isinstance(task, int):
        return h[task], None
    return h, task


def adapted_layers(model: nn.Module) -> List[SaSLinear]:
    return [m for m in model.modules() if isinstance(m, SaSLinear)]

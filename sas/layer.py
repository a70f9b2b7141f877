"""SaS modules: the shared-parameter owner, the hypernetwork and the ``SaSLinear`` wrapper."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from . import functional

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}

# Output weights of H start this small so every h_l starts within about 1% of 1
# (h = 1 + H(e)), i.e. the adapter starts as a plain shared low-rank update.
HYPER_OUTPUT_INIT_STD = 1e-2


class HyperNetwork(nn.Module):
    """``h = 1 + W2 act(W1 e + b1) + b2``: maps a layer embedding (k,) to its modulation (r,)."""

    def __init__(self, embed_dim: int, hidden: int, rank: int, activation: str = "tanh"):
        super().__init__()
        self.hidden = nn.Linear(embed_dim, hidden)
        self.activation = _ACTIVATIONS[activation]()
        self.output = nn.Linear(hidden, rank)
        nn.init.normal_(self.output.weight, std=HYPER_OUTPUT_INIT_STD)
        nn.init.zeros_(self.output.bias)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return 1.0 + self.output(self.activation(self.hidden(embedding)))


class SaSShared(nn.Module):
    """Owns every SaS tensor of a model once: the shared A/B per sharing group,
    one embedding per adapted layer, and the hypernetwork.

    ``down[key]`` is A ``(r, d_in)`` (Kaiming-uniform), ``up[key]`` is B
    ``(d_out, r)`` (zeros, so the adapted model equals the base model at init).
    Layers hold a plain reference to this module and look their tensors up by key.
    """

    def __init__(self, rank: int, embed_dim: int, hyper_hidden: int, hyper_activation: str,
                 down_shapes: Dict[str, int], up_shapes: Dict[str, int], num_layers: int):
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

        # Per-forward cache (see begin_forward); None outside a model forward.
        self._forward_cache: Optional[Dict[torch.dtype, dict]] = None

    def forward(self, inputs):
        """Pass ``inputs`` through unchanged.

        The owner sits in the model's module tree only to own tensors; a container that calls
        every child in turn (``nn.Sequential``) calls it last, and it must not change the output.
        """
        return inputs

    def modulation(self, layer_index: int) -> torch.Tensor:
        """``h_l`` (r,) of one layer."""
        return self.hyper(self.embeddings[layer_index])

    def modulations(self) -> torch.Tensor:
        """``h`` of every layer at once, (num_layers, r)."""
        return self.hyper(self.embeddings)

    # A model forward would otherwise run the hypernetwork and cast A/B once per layer: on ViT-B
    # that is 48 tiny MLPs plus about 150 casts, each a separate kernel launch in forward and
    # backward. Between begin_forward and end_forward (installed as hooks on the model by
    # sas.inject) they are computed once per forward and dtype and shared by every layer.
    def begin_forward(self, *_unused) -> None:
        self._forward_cache = {}

    def end_forward(self, *_unused) -> None:
        self._forward_cache = None

    def layer_tensors(self, layer_index: int, down_key: str, up_key: str, dtype: torch.dtype):
        """``(A, B, h_l)`` of one layer in ``dtype``, from the per-forward cache when one is open."""
        cache = self._forward_cache
        if cache is None:
            return (self.down[down_key].to(dtype), self.up[up_key].to(dtype),
                    self.modulation(layer_index).to(dtype))
        entry = cache.get(dtype)
        if entry is None:
            entry = cache[dtype] = {
                "down": {k: v.to(dtype) for k, v in self.down.items()},
                "up": {k: v.to(dtype) for k, v in self.up.items()},
                "h": self.modulations().to(dtype).unbind(0),
            }
        return entry["down"][down_key], entry["up"][up_key], entry["h"][layer_index]


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
        # Merge state (see merge). The flag is a persistent buffer so it travels with the weights in a
        # state_dict: loading a merged model's weights into an unmerged one must not add the update twice.
        # forward() reads the Python mirror, never the device tensor (no host sync per call).
        self.register_buffer("sas_merged", torch.zeros((), dtype=torch.bool, device=base_layer.weight.device))
        self._merged = False
        self._merge_record: Optional[tuple] = None  # (weight, its version after merge, its copy before merge)
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
        if self.layer_op == "fused" and not self.merged:
            # Imported on use: it loads Triton, which CPU-only use of sas does not otherwise need.
            from sas_kernels import fused_linear
            weight = self.base_layer.weight
            A, B, h = self.shared.layer_tensors(self.layer_index, self.down_key, self.up_key,
                                                fused_linear.compute_dtype(x, weight))
            return fused_linear.sas_linear(x, weight, self.base_layer.bias, A, B, h, self.scale)
        base = self.base_layer(x)
        if self.merged:
            return base
        # The adapter runs in the dtype the frozen layer produced (e.g. bf16 under autocast).
        A, B, h = self.shared.layer_tensors(self.layer_index, self.down_key, self.up_key, base.dtype)
        return functional.sas_adapter(x.to(base.dtype), base, A, B, h, self.scale)

    @property
    def merged(self) -> bool:
        """Whether the update is folded into ``base_layer.weight`` (saved as the ``sas_merged`` buffer)."""
        return self._merged

    def _set_merged(self, merged: bool) -> None:
        self._merged = merged
        self.sas_merged.fill_(merged)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``s * B @ diag(h_l) @ A`` in float32, the update folded in by :meth:`merge`."""
        A, B = self.A.float(), self.B.float()
        return self.scale * (B * self.modulation().float()) @ A

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base_layer.weight``; refuses a non-finite update.

        Keeps a copy of the weight as it was (one more weight of memory while merged), so that
        :meth:`unmerge` restores it bit for bit even if the adapter changes while merged.
        """
        if self.merged:
            warnings.warn("SaSLinear is already merged; merge() did nothing", UserWarning, stacklevel=2)
            return
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("refusing to merge: the SaS update contains NaN or Inf")
        weight = self.base_layer.weight
        before = weight.detach().clone()
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self._merge_record = (weight, weight._version, before)
        self._set_merged(True)

    def unmerge_refusal(self) -> Optional[str]:
        """Why :meth:`unmerge` would refuse (``None`` when it would not)."""
        weight, version, _ = self._merge_record or (None, None, None)
        # Any write since merge (load_state_dict, an optimizer step, copy_) bumps the version counter, and
        # restoring the copy would undo it; .to(dtype/device) keeps the Parameter and its version.
        if weight is not self.base_layer.weight or version != weight._version:
            return ("its weight before merge is not known: the merged weight was loaded (e.g. from a merged "
                    "model's state_dict) or written since merge; load the base weights and the adapter instead")
        if not torch.isfinite(self.delta_weight()).all():
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
        weight.copy_(before)
        self._merge_record = None
        self._set_merged(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.A.shape[0]}, "
                f"layer={self.layer_index}, down={self.down_key!r}, up={self.up_key!r}, scale={self.scale}, "
                f"op={self.layer_op}, "
                f"merged={self.merged}")


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


def adapted_layers(model: nn.Module) -> List[SaSLinear]:
    return [m for m in model.modules() if isinstance(m, SaSLinear)]


def find_shared(model: nn.Module) -> Optional[SaSShared]:
    shared = getattr(model, "sas_shared", None)
    return shared if isinstance(shared, SaSShared) else None

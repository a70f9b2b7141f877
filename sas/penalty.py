"""Matrix Pattern Constraints (Si, Yang, Shen, arXiv 2407.05417) as a loss term on SaS's shared projections.

For A ``(r, d_in)`` and B ``(d_out, r)`` of one sharing group:

* ``"orthogonal"`` (MPCo): ``||A A^T - I_r||_F^2 + ||B^T B - I_r||_F^2``, A's rows and B's columns orthonormal;
* ``"diagonal"`` (MPCd): ``||A A^T - I_r||_F^2 + ||B^T B - diag(B^T B)||_F^2``, A's rows orthonormal and
  B's columns mutually orthogonal, of any length.

Add it to the training loss with a coefficient (the paper gives none; pick it on validation)::

    loss = loss + coef * sas.pattern_penalty(model, "orthogonal")

The paper's third constraint, MPCn (a nonlinearity between the down and up projections), is not
offered: it turns the update into a parallel adapter that can no longer be merged into the weight.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .layer import adapted_layers

PENALTY_KINDS = ("orthogonal", "diagonal")


def shared_projections(model: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(every distinct A, every distinct B)`` of the model's SaS owners: each tensor once, however many
    layers share it."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no SaSLinear layers; call sas.inject with a SaSConfig first")
    downs: Dict[int, torch.Tensor] = {}
    ups: Dict[int, torch.Tensor] = {}
    for owner in {id(layer.shared): layer.shared for layer in layers}.values():
        downs.update((id(a), a) for a in owner.down.values())
        ups.update((id(b), b) for b in owner.up.values())
    return list(downs.values()), list(ups.values())


def _squared_deviation(gram: torch.Tensor, keep_diagonal: bool) -> torch.Tensor:
    """``||gram - I||_F^2``, or with ``keep_diagonal`` the sum of the squared off-diagonal entries."""
    target = torch.diag_embed(torch.diagonal(gram)) if keep_diagonal else torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - target).square().sum()


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def pattern_penalty(model: nn.Module, kind: str = "orthogonal") -> torch.Tensor:
    """The summed Matrix Pattern Constraint over every distinct A and B of an adapted ``model``.

    Each shared tensor costs one r x r Gram matrix, O(r^2 d), however many layers use it. Add it, times a
    coefficient, to the training loss.

    Args:
        model: a SaS-adapted model.
        kind: ``"orthogonal"`` (MPCo: ``||A A.T - I||^2 + ||B.T B - I||^2``) or ``"diagonal"`` (MPCd: B's
            Gram matrix need only be diagonal).

    Returns:
        A scalar tensor, differentiable in A and B; float32 at least, so a half-precision adapter still gets a
        float32 loss term.

    Raises:
        ValueError: an unknown ``kind``, or a model without a SaS adapter.

    Example:
        >>> import torch, sas
        >>> from torch import nn
        >>> model = sas.inject(nn.Sequential(nn.Linear(8, 8)), sas.SaSConfig(rank=2, targets=["0"]))
        >>> loss = model(torch.randn(3, 8)).square().mean() + 1e-3 * sas.pattern_penalty(model)
        >>> loss.backward()
        >>> model.sas_shared.down["0"].grad.shape
        torch.Size([2, 8])
    """
    if not isinstance(kind, str) or kind not in PENALTY_KINDS:
        raise ValueError(f"kind must be one of {PENALTY_KINDS}, got {kind!r}")
    downs, ups = shared_projections(model)
    terms = []
    for a in map(_at_least_float32, downs):
        terms.append(_squared_deviation(a @ a.T, keep_diagonal=False))
    for b in map(_at_least_float32, ups):
        terms.append(_squared_deviation(b.T @ b, keep_diagonal=kind == "diagonal"))
    return torch.stack(terms).sum()

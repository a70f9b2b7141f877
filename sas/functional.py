"""The public SaS ops: validated, then handed to a backend (:mod:`sas.backends`).

* :func:`sas_adapter` - ``base + scale * ((x @ A.T) * h) @ B.T`` on the backend in force (or ``backend=``).
* :func:`sas_linear` - the whole frozen layer plus adapter as one op, in the ATen designs of
  :mod:`sas.backends.fold`.

``SaSLinear`` does not call these in eager mode: it validates each new input signature once and runs the
route :func:`sas.backends.route` picked for it. Backend choice (``auto``, ``SAS_BACKEND``,
:func:`set_backend`) is described in :mod:`sas.backends`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .backends import available_backends, backend_available, get_backend, resolve_backend, set_backend
from .backends.fold import DESIGNS
from .validation import validate

__all__ = ["sas_adapter", "sas_linear", "validate", "set_backend", "get_backend", "resolve_backend",
           "available_backends", "backend_available"]


def sas_adapter(
    x: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    scale: float = 1.0,
    task_ids: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``base + scale * ((x @ A.T) * h) @ B.T``, validated, on the chosen backend.

    Differentiable in ``x``, ``base``, ``A``, ``B`` and ``h``. Shapes and dtypes as in
    :func:`sas.reference.sas_adapter`, the oracle every backend is checked against.

    Args:
        x: the input, ``(..., d_in)``.
        base: the frozen layer's output, ``(..., d_out)``.
        A: the down projection, ``(r, d_in)``.
        B: the up projection, ``(d_out, r)``.
        h: the modulation, ``(r,)``, or ``(tasks, r)`` with ``task_ids``.
        scale: the scale ``s`` of the update.
        task_ids: with a 2-D ``h``, one task id per leading-batch element of ``x``.
        backend: a backend for this call alone (``"triton"``, ``"cpp"``, ``"reference"``; see
            :mod:`sas.backends`); default: the one in force.

    Returns:
        ``y`` with ``base``'s shape.

    Raises:
        TypeError: a non-tensor or non-floating-point argument, dtypes that differ from x's, a scale that is
            not a real number.
        ValueError: shapes or devices that do not fit together, task ids out of range, or a forced backend
            that cannot run the call (with its reason).

    Example:
        >>> import torch, sas
        >>> x, base = torch.randn(3, 8), torch.zeros(3, 4)
        >>> A, B, h = torch.randn(2, 8), torch.randn(4, 2), torch.ones(2)
        >>> y = sas.functional.sas_adapter(x, base, A, B, h, scale=0.5)
        >>> torch.allclose(y, 0.5 * (x @ A.T) @ B.T, atol=1e-5)
        True
    """
    validate(x, base, A, B, h, scale, task_ids)
    record = backends.backend_for(x.device, backend, dtype=x.dtype, rank=A.shape[0],
                                  tasks=h.shape[0] if h.dim() == 2 else 1, saved_input="full")
    return record.sas_adapter(x, base, A, B, h, float(scale), task_ids)


def sas_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    scale: float = 1.0,
    design: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``x @ weight.T + bias + scale * ((x @ A.T) * h) @ B.T`` over any leading dims of ``x``, as one op.

    ``weight (d_out, d_in)`` and ``bias (d_out,)`` or None are frozen (no gradients). ``h`` is one
    modulation ``(rank,)``: a per-task ``(T, rank)`` h cannot be folded into one weight. Under autocast
    everything runs in autocast's dtype, as ``SaSLinear`` runs its adapter in the frozen output's dtype.
    ``design`` is one of :data:`sas.backends.fold.DESIGNS` or ``"auto"``. With ``fold`` the result is a
    column window of a ``(rows, d_out + rank)`` buffer (row stride ``d_out + padded rank``), not contiguous.
    A ``weight`` or ``bias`` that requires a gradient (under grad mode) gets it: the call then runs the
    ``unfused`` design (``F.linear`` then the ``backend``'s op).
    """
    if design != "auto" and design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; choose 'auto' or one of {DESIGNS}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (d_out, d_in={x.shape[-1]}), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (d_out={weight.shape[0]},) or None, got {tuple(bias.shape)}")
    if isinstance(h, torch.Tensor) and h.dim() != 1:
        raise ValueError(f"sas_linear takes one modulation h of shape (rank,), got {tuple(h.shape)}; a per-task "
                         f"h cannot be folded into one weight: use F.linear + sas.functional.sas_adapter(task_ids=)")
    dtype = backends.compute_dtype(x, weight)
    # validate() checks the adapter arguments against a stand-in for the frozen output (an expanded scalar).
    frozen_output = weight.new_empty((), dtype=dtype).expand(*x.shape[:-1], weight.shape[0])
    validate(x.to(dtype), frozen_output, A.to(dtype), B.to(dtype), h.to(dtype), scale)
    adapter = backends.backend_for(x.device, backend, dtype=dtype, rank=A.shape[0], tasks=1,
                                   saved_input="full").sas_adapter
    return backends.fold.adapted_linear(x, weight, bias, A, B, h, scale, design, adapter)

"""Pure-PyTorch reference of the SaS adapter op: the correctness oracle.

Every backend (Triton, C++) is tested against this function. It is written
for clarity, not speed: plain tensor ops, autograd does the backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

#: The dtypes the kernel backends (C++, Triton) compute; every other dtype (float64) runs this reference,
#: which is exact for it.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gather_modulation(h: torch.Tensor, task_ids: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    """Return the per-row modulation: ``h`` itself for ``(r,)``, ``h[task_ids]`` for ``(T, r)``.

    ``task_ids`` has one entry per row (``rows``) or one per leading-batch element;
    in the latter case it is repeated so each row of that element uses its id.
    """
    if h.dim() == 1:
        return h
    if task_ids.numel() != rows:
        task_ids = task_ids.repeat_interleave(rows // task_ids.numel())
    return h.index_select(0, task_ids.reshape(-1))


def sas_adapter(
    x: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    scale: float = 1.0,
    task_ids: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """``base + scale * ((x @ A.T) * h) @ B.T`` over any leading dims.

    Shapes: ``x (..., d_in)``, ``base (..., d_out)``, ``A (r, d_in)``, ``B (d_out, r)``,
    ``h (r,)`` or ``(T, r)`` with ``task_ids`` (one id per row or per leading-batch element).
    With ``upcast`` half-precision inputs are computed in float32; the result has
    ``base``'s dtype. No input validation here: :func:`sas.functional.sas_adapter` validates.
    """
    out_dtype = base.dtype
    compute_dtype = torch.float32 if upcast and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    d_in, d_out = x.shape[-1], base.shape[-1]
    rows = math.prod(x.shape[:-1])  # not reshape(-1, d): that is ambiguous when d_in or d_out is 0
    x2 = x.reshape(rows, d_in).to(compute_dtype)
    base2 = base.reshape(rows, d_out).to(compute_dtype)
    modulation = gather_modulation(h.to(compute_dtype), task_ids, x2.shape[0])
    u = x2 @ A.to(compute_dtype).t()
    y = base2 + scale * ((u * modulation) @ B.to(compute_dtype).t())
    return y.to(out_dtype).reshape(base.shape)


def reference_linear(x, weight, bias, A, B, h, scale, task_ids=None):
    """The whole adapted layer as plain autograd ops: ``F.linear`` then the adapter in the frozen output's dtype."""
    base = F.linear(x, weight, bias)
    return sas_adapter(x.to(base.dtype), base, A, B, h, scale, task_ids)


def regrad(fn, inputs, needs, grad_output, *args, create_graph: bool = True):
    """Gradients of ``fn(*inputs, *args)`` for ``grad_output`` with respect to the inputs flagged in
    ``needs`` (``None`` for the others), computed under autograd.

    Kernels' autograd Functions call it from ``backward`` when a double backward asked for a graph
    (``create_graph=True``): their hand-written backward has none, so they recompute with the
    reference ops instead (:func:`sas_adapter`, :func:`reference_linear`), which makes second-order
    gradients the reference's exactly.
    """
    with torch.enable_grad():
        out = fn(*inputs, *args)
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_output, create_graph=create_graph) if wanted else ())
    return [next(grads) if need else None for need in needs]

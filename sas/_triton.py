"""The Triton backend of :func:`sas.functional.sas_adapter`: autograd around ``sas_kernels``' launchers.

Eager calls go through :class:`SaSAdapterFunction`, which calls the host launchers
(:func:`sas_kernels.sas_forward` / :func:`sas_kernels.sas_backward`) directly. While torch.compile
traces, the same Function calls the ``torch.library`` ops ``sas::adapter_fwd`` / ``adapter_bwd``
(``triton_op``), which is what the compiler knows how to trace and what CUDA graphs capture.
float64 runs the exact reference: the kernels compute fp32, fp16 and bf16.
"""
from __future__ import annotations

from typing import Optional

import torch

import sas_kernels
from sas_kernels import sas_adapter as kernels

from . import reference


def _forward(x2, base2, A, B, h, task_ids, scale, save_u):
    if torch.compiler.is_compiling():
        return torch.ops.sas.adapter_fwd(x2, base2, A, B, h, task_ids, scale, save_u)
    return sas_kernels.sas_forward(x2, base2, A, B, h, task_ids, scale, save_u)


class SaSAdapterFunction(torch.autograd.Function):
    """Autograd glue over the launchers: saves x, u, A, B, h for the backward; dbase is g."""

    @staticmethod
    def forward(ctx, x2, base2, A, B, h, task_ids, scale):
        y, u = _forward(x2, base2, A, B, h, task_ids, scale, True)
        ctx.save_for_backward(x2, base2, u, A, B, h, task_ids)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        x2, base2, u, A, B, h, task_ids = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiate the reference instead
            return (*reference.regrad(lambda *t: reference.sas_adapter(*t, ctx.scale, task_ids),
                                      (x2, base2, A, B, h), ctx.needs_input_grad[:5], g), None, None)
        g2 = g if g.stride(-1) == 1 else g.contiguous()
        if torch.compiler.is_compiling():
            dx, dA, dB, dh = torch.ops.sas.adapter_bwd(g2, x2, u, A, B, h, task_ids, ctx.scale)
        else:
            dx, dA, dB, dh = sas_kernels.sas_backward(g2, x2, u, A, B, h, task_ids, ctx.scale)
        return dx, g, dA, dB, dh, None, None


def check_rank(rank: int) -> None:
    if rank > kernels.MAX_RANK:
        raise ValueError(f"the triton backend supports rank 1..{kernels.MAX_RANK}; got rank {rank} "
                         f"(use backend='reference' for larger ranks)")


def sas_adapter_triton(x: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h: torch.Tensor,
                       scale: float, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The Triton backend of :func:`sas.functional.sas_adapter` (arguments already validated)."""
    if x.dtype not in reference.KERNEL_DTYPES:
        return reference.sas_adapter(x, base, A, B, h, scale, task_ids)
    check_rank(A.shape[0])
    as_rows = sas_kernels.as_rows
    x2, base2 = as_rows(x), as_rows(base)  # A, B and h are read through their strides: no copies
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x2, base2, A, B, h)):
        y = SaSAdapterFunction.apply(x2, base2, A, B, h, task_ids, float(scale))
    else:  # inference: u is not needed, so it is not written
        y, _ = _forward(x2, base2, A, B, h, task_ids, float(scale), False)
    return y.reshape(base.shape)

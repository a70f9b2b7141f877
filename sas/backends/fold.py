"""The fold backend of the whole layer (``layer_op="fold"``): frozen linear + SaS adapter as one op, in
several ATen designs measured against each other.

    y = x @ W0.T + b0 + s * ((x @ A.T) * h) @ B.T

:func:`sas_linear` is differentiable in ``x``, ``A``, ``B`` and ``h``. ``W0`` and ``b0`` are the frozen
layer: the fused designs use them detached; when either requires a gradient (the user unfroze it) the call
takes the ``unfused`` design, whose autograd covers them. A backward run with ``create_graph=True`` (double
backward) differentiates the reference ops, so second-order gradients are the reference's.

Designs (``docs/layer_designs.md`` has the data-movement model and the measurements):

``fold``        ``W_eff = W0 + s B diag(h) A`` costs O(d_in d_out r), nothing next to the GEMM. The forward is
                ONE GEMM of ``x`` against ``[W_eff; A]`` giving ``[y | u]`` (x read once, u saved); the
                backward is ONE GEMM of ``g`` against ``[W_eff | B]`` giving ``[dx | g @ B]`` (g read once
                for both). ``y`` and ``dx`` are column windows of those buffers (row stride ``d + rank``).
``fold_split``  the same ``W_eff``, but ``u`` and ``g @ B`` come from their own skinny GEMMs, so ``y`` and
                ``dx`` are contiguous at the cost of reading ``x`` and ``g`` once more.
``epilogue``    the LoRAFusion order: ``S = (x @ A.T) * h`` first, ``Z = s S @ B.T + b0``, then the frozen
                GEMM accumulates into ``Z`` (cuBLAS beta=1 epilogue); backward ``dx = du @ A`` first and the
                ``g @ W0`` GEMM accumulates into it.
``unfused``     ``F.linear`` then the kernel backend's adapter op (the baseline).

``design="auto"`` picks from :data:`MEASURED_BEST`, filled by ``python -m bench.layer_designs``.
Every design only calls ATen ops, so all of them run on CPU and CUDA.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .. import reference
from .runtime import compute_dtype

DESIGNS = ("fold", "fold_split", "epilogue", "unfused")

# cuBLAS picks its fast (vectorised) kernels only when every leading dimension is a multiple of 16 bytes,
# so the rank columns appended to a GEMM are padded with zeros up to that.
GEMM_ALIGN_BYTES = 16

# The design `auto` picks, keyed on (device type, dtype, d_in, d_out, rank) and measured by
# `python -m bench.layer_designs` (docs/layer_designs.md), fastest forward+backward. The H100 entries are
# still to be measured; the 2-core CPU runs were noisier than the gaps between designs at fc1/fc2, so the
# CPU relies on the default.
MEASURED_BEST: Dict[Tuple[str, torch.dtype, int, int, int], str] = {}

# What `auto` picks for a shape the table does not hold. CPU: `fold` won qkv and proj and lost fc1/fc2 by
# less than the run-to-run noise. CUDA: `fold`, the fastest of these designs in the bytes/FLOPs model.
DEFAULT_DESIGN = {"cpu": "fold", "cuda": "fold"}


def choose_design(device: torch.device, dtype: torch.dtype, d_in: int, d_out: int, rank: int) -> str:
    """The design ``auto`` runs for this layer: the measured winner, else the device's default."""
    device_type = torch.device(device).type
    key = (device_type, dtype, d_in, d_out, rank)
    return MEASURED_BEST.get(key, DEFAULT_DESIGN.get(device_type, "fold"))


def _padded_rank(rank: int, dtype: torch.dtype) -> int:
    align = max(1, GEMM_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    return -(-rank // align) * align


def _alias(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` (2-D, unit column stride) with its first dim split into ``shape[:-1]``, sharing memory.

    Built with ``set_`` instead of slicing/``view`` so autograd does not see a view: a view returned from a
    custom Function may not be modified in place, whereas ``F.linear``'s output may (e.g. ``ReLU(inplace)``).
    """
    strides = [t.stride(1)] if len(shape) else []
    if len(shape) >= 2:
        strides.insert(0, t.stride(0))
        for size in reversed(shape[1:-1]):
            strides.insert(0, strides[0] * size)
    out = t.new_empty(0)
    return out.set_(t.untyped_storage(), t.storage_offset(), tuple(shape), tuple(strides))


def _effective_weight(weight, A, B, h, scale, out=None):
    """``W0 + s B diag(h) A`` in one addmm (accumulated in fp32, rounded once to the weight's dtype)."""
    return torch.addmm(weight, B * h, A, alpha=scale, out=out)


def _adapter_grads(g2, x2, u, gB, A, h, scale, needs_A, needs_B, needs_h):
    """``dA = (s gB h).T @ x``, ``dB = g.T @ (s u h)``, ``dh = s sum_rows(gB u)`` (None where not needed)."""
    dA = torch.mm((gB * (h * scale)).t(), x2) if needs_A else None
    dB = torch.mm(g2.t(), u * (h * scale)) if needs_B else None
    dh = (gB * u).sum(0).mul_(scale) if needs_h else None
    return dA, dB, dh


# ---- forward host functions: (x2 (N, d_in), ...) -> y2 (N, d_out) with unit column stride, u (N, rank)

def fold_forward(x2, weight, bias, A, B, h, scale):
    d_out, d_in = weight.shape
    rank = A.shape[0]
    padded = _padded_rank(rank, x2.dtype)
    stacked = weight.new_zeros(d_out + padded, d_in)  # [W_eff; A; 0]
    _effective_weight(weight, A, B, h, scale, out=stacked[:d_out])
    stacked[d_out:d_out + rank].copy_(A)
    stacked_bias = None if bias is None else torch.cat([bias, bias.new_zeros(padded)])
    yu = F.linear(x2, stacked, stacked_bias)
    # u is copied out (N * rank elements, negligible) so saving it does not keep all of [y | u] alive
    # until the backward: the frozen layer's y may be freed as soon as the next op has used it.
    return yu[:, :d_out], yu[:, d_out:d_out + rank].clone()


def fold_split_forward(x2, weight, bias, A, B, h, scale):
    return F.linear(x2, _effective_weight(weight, A, B, h, scale), bias), torch.mm(x2, A.t())


def epilogue_forward(x2, weight, bias, A, B, h, scale):
    u = torch.mm(x2, A.t())
    up = (B * scale).t()
    z = torch.mm(u * h, up) if bias is None else torch.addmm(bias, u * h, up)
    return z.addmm_(x2, weight.t()), u


# ---- backward host functions: -> (dx2 (N, d_in) or None, gB (N, rank))

def fold_input_grad(g2, weight, A, B, h, scale, needs_x):
    if not needs_x:
        return None, torch.mm(g2, B)
    d_out, d_in = weight.shape
    rank = A.shape[0]
    padded = _padded_rank(rank, g2.dtype)
    stacked = weight.new_zeros(d_out, d_in + padded)  # [W_eff | B | 0]
    _effective_weight(weight, A, B, h, scale, out=stacked[:, :d_in])
    stacked[:, d_in:d_in + rank].copy_(B)
    dx_gB = torch.mm(g2, stacked)
    return dx_gB[:, :d_in], dx_gB[:, d_in:d_in + rank]


def fold_split_input_grad(g2, weight, A, B, h, scale, needs_x):
    dx2 = torch.mm(g2, _effective_weight(weight, A, B, h, scale)) if needs_x else None
    return dx2, torch.mm(g2, B)


def epilogue_input_grad(g2, weight, A, B, h, scale, needs_x):
    gB = torch.mm(g2, B)
    dx2 = torch.mm(gB * (h * scale), A).addmm_(g2, weight) if needs_x else None
    return dx2, gB


_HOST_FUNCTIONS = {
    "fold": (fold_forward, fold_input_grad),
    "fold_split": (fold_split_forward, fold_split_input_grad),
    "epilogue": (epilogue_forward, epilogue_input_grad),
}


class SaSLinearFunction(torch.autograd.Function):
    """Autograd for the fused designs; ``weight``/``bias`` arrive detached (frozen). Returns
    ``(y, q, scale)``: the backward keeps x only when A needs a gradient (only dA reads it), and then, with
    ``kind`` ("int8"/"fp8", ``SaSConfig.saved_input``), its 8-bit copy instead (made by the oracle
    :func:`sas.reference.quantize_rows`, or ``copy``, one already made of the same input), returned
    non-differentiable so that layers fed the same input share it; ``q`` and ``scale`` are ``None`` when this
    call made no copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, h, scale, design, kind=None, copy=None):
        forward_fn, _ = _HOST_FUNCTIONS[design]
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # inputs were cast already; keep exact control
            y2, u = forward_fn(x2, weight, bias, A, B, h, scale)
        keeps_x = ctx.needs_input_grad[3]
        q, qscale = (copy or reference.quantize_rows(x, kind)) if keeps_x and kind is not None else (None, None)
        ctx.save_for_backward(x if keeps_x and q is None else None, q, qscale, u, weight, bias, A, B, h)
        ctx.scale, ctx.design, ctx.x_shape = scale, design, x.shape
        y = _alias(y2, (*x.shape[:-1], weight.shape[0]))
        if q is None or copy is not None:  # only a copy made here is handed back
            return y, None, None
        ctx.mark_non_differentiable(q, qscale)
        ctx.set_materialize_grads(False)  # no zeros made for the copy's (absent) gradients
        return y, q, qscale

    @staticmethod
    def backward(ctx, g, _grad_q=None, _grad_scale=None):
        x, q, qscale, u, weight, bias, A, B, h = ctx.saved_tensors
        needs_x, _, _, needs_A, needs_B, needs_h = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():  # create_graph=True: the host functions write into buffers (out=), so
            # differentiate the reference ops instead, with autocast off as in the forward
            reference.check_input_kept(x)
            with torch.autocast(x.device.type, enabled=False):
                dx, _, _, dA, dB, dh = reference.regrad(
                    reference.reference_linear, (x, weight, bias, A, B, h),
                    (needs_x, False, False, needs_A, needs_B, needs_h), g, ctx.scale)
            return dx, None, None, dA, dB, dh, None, None, None, None
        _, input_grad_fn = _HOST_FUNCTIONS[ctx.design]
        g2 = g.reshape(-1, g.shape[-1])
        if q is not None:
            x2 = reference.dequantize_rows(q, qscale, g.dtype)
        else:
            x2 = None if x is None else x.reshape(-1, x.shape[-1])
        dx2, gB = input_grad_fn(g2, weight, A, B, h, ctx.scale, needs_x)
        dA, dB, dh = _adapter_grads(g2, x2, u, gB, A, h, ctx.scale, needs_A, needs_B, needs_h)
        dx = None if dx2 is None else dx2.view(ctx.x_shape)
        return dx, None, None, dA, dB, dh, None, None, None, None


def adapted_linear(x, weight, bias, A, B, h, scale, design, adapter, kind=None, copy=None):
    """The body of :func:`sas.functional.sas_linear`, its arguments already validated: casts to the compute
    dtype, detaches a frozen ``weight``/``bias``, and runs ``design`` (``"auto"``: :func:`choose_design`).
    ``unfused``, or a ``weight``/``bias`` that requires a gradient (under grad mode), runs ``F.linear`` then
    ``adapter`` (the kernel backend's op), whose autograd covers them. ``kind``/``copy``: see
    :func:`quantized_input_linear`, which passes them."""
    y, _, _ = _linear(x, weight, bias, A, B, h, scale, design, adapter, kind, copy)
    return y


def quantized_input_linear(x, weight, bias, A, B, h, scale, task_ids, kind, copy):
    """``layer_op="fold"`` keeping an 8-bit copy of ``kind`` of x (or ``copy``) for dA, through the oracle
    :func:`sas.reference.quantize_rows`: ``(y, q, scale)`` (see :class:`SaSLinearFunction`). A design that
    cannot keep it (``unfused``, an unfrozen base) runs :func:`sas.reference.quantized_input_linear`."""
    return _linear(x, weight, bias, A, B, h, scale, "auto", None, kind, copy)


def _linear(x, weight, bias, A, B, h, scale, design, adapter, kind, copy):
    dtype = compute_dtype(x, weight)
    x, A, B, h = x.to(dtype), A.to(dtype), B.to(dtype), h.to(dtype)
    frozen = not (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))
    if frozen:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if not (torch.is_grad_enabled() and A.requires_grad):  # no dA, so nothing of x to keep
        kind, copy = None, None
    if design == "auto":
        design = choose_design(x.device, dtype, weight.shape[1], weight.shape[0], A.shape[0])
    if design == "unfused" or not frozen:
        if kind is not None:
            return reference.quantized_input_linear(x, weight, bias, A, B, h, scale, None, kind, copy)
        return adapter(x, F.linear(x, weight, bias), A, B, h, float(scale), None), None, None
    return SaSLinearFunction.apply(x, weight, bias, A, B, h, float(scale), design, kind, copy)

"""Pure-PyTorch reference of the SaS adapter op: the correctness oracle.

Every backend (Triton, C++) is tested against this function. It is written
for clarity, not speed: plain tensor ops, autograd does the backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from sas_kernels.saved_kinds import SAVED_KINDS

#: The dtypes the kernel backends (C++, Triton) compute; every other dtype (float64) runs this reference,
#: which is exact for it.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The 8-bit copies of a layer's input a layer may keep instead of x (``SaSConfig.saved_input``), by name:
#: the storage dtype and the largest magnitude it holds, which a row's absmax is scaled to. Views of the one
#: table every backend reads (:data:`sas_kernels.saved_kinds.SAVED_KINDS`).
QUANTIZED_INPUT_DTYPES = {name: kind.dtype for name, kind in SAVED_KINDS.items()}
QUANTIZED_INPUT_MAX = {name: kind.limit for name, kind in SAVED_KINDS.items()}
#: The smallest scale a nonzero row gets: 2**-126, float32's smallest normal number. A row whose
#: ``absmax / M`` is below it (absmax under 1.5e-36 for int8, 5.3e-36 for fp8) is scaled by exactly 2**126
#: instead, so ``M / absmax`` never overflows and the scale is never subnormal (see :func:`quantize_rows`).
QUANTIZED_SCALE_MIN = 2.0 ** -126


def quantize_rows(x: torch.Tensor, kind: str):
    """The 8-bit copy of ``x`` a layer keeps for ``dA`` in mode ``kind`` ("int8" or "fp8"): ``(q, scale)``.

    ``x`` is read as ``(N, d_in)`` rows (its leading dims flattened). Each row gets one float32 scale,
    ``absmax(row) / M`` with ``M`` = 127 (int8) or 448 (float8 e4m3's largest finite value), and
    ``q = round(x * (M / absmax(row)))`` in float32, stored as int8 or float8_e4m3fn; a row of zeros gets
    scale 0 and q 0. ``x`` ~= ``dequantize_rows(q, scale)``, with an error of at most half a step per
    element (a step is ``scale`` for int8; for fp8 it is 2**-3 of the element's own power of two, so small
    values of a row keep more relative precision than with int8). A row holding NaN or Inf gets a NaN
    scale, so its dequantized values are NaN, never silently finite.

    The scale is floored at :data:`QUANTIZED_SCALE_MIN` (2**-126): a finite row with ``absmax < M * 2**-126``
    is quantized with the scale 2**-126 and ``x * 2**126`` (both exact powers of two, so the copy and its
    decoding are exact products), where ``M / absmax`` would overflow to inf (q saturated, or NaN from
    ``0 * inf``) and ``absmax / M`` would be subnormal. Such a row keeps the half-step bound with that
    step, and adds at most 2**-127 * |du| per element to dA. Rows above the floor are unaffected.

    Rounding is round-to-nearest (ties to even), not stochastic. The copy is read once, by one GEMM
    (dA = du.T @ x) that sums N products per entry, so the rounding errors of independent elements
    average out there as noise would (measured at ViT-B shapes: cosine of dA to exact above 0.999, see
    docs/design.md); stochastic rounding would remove a bias that is not the dominant error here, double
    the error's variance, and need random bits in every kernel, so that the backends (and this oracle)
    would no longer agree bit for bit. Every backend computes ``M / absmax`` and the product in float32
    and rounds the same way, so their copies equal this function's exactly.
    """
    limit = QUANTIZED_INPUT_MAX[kind]
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1]).float()
    absmax = x2.abs().amax(dim=1) if x2.shape[1] else x2.new_zeros(rows)
    nonzero = absmax > 0
    floored = absmax.clamp_min(limit * QUANTIZED_SCALE_MIN)  # exact: M has at most 9 significant bits
    # A tensor divided by a tensor: `limit / tensor` is computed as limit * (1 / tensor) in PyTorch, two
    # roundings, where the kernels divide once (IEEE division, rounded once).
    limits = torch.full_like(absmax, limit)
    inverse = torch.where(nonzero, limits / floored, 0.0)
    scaled = (x2 * inverse[:, None]).clamp_(-limit, limit)
    q = scaled.round_().to(torch.int8) if kind == "int8" else scaled.to(torch.float8_e4m3fn)
    # A row holding NaN or Inf gets a NaN scale (x * 0 is NaN there), so its copy dequantizes to NaN
    # rather than to finite values nobody asked for.
    non_finite = (x2 * 0).sum(dim=1)
    return q, torch.where(nonzero, floored / limits, 0.0) + non_finite


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` per row (float32 product), in ``dtype``: the input :func:`quantize_rows` saved, as rows."""
    return (q.float() * scale[:, None]).to(dtype)


def gather_modulation(h: torch.Tensor, task_ids: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    """Return the per-row modulation: ``h`` itself for ``(r,)``, ``h[task_ids]`` for ``(T, r)``.

    ``task_ids`` has one entry per row (``rows``) or one per leading-batch element;
    in the latter case it is repeated so each row of that element uses its id.
    """
    if h.dim() == 1:
        return h
    return h.index_select(0, _row_task_ids(task_ids.reshape(-1), rows))


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
    y = _up_projection(_down_projection(x2, A), base2, B, h, scale, task_ids)
    return y.to(out_dtype).reshape(base.shape)


def _down_projection(x2: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``u = x2 @ A.T`` in ``x2``'s dtype, for rows ``x2`` (N, d_in)."""
    return x2 @ A.to(x2.dtype).t()


def _up_projection(u, base2, B, h, scale, task_ids) -> torch.Tensor:
    """``base2 + scale * (u * h) @ B.T`` in ``u``'s dtype (h per row with ``task_ids``)."""
    modulation = gather_modulation(h.to(u.dtype), task_ids, u.shape[0])
    return base2 + scale * ((u * modulation) @ B.to(u.dtype).t())


def reference_linear(x, weight, bias, A, B, h, scale, task_ids=None):
    """The whole adapted layer as plain autograd ops: ``F.linear`` then the adapter in the frozen output's dtype."""
    base = F.linear(x, weight, bias)
    return sas_adapter(x.to(base.dtype), base, A, B, h, scale, task_ids)


class _QuantizedInputAdapter(torch.autograd.Function):
    """:func:`sas_adapter` keeping the 8-bit copy of x (:func:`quantize_rows`) instead of x: the oracle of
    ``SaSConfig.saved_input``. Only dA changes: the backward differentiates the very ops of
    :func:`sas_adapter` again (:func:`regrad`), the up-projection from the kept ``u`` (dx, dB, dh exactly as
    plain autograd gives them in the full mode, at the cost of recomputing its GEMM) and the down-projection
    with the dequantized copy in x's place (dA; dx does not read x). Computed in float32 for half inputs."""

    @staticmethod
    def forward(ctx, x, base, A, B, h, scale, task_ids, kind, copy):
        q, qscale = copy if copy is not None else quantize_rows(x, kind)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        rows, d_out = math.prod(x.shape[:-1]), base.shape[-1]
        u = _down_projection(x.reshape(rows, x.shape[-1]).to(compute), A)
        y = _up_projection(u, base.reshape(rows, d_out).to(compute), B, h, scale, task_ids)
        ctx.save_for_backward(q, qscale, u, A, B, h, task_ids)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        y = y.to(base.dtype).reshape(base.shape)
        if copy is not None:  # made by another layer: only a copy made here is handed back
            return y, None, None
        ctx.mark_non_differentiable(q, qscale)
        ctx.set_materialize_grads(False)  # no zeros made for the copy's (absent) gradients
        return y, q, qscale

    @staticmethod
    def backward(ctx, g, _grad_q, _grad_scale):
        q, qscale, u, A, B, h, task_ids = ctx.saved_tensors
        needs_x, needs_base, needs_A, needs_B, needs_h = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():
            check_input_kept(None)
        g2 = g.reshape(u.shape[0], g.shape[-1]).to(u.dtype)
        needs_u = needs_x or needs_A
        leaves = [t.detach().requires_grad_(need) for t, need in ((u, needs_u), (B, needs_B), (h, needs_h))]
        # The frozen output only adds to y, so zeros stand in for it (it was not kept).
        du, _, dB, dh = regrad(_up_projection, (leaves[0], g2.new_zeros(()).expand_as(g2), *leaves[1:]),
                               (needs_u, False, needs_B, needs_h), g2, ctx.scale, task_ids, create_graph=False)
        dx = dA = None
        if needs_u:
            x2 = dequantize_rows(q, qscale, u.dtype).requires_grad_(needs_x)
            dx, dA = regrad(_down_projection, (x2, A.detach().requires_grad_(needs_A)), (needs_x, needs_A), du,
                            create_graph=False)
            dx = None if dx is None else dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        return dx, g if needs_base else None, dA, dB, dh, None, None, None, None


def _row_task_ids(task_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """One task id per row (``task_ids`` may hold one per leading-batch element)."""
    return task_ids if task_ids.numel() == rows else task_ids.repeat_interleave(rows // task_ids.numel())


def quantized_input_linear(x, weight, bias, A, B, h, scale, task_ids, kind, copy):
    """:func:`reference_linear` keeping an 8-bit copy of ``kind`` of x (or ``copy``, one already made of the
    same input) instead of x: ``(y, q, scale)``, ``q`` and ``scale`` the copy this call made (``None`` when it
    made none). The oracle of the backends' layers of the same name."""
    base = F.linear(x, weight, bias)
    if not (torch.is_grad_enabled() and A.requires_grad):  # only dA reads x: nothing to keep
        return sas_adapter(x.to(base.dtype), base, A, B, h, scale, task_ids), None, None
    return _QuantizedInputAdapter.apply(x.to(base.dtype), base, A, B, h, scale, task_ids, kind, copy)


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


def check_input_kept(x: Optional[torch.Tensor]) -> None:
    """Raise for a double backward through a layer that kept no full-precision input ``x`` (``None``):
    differentiating its gradients again (:func:`regrad`) recomputes the layer from ``x``."""
    if x is None:
        raise RuntimeError(
            "a double backward (create_graph=True) recomputes the adapted layer from its input, which this layer "
            "did not keep: its A gets no gradient (SaSConfig.train_down=False) or it kept an 8-bit copy "
            "(SaSConfig.saved_input='int8' or 'fp8'); use train_down=True and saved_input='full' for "
            "higher-order gradients")

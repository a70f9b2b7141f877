"""Fused Triton kernels for the SaS adapter op ``y = base + s * ((x @ A.T) * h) @ B.T``.

Three kernels (``_sas_forward_kernel``, ``_sas_backward_rows_kernel``, ``_sas_backward_weights_kernel``), their
host launchers :func:`sas_forward` / :func:`sas_backward` (flatten to 2-D rows through strides, allocate,
launch), and the ``torch.library`` ops ``sas::adapter_fwd`` / ``sas::adapter_bwd`` that torch.compile traces
and CUDA graphs capture. Eager callers (``sas/backends/triton.py``) call the launchers directly: no
torch.library dispatch, and after the first launch of a shape no autotuner either. One fused pass each way
because the op is memory-bound; what a launch may rely on to stay exact (autotuning, streams, CUDA graphs,
torch.compile), the bytes each pass moves, the precision of its dots and its deterministic row reductions:
docs/design.md, section 6 (tests/kernels/test_hazards.py on CPU, tests/kernels/test_gpu_hazards.py on a GPU).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch_count import record_launch
from .saved_kinds import SAVED_KINDS

# Read once at import, like Triton itself: the interpreter must be chosen before kernels load.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# tl.dot needs every dim >= 16, so the rank is padded (by masks, never by copies) to a power of
# two of at least 16; up to 256 some config keeps every tile within registers (the budgets below; the row
# kernels in fp32 at 256 run the smallest tiles, which fit no budget but spill nothing).
MIN_RANK_PAD = 16
MAX_RANK = 256

# Row splits for the column-blocked reductions (dA, dB, dh): each split covers at least this
# many rows so its partial (r x block of columns, fp32) is written once per >= 512 rows read,
# at most MAX_SPLITS of them (64 splits x 12 column blocks of ViT-B's 768 fill an H100's 132
# SMs several times over).
MIN_ROWS_PER_SPLIT = 512
MAX_SPLITS = 64
# Rows of a split are a multiple of the largest autotuned BLOCK_M, so no row block straddles two.
SPLIT_ROW_ALIGN = 128
# Cap on the fp32 elements of one partials buffer (16 MiB): at r=256, d=3072 this allows 5 splits.
PARTIAL_BUDGET = 1 << 22

# Autotune space, shared by the four row/column kernels: BLOCK_M rows x BLOCK_D columns of x,
# base, g or the output per step. Keyed on (d_in, d_out, R_PAD) plus Triton's automatic
# tensor-dtype key, never on the row count, so one tuning serves every batch size.
AUTOTUNE_SPACE = (
    # (BLOCK_M, BLOCK_D, num_warps, num_stages); the first that fits is the untuned choice (below)
    (64, 64, 4, 3),
    (32, 64, 4, 2),
    (64, 128, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    # Small tiles over 8 warps, for fp32 and high ranks: the only configs that fit fp32 from R_PAD 64 (its weights
    # kernel at every R_PAD) and half precision's weights kernel from 64 (WEIGHTS_TILE_BUDGET); 16x16 the only one
    # spill-free in fp32's weights kernel at R_PAD 256, and the row kernels' fp32 fallback there (fitting_configs).
    (32, 64, 8, 2),
    (16, 32, 8, 2),
    (16, 16, 8, 2),
)
# Configs whose estimated shared memory exceeds this are pruned before tuning; the estimate is
# rough, so it stays well under sm_80's 163 KB (the AOT test checks the real numbers).
SMEM_BUDGET_BYTES = 128 * 1024
# Register budgets: which configs the runtime may pick (config_fits) so that none spills, measured with `python -m
# sas_kernels.aot --grid sweep` (every config at each R_PAD, ranks R_PAD - 8 and R_PAD, in each kernel's heaviest
# launch: fp8 copy, per-task h) on Triton 3.6.0 (ptxas 12.8; the lent GPU machine's stack) and 3.8 (ptxas 12.9):
# each budget is the stricter of the two. Stack bytes below are sm_90/sm_80 at rank R_PAD - 8. Sizes are per thread:
# elements over the 32 * num_warps threads, of the three tile shapes the kernels keep live: BLOCK_M x R_PAD (u, gB,
# du), BLOCK_M x BLOCK_D (x, base, g, y) and R_PAD x BLOCK_D (the weights kernel's dA/dB accumulators, the forward's
# B operand). fp32 dots run on FMA units with both operands in registers, so fp32 gets the smaller tiles.
#
# The row kernels (forward, backward rows), one budget per tile shape. Both versions agree: they spill in no
# half-precision config up to 32 of BLOCK_M x R_PAD and 64 of BLOCK_M x BLOCK_D; past them, half precision R_PAD 128
# 64x128/4 warps (64 of BLOCK_M x R_PAD) rows 16/208 (3.6), 8/192 (3.8), fp32 R_PAD 64 32x64/4 warps (16 of BLOCK_M
# x R_PAD and BLOCK_M x BLOCK_D, 32 of R_PAD x BLOCK_D) rows 0/136 (3.6) and 0/3680 (3.8), fp32 R_PAD 128 forward
# 16x64/8 warps 8/- (3.8).
# element size: (BLOCK_M x R_PAD, BLOCK_M x BLOCK_D, R_PAD x BLOCK_D)
ROWS_TILE_BUDGET = {4: (8, 16, 16), 2: (32, 64, 128)}
# The weights kernel holds du, the accumulator and the x (or g) tile at once, x both as loaded and as decoded or
# rounded for the dot, so one budget bounds their sum: BLOCK_M x R_PAD + R_PAD x BLOCK_D + 2 x BLOCK_M x BLOCK_D per
# thread (separate budgets fit no version: 16x32/8 warps at R_PAD 256 is (16, 2, 32) per thread and spills in
# neither, 32x64/8 warps at R_PAD 128, (16, 8, 32), spills on 3.6). Triton 3.6 spills far more in it than 3.8 (from
# nearly the same TTGIR its PTX is 30% longer: bf16 rank 24 64x64/4 warps, 255 registers and 512 stack bytes on
# sm_80, against 239 and none on 3.8), so 3.6 sets every bound. Half precision, at or under 60: 16x32/8 warps at
# R_PAD 256 (52) 0/0 on both, 32x64/4 warps at 32 (56) 0/0 on both, 32x64/8 warps at 64 (40) 0/0 on both; over it:
# 32x64/8 warps at R_PAD 128 (64) 40/32 (3.6), 32x64/4 warps at 64 (80) 0/32 (3.6; 440/512 at 128), 64x64/4 warps at
# R_PAD 16 (80) 32/32 (3.6; 280/400 at 64 on 3.8), 64x128/4 warps at 16 (152) 32/32 (3.6), 128x64/8 warps at 16 (76)
# 288 on sm_80 (3.6; 128-row configs spilled on 3.8 too: 200/256 at R_PAD 32). fp32, at or under 36: 16x16/8 warps
# at R_PAD 256 (34) 0/0 on both, 16x32/8 warps at 128 (28) and 32x64/8 warps at 32 (28) 0/0 on both; over it:
# 32x64/8 warps at R_PAD 64 (40) 232/224 (3.6; 0/40 at rank 64 on 3.8), 16x32/8 warps at 256 (52) 168/128 (3.6),
# 112/72 (3.8), 32x64/4 warps at 32 (56) 1520/1440 (3.6; 0/40 on 3.8), 64x64/4 warps at 16 (80) 2040/2008 (3.6),
# 256/280 (3.8). (32x64/4 warps at fp32 R_PAD 16, 44, spills in neither version, but a budget that lets it in lets
# 32x64/8 warps in at 64.) On 3.8 alone the 64-row configs would fit up to R_PAD 32 in half precision and 32x64/8
# warps up to 128.
#
# What neither budget removes: ptxas itself holds some kernels under the register cap, at 48 to 168 registers, to
# fit one more block per SM, and spills 8-40 bytes to do it, at ranks where the tiles fit (fp32 weights 16x16/8
# warps rank 120 on sm_80: 128 registers and 32 bytes on 3.8; bf16 weights 16x32/8 warps rank 256 on sm_80: 128 and
# 24 on 3.8; bf16 weights 32x64/8 warps rank 56 with an fp8 copy and one h on sm_80: 128 and 40 on 3.6; fp32 weights
# 16x32/8 warps rank 8 on sm_80: 64 and 8 on 3.6). Smaller tiles do not stop it; Config(maxnreg=255) does, but
# raised the registers of 431 of 604 sweep compilations on 3.6 and with them fewer blocks fit an SM (forward fp32
# rank 120 16x32/8 warps on sm_90: 80 -> 255 registers, 3 blocks -> 1). None of them is at the ranks
# tests/kernels/test_aot.py compiles by default; its full grid (`make aot`) reports them.
# element size: BLOCK_M x R_PAD + R_PAD x BLOCK_D + 2 x BLOCK_M x BLOCK_D, per thread
WEIGHTS_TILE_BUDGET = {4: 36, 2: 60}
# fp32 inputs get IEEE fp32 dots, not TF32 (see the module docstring); half inputs ignore it.
FP32_DOT_PRECISION = "ieee"
# The interpreter runs tiles through numpy: one mid-sized config, no tuning (tuning would time
# every config on the CPU).
INTERPRETER_CONFIG = (64, 64, 4, 1)
# SAS_TRITON_AUTOTUNE=0 skips tuning: each kernel runs the first config of AUTOTUNE_SPACE that fits its
# rank and dtype. Tuning costs 15-25 s per new (shape, dtype) on a fresh H100 (the CUDA test suite
# took about 11 minutes with it), so `make test-gpu` turns it off; every config is still compiled
# ahead of time by the test suite.
AUTOTUNE = os.environ.get("SAS_TRITON_AUTOTUNE", "1") != "0"

# dh's tiles hold tasks in blocks of 16 (tl.dot's minimum) for the one-hot segment sum.
TASK_BLOCK: tl.constexpr = tl.constexpr(16)
# Split counters the rows kernel zeroes per store (see _sas_backward_rows_kernel).
COUNTER_BLOCK: tl.constexpr = tl.constexpr(128)

# What a layer keeps of its input x for dA (SaSConfig.saved_input, sas.reference.quantize_rows): the
# forward kernel's SAVE_X writes an 8-bit copy, the weights kernel's SAVED_X says what its x_ptr holds.
# NONE: nothing (A gets no gradient: the weights kernel computes no dA). The fp8 copy travels as its uint8
# bits, encoded and decoded here with integer ops: Triton's own float8e4nv casts need sm_89 and are wrong
# under the interpreter (-31.1 became -16), while these run everywhere and round exactly as PyTorch does.
# The 8-bit kinds' codes and limits (the largest magnitude, which a row's absmax is scaled to) come from
# sas_kernels.saved_kinds, the one table the oracle and the C++ ops read too.
SAVED_FULL: tl.constexpr = tl.constexpr(0)
SAVED_INT8: tl.constexpr = tl.constexpr(SAVED_KINDS["int8"].code)
SAVED_FP8: tl.constexpr = tl.constexpr(SAVED_KINDS["fp8"].code)
SAVED_NONE: tl.constexpr = tl.constexpr(3)
INT8_LIMIT: tl.constexpr = tl.constexpr(SAVED_KINDS["int8"].limit)
FP8_LIMIT: tl.constexpr = tl.constexpr(SAVED_KINDS["fp8"].limit)
#: The dtype each kind's copy is addressed as by the kernels: fp8 as its uint8 bits.
KERNEL_VIEW_DTYPES = {"int8": torch.int8, "fp8": torch.uint8}
# The smallest row scale (sas.reference.QUANTIZED_SCALE_MIN, 2**-126): a row's absmax is floored at limit * 2**-126,
# so limit / absmax is at most 2**126 (no overflow to inf) and absmax / limit is never subnormal.
SCALE_MIN: tl.constexpr = tl.constexpr(2.0 ** -126)
# Adding and subtracting 1.5 * 2**23 rounds an fp32 of magnitude below 2**22 to an integer, ties to even.
ROUNDING_MAGIC: tl.constexpr = tl.constexpr(12582912.0)


def _config(block_m: int, block_d: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_D": block_d}, num_warps=num_warps, num_stages=num_stages)


AUTOTUNE_CONFIGS = [_config(*INTERPRETER_CONFIG)] if INTERPRET else [_config(*c) for c in AUTOTUNE_SPACE]


def estimated_smem_bytes(config: triton.Config, rank_pad: int, element_size: int) -> int:
    """Pipelined operand tiles of the largest dot in any of the kernels: (BLOCK_M + R_PAD) x BLOCK_D
    per stage, plus one (BLOCK_M x R_PAD) operand staged through shared memory."""
    block_m, block_d = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_D"]
    stages = max(config.num_stages, 1)
    return element_size * (stages * (block_m + rank_pad) * block_d + block_m * rank_pad)


def config_fits(config: triton.Config, rank_pad: int, element_size: int, kind: str = "rows") -> bool:
    """Whether a ``kind`` kernel's tiles ("rows": the forward and backward rows kernels, "weights": the backward
    weights kernel) fit ``config``'s registers (ROWS_TILE_BUDGET, WEIGHTS_TILE_BUDGET) and its shared memory the
    budget."""
    block_m, block_d, threads = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_D"], 32 * config.num_warps
    tiles = (block_m * rank_pad, block_m * block_d, rank_pad * block_d)
    size = min(element_size, 4)
    if kind == "weights":
        registers = tiles[0] + 2 * tiles[1] + tiles[2] <= WEIGHTS_TILE_BUDGET[size] * threads
    else:
        registers = all(t <= budget * threads for t, budget in zip(tiles, ROWS_TILE_BUDGET[size]))
    return registers and estimated_smem_bytes(config, rank_pad, element_size) <= SMEM_BUDGET_BYTES


def fitting_configs(configs, rank_pad: int, element_size: int, kind: str = "rows"):
    """The configs that fit this kernel kind, rank and dtype; if none does (the row kernels in fp32 at R_PAD 256
    only, see ROWS_TILE_BUDGET), the one of least estimated shared memory, which has the smallest tiles."""
    fitting = [c for c in configs if config_fits(c, rank_pad, element_size, kind)]
    return fitting or [min(configs, key=lambda c: estimated_smem_bytes(c, rank_pad, element_size))]


def launch_configs(configs, named_args, **kwargs):
    """The configs a launch with these arguments may run: :func:`fitting_configs` for its kernel, rank and dtype."""
    rank_pad = kwargs.get("R_PAD", named_args.get("R_PAD"))
    # The compute dtype's operand: g where the kernel reads it (the weights kernel's x may be an 8-bit copy).
    operand = named_args["g_ptr"] if "g_ptr" in named_args else named_args["x_ptr"]
    kind = "weights" if "da_ptr" in named_args else "rows"
    return fitting_configs(configs, rank_pad, operand.element_size(), kind)


def prune_configs(configs, named_args, **kwargs):
    """Autotune hook over :func:`launch_configs`: all of them, or the first without tuning."""
    fitting = launch_configs(configs, named_args, **kwargs)
    return fitting if AUTOTUNE else fitting[:1]


def _autotune(kernel):
    return triton.autotune(configs=AUTOTUNE_CONFIGS, key=["d_in", "d_out", "R_PAD"],
                           prune_configs_by={"early_config_prune": prune_configs})(kernel)


@triton.jit
def _load_modulation(h_ptr, task_ptr, offs_m, row_mask, offs_r, rank_mask, rows_per_task, n_tasks, stride_ht,
                     stride_hr, HAS_TASKS: tl.constexpr):
    """Per-row modulation (BLOCK_M, R_PAD) in fp32: h broadcast, or h[task_ids[row // rows_per_task]]."""
    if HAS_TASKS:
        task = tl.load(task_ptr + offs_m // rows_per_task, mask=row_mask, other=0).to(tl.int64)
        valid = row_mask & (task >= 0) & (task < n_tasks)
        tl.device_assert(valid | ~row_mask, "sas: task_ids out of range")
        # Out-of-range ids read no memory, and their rows get a NaN modulation: a wrong id must be
        # visible in y and the gradients, never a silent zero (the host-side checks raise first).
        hm = tl.load(h_ptr + task[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                     mask=valid[:, None] & rank_mask[None, :], other=0.0)
        hm = tl.where(valid[:, None] | ~row_mask[:, None], hm, float("nan"))
    else:  # (1, R_PAD), broadcast by the caller
        hm = tl.load(h_ptr + offs_r[None, :] * stride_hr, mask=rank_mask[None, :], other=0.0)
    return hm.to(tl.float32)  # one return: Triton unifies the types of every return statement


@triton.jit
def _round_to_integer(v):
    """fp32 ``v`` (|v| < 2**22) rounded to the nearest integer, ties to even (as ``torch.round``)."""
    return (v + ROUNDING_MAGIC) - ROUNDING_MAGIC


@triton.jit
def _encode_fp8(v):
    """The float8 e4m3fn bits (uint8) of fp32 ``v`` with |v| <= 448, rounded to nearest even as PyTorch's
    ``.to(torch.float8_e4m3fn)``: normal values keep 3 mantissa bits of the fp32 pattern (the carry of
    the rounding increment may step the exponent), values below 2**-6 are multiples of 2**-9."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    rounded = magnitude + 0x7FFFF + ((magnitude >> 20) & 1)
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
    subnormal = _round_to_integer(tl.abs(v) * 512.0).to(tl.uint32)
    return (sign | tl.where(magnitude >= 0x3C800000, normal, subnormal)).to(tl.uint8)  # 0x3C800000 = 2**-6


@triton.jit
def _decode_saved(q, SAVED_X: tl.constexpr):
    """The fp32 values of an 8-bit copy's tile (before its row scale): int8 as is, fp8 from its bits."""
    if SAVED_X == SAVED_INT8:
        value = q.to(tl.float32)
    else:
        b = q.to(tl.uint32)
        exponent = (b >> 3) & 15
        normal = (((b & 0x80) << 24) | ((exponent + 120) << 23) | ((b & 7) << 20)).to(tl.float32, bitcast=True)
        subnormal = (b & 7).to(tl.float32) * 0.001953125  # 2**-9
        value = tl.where(exponent > 0, normal, tl.where((b & 0x80) != 0, -subnormal, subnormal))
    return value


@triton.jit
def _quantize_tile(x, inverse, SAVE_X: tl.constexpr):
    """A tile of x as its 8-bit copy: x * (limit / absmax of its row), clamped, rounded (quantize_rows)."""
    limit = INT8_LIMIT if SAVE_X == SAVED_INT8 else FP8_LIMIT
    scaled = tl.minimum(tl.maximum(x.to(tl.float32) * inverse[:, None], -limit), limit)
    if SAVE_X == SAVED_INT8:
        q = _round_to_integer(scaled).to(tl.int8)
    else:
        q = _encode_fp8(scaled)
    return q


@_autotune
@triton.jit
def _sas_forward_kernel(
    # pointers
    x_ptr, base_ptr, a_ptr, b_ptr, h_ptr, task_ptr, y_ptr, u_ptr, q_ptr, qscale_ptr,
    # sizes
    rows, d_in, d_out, rank, rows_per_task, n_tasks,
    # strides (elements): x, base and y rows have a unit-stride last dim (the launcher's as_rows); A, B
    # and h are read through both strides (a stride of 1 is specialized by Triton, so the usual
    # contiguous case compiles to unit-stride loads); the 8-bit copy q is contiguous (rows, d_in)
    stride_xm, stride_basem, stride_ym, stride_ar, stride_ak, stride_bn, stride_br, stride_ht, stride_hr,
    scale,
    # meta
    R_PAD: tl.constexpr, HAS_TASKS: tl.constexpr, SAVE_U: tl.constexpr, SAVE_X: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of rows: u = x @ A.T (fp32), v = s * u * h, y = base + v @ B.T; y stored once. With
    SAVE_X (SAVED_INT8 or SAVED_FP8) also the 8-bit copy of x and its fp32 row scales (quantize_rows):
    the row absmax is taken while x is read for u, and the copy is written from a second sweep over the
    block's rows, which this program has just read (BLOCK_M x d_in, 96 KiB at ViT-B fc1 in bf16: from
    L2, not memory). No extra launch, no extra read of x from memory."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < rows
    offs_r = tl.arange(0, R_PAD)
    rank_mask = offs_r < rank

    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # 0 for a finite row, NaN for a row holding NaN or Inf (x * 0 is NaN there): added to the scale, so
    # such a row's copy dequantizes to NaN instead of silently to finite values (tl.max drops NaN).
    non_finite = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_D):
        offs_k = k0 + tl.arange(0, BLOCK_D)
        k_mask = offs_k < d_in
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                      mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
        u += tl.dot(x, a_t, input_precision=DOT_PRECISION)
        if SAVE_X != SAVED_FULL:
            absmax = tl.maximum(absmax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            non_finite += tl.sum(x.to(tl.float32) * 0.0, axis=1)
    if SAVE_U:
        tl.store(u_ptr + offs_m[:, None] * rank + offs_r[None, :], u, mask=row_mask[:, None] & rank_mask[None, :])
    if SAVE_X != SAVED_FULL:
        limit = INT8_LIMIT if SAVE_X == SAVED_INT8 else FP8_LIMIT
        # div_rn: IEEE division rounded once, as the oracle's; Triton's fp32 `/` is approximate on CUDA.
        limits = tl.full((BLOCK_M,), limit, tl.float32)
        floored = tl.maximum(absmax, limit * SCALE_MIN)
        inverse = tl.where(absmax > 0, tl.math.div_rn(limits, floored), 0.0)
        tl.store(qscale_ptr + offs_m, tl.where(absmax > 0, tl.math.div_rn(floored, limits), 0.0) + non_finite,
                 mask=row_mask)
        for k0 in range(0, d_in, BLOCK_D):
            offs_k = k0 + tl.arange(0, BLOCK_D)
            tile_mask = row_mask[:, None] & (offs_k < d_in)[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=tile_mask, other=0.0)
            tl.store(q_ptr + offs_m[:, None] * d_in + offs_k[None, :], _quantize_tile(x, inverse, SAVE_X),
                     mask=tile_mask)

    hm = _load_modulation(h_ptr, task_ptr, offs_m, row_mask, offs_r, rank_mask, rows_per_task, n_tasks, stride_ht,
                          stride_hr, HAS_TASKS)
    v = (u * hm * scale).to(x_ptr.dtype.element_ty)
    for n0 in range(0, d_out, BLOCK_D):
        offs_n = n0 + tl.arange(0, BLOCK_D)
        n_mask = offs_n < d_out
        out_mask = row_mask[:, None] & n_mask[None, :]
        b_t = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                      mask=rank_mask[:, None] & n_mask[None, :], other=0.0)
        base = tl.load(base_ptr + offs_m[:, None] * stride_basem + offs_n[None, :], mask=out_mask, other=0.0)
        # base is added after the rank sum, as PyTorch's base + s * (v @ B.T) does: seeding the dot's
        # accumulator with base would round each partial sum at base's magnitude.
        y = base.to(tl.float32) + tl.dot(v, b_t, input_precision=DOT_PRECISION)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


@_autotune
@triton.jit
def _sas_backward_rows_kernel(
    # pointers
    g_ptr, a_ptr, b_ptr, h_ptr, task_ptr, gb_ptr, dx_ptr, partial_ptr,
    # sizes
    rows, d_in, d_out, rank, rows_per_task, n_tasks, counters_start, n_counters,
    # strides (g and dx rows have a unit-stride last dim; A, B and h: see the forward kernel)
    stride_gm, stride_dxm, stride_ar, stride_ak, stride_bn, stride_br, stride_ht, stride_hr,
    scale,
    # meta
    R_PAD: tl.constexpr, HAS_TASKS: tl.constexpr, ACCUMULATE_DX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of rows: gB = g @ B (stored, fp32), du = s * gB * h, dx = du @ A (+ dx already there
    when ACCUMULATE_DX: the frozen path's g @ W0, so the layer's dx needs no separate add).

    It also zeroes the ``n_counters`` split counters of the weights kernel that runs next on the same
    stream (int32 words at ``partial_ptr + counters_start``, the tail of that launch's partials buffer;
    0.0f has the bits of int32 0): the counters belong to one backward, cost no launch of their own,
    and are zero whatever the memory held before (a fresh allocation, a CUDA-graph replay)."""
    pid = tl.program_id(0)
    offs_c = tl.arange(0, COUNTER_BLOCK)
    for c0 in range(pid * COUNTER_BLOCK, n_counters, tl.num_programs(0) * COUNTER_BLOCK):
        tl.store(partial_ptr + counters_start + c0 + offs_c, tl.zeros((COUNTER_BLOCK,), dtype=tl.float32),
                 mask=c0 + offs_c < n_counters)

    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < rows
    offs_r = tl.arange(0, R_PAD)
    rank_mask = offs_r < rank

    gb = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, d_out, BLOCK_D):
        offs_n = n0 + tl.arange(0, BLOCK_D)
        n_mask = offs_n < d_out
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & rank_mask[None, :], other=0.0)
        gb += tl.dot(g, b, input_precision=DOT_PRECISION)
    tl.store(gb_ptr + offs_m[:, None] * rank + offs_r[None, :], gb, mask=row_mask[:, None] & rank_mask[None, :])

    hm = _load_modulation(h_ptr, task_ptr, offs_m, row_mask, offs_r, rank_mask, rows_per_task, n_tasks, stride_ht,
                          stride_hr, HAS_TASKS)
    du = (gb * hm * scale).to(g_ptr.dtype.element_ty)
    for k0 in range(0, d_in, BLOCK_D):
        offs_k = k0 + tl.arange(0, BLOCK_D)
        k_mask = offs_k < d_in
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=rank_mask[:, None] & k_mask[None, :], other=0.0)
        dx = tl.dot(du, a, input_precision=DOT_PRECISION)
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
        dx_mask = row_mask[:, None] & k_mask[None, :]
        if ACCUMULATE_DX:
            dx += tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(tl.float32)
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.jit
def _store_reduced(acc, out_ptr, partial_ptr, partials_base, counter_index, offsets, mask, split, n_splits,
                   split_stride, ONE_SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Write one tile of a weight gradient summed over every row split, in a fixed order.

    With one split the tile is the whole sum: it is stored once, in the gradient's dtype. Otherwise
    each split stores its fp32 partial, counts itself in at the tile's counter, and the split that
    arrives last sums all partials in split order (0, 1, ...) and stores the result, so the sum does
    not depend on which split finished when: bitwise-identical gradients without a second launch.
    The counters are this launch's own (the rows kernel zeroed them just before); the last split still
    resets its tile's counter to 0, so the launch can be repeated on the same buffers (the autotuner's
    timing runs do). With ACCUMULATE the sum is added to what ``out`` holds (layers sharing A/B add
    their gradients in place, with no add kernel).
    """
    if ONE_SPLIT:
        if ACCUMULATE:
            acc += tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + split.to(tl.int64) * split_stride + offsets, acc, mask=mask)
        # The tile counters follow the n_splits partials in the same buffer (int32 words), computed here
        # from kernel arguments rather than kept live in registers through the tile's loop.
        counter_ptr = (partials_base + n_splits * split_stride).to(tl.pointer_type(tl.int32), bitcast=True)
        # Every thread's partial store must be ordered before the one thread that performs the
        # scalar atomic: a block barrier first, then the atomic's release (acq_rel, gpu scope).
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + counter_index, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            total = tl.zeros_like(acc)
            for other in range(0, n_splits):
                # .cg: read through L2, where the other programs' partials are, never a stale L1 line.
                total += tl.load(partial_ptr + other * split_stride + offsets, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            if ACCUMULATE:
                total += tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr + counter_index, 0, sem="relaxed")


@triton.jit
def _da_tile(x_ptr, xscale_ptr, gb_ptr, h_ptr, task_ptr, partial_ptr, partials_base, da_ptr, tile, split, block,
             row_start, row_end, d_in, rank, rows_per_task, n_tasks, n_splits, split_stride, stride_xm, stride_ht,
             stride_hr, scale, compute_dtype: tl.constexpr, R_PAD: tl.constexpr, HAS_TASKS: tl.constexpr,
             ONE_SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr, SAVED_X: tl.constexpr, DOT_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns ``block`` of dA = (s * gB * h).T @ x over the rows of one split. From an 8-bit copy (SAVED_X
    SAVED_INT8/SAVED_FP8) x = q * scale per row: the tile of q is decoded in registers and multiplied by its
    row scales in fp32, then rounded to the compute dtype, as x itself is in the full mode. (Folding the
    scale into du instead, the small operand, rounded du * scale to fp16, whose subnormals start at 6e-5:
    with gradients of 1e-4 that cost dA a relative error of 1.3e-2 (int8) and 4.5e-2 (fp8) against the
    full mode's 3e-4.)"""
    offs_r = tl.arange(0, R_PAD)
    rank_mask = offs_r < rank
    offs_k = block * BLOCK_D + tl.arange(0, BLOCK_D)
    k_mask = offs_k < d_in
    acc = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = offs_m < row_end
        gb = tl.load(gb_ptr + offs_m[:, None] * rank + offs_r[None, :],
                     mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        hm = _load_modulation(h_ptr, task_ptr, offs_m, row_mask, offs_r, rank_mask, rows_per_task, n_tasks,
                              stride_ht, stride_hr, HAS_TASKS)
        du = gb * hm * scale
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0)
        if SAVED_X != SAVED_FULL:
            xscale = tl.load(xscale_ptr + offs_m, mask=row_mask, other=0.0)
            x = (_decode_saved(x, SAVED_X) * xscale[:, None]).to(compute_dtype)
        acc += tl.dot(tl.trans(du.to(compute_dtype)), x, input_precision=DOT_PRECISION)
    _store_reduced(acc, da_ptr, partial_ptr, partials_base, tile, offs_r[:, None] * d_in + offs_k[None, :],
                   rank_mask[:, None] & k_mask[None, :], split, n_splits, split_stride, ONE_SPLIT, ACCUMULATE)


@triton.jit
def _db_tile(g_ptr, u_ptr, h_ptr, task_ptr, partial_ptr, partials_base, db_ptr, tile, split, block,
             row_start, row_end, d_out, rank, rows_per_task, n_tasks, n_splits, split_stride, stride_gm, stride_ht,
             stride_hr, scale, R_PAD: tl.constexpr, HAS_TASKS: tl.constexpr, ONE_SPLIT: tl.constexpr,
             ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``block`` of dB = g.T @ (s * u * h) over the rows of one split."""
    offs_r = tl.arange(0, R_PAD)
    rank_mask = offs_r < rank
    offs_n = block * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = offs_n < d_out
    acc = tl.zeros((BLOCK_D, R_PAD), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = offs_m < row_end
        u = tl.load(u_ptr + offs_m[:, None] * rank + offs_r[None, :],
                    mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        hm = _load_modulation(h_ptr, task_ptr, offs_m, row_mask, offs_r, rank_mask, rows_per_task, n_tasks,
                              stride_ht, stride_hr, HAS_TASKS)
        v = (u * hm * scale).to(g_ptr.dtype.element_ty)
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(tl.trans(g), v, input_precision=DOT_PRECISION)
    _store_reduced(acc, db_ptr, partial_ptr, partials_base, tile, offs_n[:, None] * rank + offs_r[None, :],
                   n_mask[:, None] & rank_mask[None, :], split, n_splits, split_stride, ONE_SPLIT, ACCUMULATE)


@triton.jit
def _dh_tile(gb_ptr, u_ptr, task_ptr, partial_ptr, partials_base, dh_ptr, tile, split, block,
             row_start, row_end, rank, rows_per_task, n_tasks, n_splits, split_stride, scale,
             R_PAD: tl.constexpr, HAS_TASKS: tl.constexpr, ONE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tasks ``block`` of dh[t] = s * sum over the split's rows of task t of gB * u."""
    offs_r = tl.arange(0, R_PAD)
    rank_mask = offs_r < rank
    offs_t = block * TASK_BLOCK + tl.arange(0, TASK_BLOCK)
    acc = tl.zeros((TASK_BLOCK, R_PAD), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = offs_m < row_end
        tile_mask = row_mask[:, None] & rank_mask[None, :]
        gb = tl.load(gb_ptr + offs_m[:, None] * rank + offs_r[None, :], mask=tile_mask, other=0.0)
        u = tl.load(u_ptr + offs_m[:, None] * rank + offs_r[None, :], mask=tile_mask, other=0.0)
        if HAS_TASKS:
            task = tl.load(task_ptr + offs_m // rows_per_task, mask=row_mask, other=-1)
            # Segment sum as a one-hot matmul: exact products, fixed order, no atomics.
            one_hot = (task[:, None] == offs_t[None, :]).to(tl.float32)
            acc = tl.dot(tl.trans(one_hot), gb * u, acc, input_precision="ieee")
        else:
            acc += tl.sum(gb * u, axis=0)[None, :]
    _store_reduced(acc * scale, dh_ptr, partial_ptr, partials_base, tile, offs_t[:, None] * rank + offs_r[None, :],
                   (offs_t < n_tasks)[:, None] & rank_mask[None, :], split, n_splits, split_stride, ONE_SPLIT,
                   False)


@_autotune
@triton.jit
def _sas_backward_weights_kernel(
    # pointers
    x_ptr, xscale_ptr, g_ptr, u_ptr, gb_ptr, h_ptr, task_ptr, partial_ptr, da_ptr, db_ptr, dh_ptr,
    # sizes
    rows, d_in, d_out, rank, rows_per_task, n_tasks, rows_per_split, n_splits,
    # strides (x and g rows have a unit-stride last dim; dA, dB and dh are contiguous)
    stride_xm, stride_gm, stride_ht, stride_hr,
    scale,
    # meta
    R_PAD: tl.constexpr, HAS_TASKS: tl.constexpr, ONE_SPLIT: tl.constexpr, ACCUMULATE_DA: tl.constexpr,
    ACCUMULATE_DB: tl.constexpr, SAVED_X: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The weight gradients, one program per (tile, row split), tiles in grid order: the d_in column
    blocks of dA, the d_out row blocks of dB, then the task blocks of dh. One launch instead of one
    kernel per gradient: dA and dB read the same kind of tiles and differ only in the wide operand.
    ``x_ptr`` holds what the layer kept of x (SAVED_X): x itself, its 8-bit copy with ``xscale_ptr`` the
    row scales, or nothing (SAVED_NONE: no dA tiles)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    in_blocks = 0 if SAVED_X == SAVED_NONE else tl.cdiv(d_in, BLOCK_D)
    out_blocks = tl.cdiv(d_out, BLOCK_D)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows)
    # Partials of one split, side by side: dA (rank, d_in), dB (d_out, rank), dh (n_tasks, rank); after
    # the n_splits of them, the int32 tile counters the rows kernel zeroed.
    split_stride = rank * (d_in + d_out + n_tasks)
    if tile < in_blocks:
        _da_tile(x_ptr, xscale_ptr, gb_ptr, h_ptr, task_ptr, partial_ptr, partial_ptr, da_ptr, tile, split, tile,
                 row_start, row_end, d_in, rank, rows_per_task, n_tasks, n_splits, split_stride, stride_xm,
                 stride_ht, stride_hr, scale, g_ptr.dtype.element_ty, R_PAD, HAS_TASKS, ONE_SPLIT, ACCUMULATE_DA,
                 SAVED_X, DOT_PRECISION, BLOCK_M, BLOCK_D)
    elif tile < in_blocks + out_blocks:
        _db_tile(g_ptr, u_ptr, h_ptr, task_ptr, partial_ptr + rank * d_in, partial_ptr, db_ptr, tile, split,
                 tile - in_blocks, row_start, row_end, d_out, rank, rows_per_task, n_tasks, n_splits, split_stride,
                 stride_gm, stride_ht, stride_hr, scale, R_PAD, HAS_TASKS, ONE_SPLIT, ACCUMULATE_DB, DOT_PRECISION,
                 BLOCK_M, BLOCK_D)
    else:
        _dh_tile(gb_ptr, u_ptr, task_ptr, partial_ptr + rank * (d_in + d_out), partial_ptr, dh_ptr, tile, split,
                 tile - in_blocks - out_blocks, row_start, row_end, rank, rows_per_task, n_tasks, n_splits,
                 split_stride, scale, R_PAD, HAS_TASKS, ONE_SPLIT, BLOCK_M)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


# Configs the autotuner chose, per (kernel, device, tuning key): every eager launch calls the JIT
# function with its config directly, skipping the autotuner's own per-launch work.
_chosen_configs: Dict[tuple, triton.Config] = {}


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _launch(kernel, grid, args: tuple, constexprs: dict, tuning_key: tuple, traced: bool,
            inplace: Tuple[str, ...] = ()) -> None:
    """Launch ``kernel`` on ``grid`` (a callable of the config's meta-parameters).

    ``traced``: called from the ``torch.library`` ops below, which torch.compile traces, so the launch
    goes through ``wrap_triton``. Eager launches call Triton directly (no torch.library dispatch) with
    the config chosen for ``tuning_key``, found once per key by :func:`_chosen_config`. ``inplace``: the
    kernel's names of the arguments it reads and then writes (``y_ptr`` over base, ``dx_ptr``, ``da_ptr``,
    ``db_ptr`` accumulated into): the autotuner never times its configs on them (see :func:`_chosen_config`).
    Under the interpreter, eager launches take the same path (so CPU tests run it), the ops are opaque
    (see :func:`_op`), and a launch on fake tensors (the ops' fake implementation, run while tracing)
    launches nothing: only the output shapes are needed.
    """
    if traced and INTERPRET:
        if _is_fake(args[0]):
            return
        traced = False
    record_launch(_kernel_name(kernel))
    if traced:
        torch.library.wrap_triton(kernel)[grid](*args, **constexprs)
        return
    if not isinstance(kernel, triton.runtime.Autotuner):
        kernel[grid](*args, **constexprs)
        return
    key = (kernel, args[0].device.index, tuning_key)
    config = _chosen_configs.get(key)
    if config is None:
        config = _chosen_configs[key] = _chosen_config(kernel, grid, args, constexprs, inplace)
    # Exactly what the autotuner passes for its chosen config (meta-parameters, warps, stages, ...).
    kernel.fn[grid(dict(constexprs, **config.kwargs))](*args, **constexprs, **config.all_kwargs())


def _chosen_config(kernel, grid, args: tuple, constexprs: dict, inplace: Tuple[str, ...]) -> triton.Config:
    """The config of ``kernel`` for these arguments' tuning key: the only one that fits, or the autotuner's pick.

    Triton's autotuner times each config by running the kernel on the arguments it is given, several
    times, and then runs the best once more: a kernel that adds into a tensor it was given would add
    once per run. So the autotuner runs on scratch copies of the ``inplace`` arguments (one copy per
    tensor, so aliases such as y written over base stay aliased), and the caller then launches the
    chosen config once on the real ones. This costs a copy and one extra launch on the first call per
    tuning key only, and nothing when one config fits (``SAS_TRITON_AUTOTUNE=0``, the interpreter).
    """
    configs = kernel.configs
    if len(configs) > 1:
        configs = prune_configs(configs, dict(zip(kernel.arg_names, args)), **constexprs)
    if len(configs) == 1:
        return configs[0]
    scratch = {}
    for name in inplace:
        tensor = args[kernel.arg_names.index(name)]
        scratch.setdefault(id(tensor), tensor.clone())
    kernel[grid](*(scratch.get(id(a), a) for a in args), **constexprs)
    return kernel.best_config


def rank_pad(rank: int) -> int:
    return max(MIN_RANK_PAD, triton.next_power_of_2(rank))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, last dim) with a unit-stride last dim: a view whenever the leading dims
    collapse to one row stride (contiguous or column-sliced tensors), a copy only otherwise."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t.dim() != 2 else t
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def row_splits(rows: int, rank: int, width: int) -> Tuple[int, int]:
    """(number of row splits, rows per split) for the column-blocked reductions; depends only on the shape."""
    splits = min(triton.cdiv(rows, MIN_ROWS_PER_SPLIT), MAX_SPLITS, max(1, PARTIAL_BUDGET // max(rank * width, 1)))
    per_split = triton.cdiv(triton.cdiv(rows, splits), SPLIT_ROW_ALIGN) * SPLIT_ROW_ALIGN
    return triton.cdiv(rows, per_split), per_split


def _task_layout(h: torch.Tensor, task_ids: Optional[torch.Tensor], rows: int):
    """(task pointer tensor, rows per task id, number of tasks, h's task stride, h's rank stride).

    The kernels index task ids with unit stride, so a strided ``task_ids`` (e.g. ``ids[::2]``) is copied.
    """
    if h.dim() == 1:
        return h, 1, 1, 0, h.stride(0)  # the task pointer is never read when HAS_TASKS is False
    return task_ids.contiguous(), max(rows // max(task_ids.numel(), 1), 1), h.shape[0], h.stride(0), h.stride(1)


def _check_rows(name: str, t: torch.Tensor) -> None:
    """The kernels address a row tensor as ``ptr + row * stride(0) + column``: its last dim must have unit stride."""
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"sas_kernels: {name} must have a unit-stride last dim (see as_rows); got strides "
                         f"{tuple(t.stride())}")


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"sas_kernels: {name} to accumulate into must be contiguous; got strides {tuple(t.stride())}")


def _device_guard(t: torch.Tensor):
    """Launch on ``t``'s own GPU (e.g. cuda:1 while cuda:0 is current); no guard where it already is."""
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def saved_input_buffers(kind: str, rows: int, d_in: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(q, scale)`` of the 8-bit copy of ``kind`` ("int8", "fp8") for ``rows`` rows of ``d_in``: q in
    the dtype of :func:`sas.reference.quantize_rows` (int8, float8_e4m3fn), scale float32 (rows,)."""
    q = torch.empty((rows, d_in), dtype=SAVED_KINDS[kind].dtype, device=device)
    return q, torch.empty((rows,), dtype=torch.float32, device=device)


def _kernel_view(q: torch.Tensor, kind: str) -> torch.Tensor:
    """An 8-bit copy as the kernels address it: fp8 as its uint8 bits (see KERNEL_VIEW_DTYPES)."""
    return q.view(KERNEL_VIEW_DTYPES[kind])


def sas_forward(x2: torch.Tensor, base2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h: torch.Tensor,
                task_ids: Optional[torch.Tensor], scale: float, save_u: bool = True,
                out: Optional[torch.Tensor] = None, traced: bool = False,
                saved_input: Optional[Tuple[str, torch.Tensor, torch.Tensor]] = None):
    """y (rows, d_out) in base's dtype and u = x @ A.T (rows, r) fp32 (empty unless ``save_u``).

    ``x2``, ``base2`` and ``out`` are row tensors with a unit-stride last dim (:func:`as_rows`; checked);
    ``A``, ``B`` and ``h`` may have any strides. ``out=base2`` writes y over base in place (each
    program reads its base tile before writing it). ``saved_input=(kind, q, scale)``: the same launch
    also writes x's 8-bit copy into ``q`` and ``scale`` (:func:`saved_input_buffers`), as
    :func:`sas.reference.quantize_rows` would. ``traced`` is for the torch.library op (see :func:`_launch`).
    """
    rows, d_in = x2.shape
    d_out, rank = B.shape
    y = torch.empty((rows, d_out), dtype=base2.dtype, device=x2.device) if out is None else out
    u = torch.empty((rows, rank) if save_u else (0, rank), dtype=torch.float32, device=x2.device)
    if rows == 0:
        return y, u
    if saved_input is None:
        save_x, q, qscale = SAVED_FULL.value, u, u  # never read
    else:
        kind, q, qscale = saved_input
        save_x, q = SAVED_KINDS[kind].code, _kernel_view(q, kind)
        if not (q.is_contiguous() and q.shape == x2.shape and qscale.shape == (rows,) and qscale.is_contiguous()):
            raise ValueError(f"sas_kernels: the 8-bit copy must be contiguous ({rows}, {d_in}) with ({rows},) "
                             f"scales; got {tuple(q.shape)} and {tuple(qscale.shape)}")
    _check_rows("x", x2), _check_rows("base", base2), _check_rows("out", y)
    tasks, rows_per_task, n_tasks, stride_ht, stride_hr = _task_layout(h, task_ids, rows)
    r_pad = rank_pad(rank)
    with _device_guard(x2):
        _launch(_sas_forward_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
                (x2, base2, A, B, h, tasks, y, u, q, qscale,
                 rows, d_in, d_out, rank, rows_per_task, n_tasks,
                 x2.stride(0), base2.stride(0), y.stride(0), *A.stride(), *B.stride(), stride_ht, stride_hr,
                 scale),
                dict(R_PAD=r_pad, HAS_TASKS=h.dim() == 2, SAVE_U=save_u, SAVE_X=save_x,
                     DOT_PRECISION=FP32_DOT_PRECISION),
                (x2.dtype, d_in, d_out, r_pad), traced, inplace=() if out is None else ("y_ptr",))
    return y, u


# Every BLOCK_D is at least 16 (tl.dot's minimum): a launch has at most this many tiles per 16 columns
# of d_in or d_out, whichever config runs, so this bounds the split counters a backward needs.
MIN_BLOCK_D = 16
def sas_backward(g2: torch.Tensor, x2: Optional[torch.Tensor], u: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 h: torch.Tensor, task_ids: Optional[torch.Tensor], scale: float,
                 dx: Optional[torch.Tensor] = None, traced: bool = False,
                 dA: Optional[torch.Tensor] = None, dB: Optional[torch.Tensor] = None,
                 saved_input: Optional[Tuple[str, torch.Tensor]] = None):
    """(dx, dA, dB, dh) for incoming gradient g (rows, d_out); dbase is g itself. Two launches.

    ``x2`` is what the forward kept of x: x itself; or, with ``saved_input=(kind, scale)``, its 8-bit copy
    (:func:`sas_forward`'s q), dequantized in registers for dA; or ``None``, and then no dA is computed
    (returned as ``None``): A gets no gradient, and only dA needs x.

    A given ``dx`` (rows, d_in), e.g. the frozen layer's ``g @ W0``, is accumulated into in place, and so
    are a given ``dA`` (rank, d_in) and ``dB`` (d_out, rank), contiguous (checked): gradients of A/B
    shared by several layers. ``g2``, ``x2`` and ``dx`` are row tensors with a unit-stride last dim
    (checked); ``A``, ``B`` and ``h`` may have any strides. dA, dB and dh come out in A's, B's and h's
    dtype. The split counters are this call's own, at the tail of its partials buffer, zeroed by the
    rows kernel: no state outlives the call, so concurrent streams, CUDA-graph replays and traced calls
    never share one. ``traced``: see :func:`_launch`.
    """
    rows, d_in = g2.shape[0], A.shape[1]
    d_out, rank = B.shape
    accumulate_dx = dx is not None
    if dx is None:
        dx = torch.empty((rows, d_in), dtype=g2.dtype, device=g2.device)
    wants_da = x2 is not None
    if rows == 0:
        return (dx, (torch.zeros_like(A) if dA is None else dA) if wants_da else None,
                torch.zeros_like(B) if dB is None else dB, torch.zeros_like(h))
    if not wants_da:
        saved_x, x2, xscale = SAVED_NONE.value, g2, u  # never read
    elif saved_input is None:
        saved_x, xscale = SAVED_FULL.value, u  # xscale never read
    else:
        kind, xscale = saved_input
        saved_x, x2 = SAVED_KINDS[kind].code, _kernel_view(x2, kind)
    _check_rows("g", g2), _check_rows("x", x2), _check_rows("dx", dx)
    tasks, rows_per_task, n_tasks, stride_ht, stride_hr = _task_layout(h, task_ids, rows)
    has_tasks, r_pad, precision = h.dim() == 2, rank_pad(rank), FP32_DOT_PRECISION
    tuning_key = (g2.dtype, d_in, d_out, r_pad)
    device = g2.device
    gb = torch.empty((rows, rank), dtype=torch.float32, device=device)
    accumulate_da, accumulate_db = dA is not None, dB is not None
    if not wants_da:
        dA = gb  # never written: the weights kernel has no dA tiles
    elif dA is None:
        dA = torch.empty((rank, d_in), dtype=A.dtype, device=device)
    else:
        _check_contiguous("dA", dA)
    if dB is None:
        dB = torch.empty((d_out, rank), dtype=B.dtype, device=device)
    else:
        _check_contiguous("dB", dB)
    dh = torch.empty((n_tasks, rank), dtype=h.dtype, device=device)
    splits, per_split = row_splits(rows, rank, d_in + d_out + n_tasks)
    task_tiles = triton.cdiv(n_tasks, TASK_BLOCK.value)
    # One buffer per call: the splits' fp32 partials, then (int32) one counter per tile of the weights grid.
    if splits == 1:  # the tiles are written directly: no partials, no counters
        counters_start = n_counters = 0
    else:
        counters_start = splits * rank * (d_in + d_out + n_tasks)
        n_counters = triton.cdiv(d_in, MIN_BLOCK_D) * wants_da + triton.cdiv(d_out, MIN_BLOCK_D) + task_tiles
    partials = torch.empty(counters_start + n_counters, dtype=torch.float32, device=device)
    with _device_guard(g2):
        _launch(_sas_backward_rows_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),),
                (g2, A, B, h, tasks, gb, dx, partials,
                 rows, d_in, d_out, rank, rows_per_task, n_tasks, counters_start, n_counters,
                 g2.stride(0), dx.stride(0), *A.stride(), *B.stride(), stride_ht, stride_hr,
                 scale),
                dict(R_PAD=r_pad, HAS_TASKS=has_tasks, ACCUMULATE_DX=accumulate_dx, DOT_PRECISION=precision),
                tuning_key, traced, inplace=("dx_ptr",) if accumulate_dx else ())
        _launch(_sas_backward_weights_kernel,
                lambda meta: (triton.cdiv(d_in, meta["BLOCK_D"]) * wants_da + triton.cdiv(d_out, meta["BLOCK_D"])
                              + task_tiles, splits),
                (x2, xscale, g2, u, gb, h, tasks, partials, dA, dB, dh,
                 rows, d_in, d_out, rank, rows_per_task, n_tasks, per_split, splits,
                 x2.stride(0), g2.stride(0), stride_ht, stride_hr,
                 scale),
                dict(R_PAD=r_pad, HAS_TASKS=has_tasks, ONE_SPLIT=splits == 1, ACCUMULATE_DA=accumulate_da,
                     ACCUMULATE_DB=accumulate_db, SAVED_X=saved_x, DOT_PRECISION=precision),
                tuning_key, traced, inplace=("da_ptr",) * accumulate_da + ("db_ptr",) * accumulate_db)
    return dx, dA if wants_da else None, dB, dh.view(h.shape)


# ----------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile traces (eager callers use the host launchers directly)
# ----------------------------------------------------------------------------------------------

def _op(name: str):
    """``torch.library.triton_op``: torch.compile traces into it and sees the kernels (``wrap_triton``).
    Under the interpreter, an opaque ``custom_op`` instead, whose fake implementation is the same
    function (its launches see fake tensors and launch nothing, :func:`_launch`): interpreted kernels
    cannot be traced, so a compiled graph on CPU calls the op, which launches them eagerly."""
    if INTERPRET:
        def register(fn):
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fn)
            return op
        return register
    return torch.library.triton_op(name, mutates_args=())


@_op("sas::adapter_fwd")
def adapter_fwd(x2: torch.Tensor, base2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h: torch.Tensor,
                task_ids: Optional[torch.Tensor], scale: float, save_u: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return sas_forward(x2, base2, A, B, h, task_ids, scale, save_u, traced=True)


@_op("sas::adapter_bwd")
def adapter_bwd(g2: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                h: torch.Tensor, task_ids: Optional[torch.Tensor], scale: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return sas_backward(g2, x2, u, A, B, h, task_ids, scale, traced=True)

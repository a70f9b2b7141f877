"""Timers, the copy-bandwidth ceiling and peak memory, for CPU and CUDA.

CUDA times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed before
every call, warm-up excluded) or, without Triton, from CUDA events around each call.
CPU times come from ``time.perf_counter`` around each call. Both report the median
and the 20th/80th percentiles in milliseconds.

Timing modes (:data:`TIMING_MODES`): ``eager`` times the call as written, host work included;
``cuda-graph`` captures one call into a CUDA graph and times its replays, which is the device time
alone (no Python, dispatch or launch overhead), CUDA only.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

QUANTILES = (0.5, 0.2, 0.8)
TIMING_MODES = ("eager", "cuda-graph")
# Calls run on a side stream before capture: the first ones compile/autotune and set up cuBLAS
# workspaces and allocator pools, none of which may happen during capture (PyTorch's CUDA-graph recipe).
GRAPH_WARMUP_CALLS = 3

# Warm-up and measuring budgets. CUDA: do_bench's defaults (25 ms / 100 ms) give
# hundreds of samples for the microsecond-scale op; CPU calls take milliseconds to
# a second on a 2-core machine, so a small count bounded by a time budget keeps
# `make bench` under 5 minutes.
CUDA_WARMUP_MS = 25
CUDA_REP_MS = 100
CUDA_MIN_CALLS = 12
CPU_WARMUP_CALLS = 2
CPU_MIN_CALLS = 5
CPU_MAX_CALLS = 50
CPU_BUDGET_S = 0.4

# Copy-bandwidth probe sizes: far larger than the last-level cache (H100 L2 is
# 50 MB, a CPU's L3 tens of MB) so the copy streams from memory.
CUDA_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 256 << 20


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def _quantiles(times_ms) -> Timing:
    ordered = sorted(times_ms)

    def at(q):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return Timing(statistics.median(ordered), at(0.2), at(0.8), len(ordered))


def time_cpu(fn: Callable[[], object]) -> Timing:
    for _ in range(CPU_WARMUP_CALLS):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < CPU_MIN_CALLS or (len(samples) < CPU_MAX_CALLS
                                           and time.perf_counter() - start < CPU_BUDGET_S):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def _one_call_ms(fn: Callable[[], object]) -> float:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def time_cuda(fn: Callable[[], object]) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # do_bench runs about rep / (time per call) calls: stretch rep so slow calls
        # (a model's training step) still give CUDA_MIN_CALLS samples.
        rep = max(CUDA_REP_MS, CUDA_MIN_CALLS * _one_call_ms(fn))
        median, p20, p80 = do_bench(fn, warmup=CUDA_WARMUP_MS, rep=rep, quantiles=list(QUANTILES))
        return Timing(median, p20, p80, max(1, int(rep / max(median, 1e-3))))
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(100):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
    return _quantiles(samples)


def time_cuda_graph(fn: Callable[[], object]) -> Timing:
    """Device time of ``fn`` without its host work: one call captured into a CUDA graph, replays timed
    like :func:`time_cuda`. ``fn`` may run a backward (``autograd.grad``) inside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_CALLS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay)


def measure(fn: Callable[[], object], device: torch.device, mode: str = "eager") -> Timing:
    """Time ``fn`` on ``device`` in timing ``mode`` (see :data:`TIMING_MODES`)."""
    cuda = torch.device(device).type == "cuda"
    if mode == "cuda-graph":
        if not cuda:
            raise ValueError("cuda-graph timing needs a CUDA device")
        return time_cuda_graph(fn)
    return time_cuda(fn) if cuda else time_cpu(fn)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written (docs/design.md §3)."""
    device = torch.device(device)
    size = CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    src = torch.empty(size // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device)
    return 2 * size / (timing.median_ms * 1e-3) / 1e9


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak device memory allocated during one call of ``fn`` (inputs and weights included), MiB.

    Measured on a call of its own, after the timing, so the timer's L2-flush buffer
    is not counted. CUDA only: on CPU PyTorch keeps no allocator statistics and the
    process's peak RSS only ever grows, so no honest per-case figure exists and
    this returns ``None`` (reported as "n/a").
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20

"""Ahead-of-time compilation of the kernels as the runtime launches them, for NVIDIA targets, on any machine.

``python -m sas_kernels.aot --arch 80 90`` runs the host launchers (:func:`sas_forward`,
:func:`sas_backward`) on representative CPU tensors with the launch replaced by a recorder, then compiles
every recorded launch with each config the runtime can pick for it (:func:`launch_configs`, what the
autotuner's pruning keeps), with the JIT's own specialisation: Triton's binder computes the signature and
attributes from the real arguments (16-byte aligned pointers and ints divisible by 16 get
``tt.divisibility``, ints equal to 1 become constants, ints past 2**31 become i64) exactly as a launch
on a GPU would, so what is compiled here is what runs. One JSON line per compilation: kernel, variant,
dtype, rank, config, shared memory, registers per thread and stack (spill) bytes. Launches whose
specialisation is identical (ranks 48 and 64 pad to 64 and are both multiples of 16) are compiled once and
reported for each (``"deduplicated": true``); the rest compile in ``--jobs`` worker processes. ``--grid sweep``
compiles the configs the budgets of :func:`sas_adapter.config_fits` admit and those one step past them, to
re-measure the budgets (on each Triton version the project meets).

It must run without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions this needs); the test
suite runs it in a subprocess (tests/kernels/test_aot.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import sas_adapter as kernels

# Per-block shared-memory limits (bytes) of the targets: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The representative launch: ViT-B/16's fc1 (768 -> 3072) at batch 32 (6,304 rows, so the weights kernel
# reduces over several row splits, its most demanding branch). The widths are multiples of 16, as in
# every common model, so strides and widths carry the divisibility attribute as they do there.
ROWS, D_IN, D_OUT = 32 * 197, 768, 3072
# Sequences of the multi-task launch: one task id per sequence of 197 rows, 4 tasks.
SEQUENCES, TASKS = 32, 4
# Ranks the runtime pads to 16, 32, ..., each taken once at a multiple of 16 and once not (the rank is an
# int argument: divisible by 16 it gets the divisibility attribute, and the kernels address u and gB
# through it), and rank 1 (a constant to the JIT). Every dtype up to MAX_RANK: fp32's row kernels fit no config
# at R_PAD 256 (sas_adapter.ROWS_TILE_BUDGET), so their fallback's stack bytes are reported there too.
FULL_RANKS = {dtype_name: (1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) for dtype_name in DTYPES}
# What `make test` compiles (tests/kernels/test_aot.py), sized for its 2-core budget: each config at the largest
# R_PAD it fits in bf16 and fp32 (registers and shared memory grow with R_PAD, so a config that fits there fits
# below, but for the few bytes ptxas spills by choice under the register cap, see sas_adapter.WEIGHTS_TILE_BUDGET),
# in each kernel's heaviest launch variant (h gathered per task; the fp8 copy written, and decoded in half
# precision), and the row kernels' fp32 fallback at R_PAD 256, which fits no config; rank R_PAD - 8, not a multiple
# of 16, so u and gB addresses get no divisibility. fp16 takes the same registers as bf16 in the weights kernel and
# spilled in no config of the row kernels, so `make test` compiles it once per launch variant (without tasks, rank
# 8, the untuned config; every kernel branch goes through the compiler) and `make aot` in full.
CI_VARIANTS = {  # dtype: the heaviest launch of each kernel (fp32's weights kernel is heavier on x itself)
    "bf16": ("forward fp8 tasks", "rows tasks", "weights fp8 tasks"),
    "fp32": ("forward fp8 tasks", "rows tasks", "weights full tasks"),
}
GRIDS = ("ci", "full", "sweep")


@functools.lru_cache(maxsize=None)
def _launches(dtype_name: str, rank: int, tasks: bool):
    """{variant: (Autotuner, args, constexprs)} of :func:`representative_launches`, built once per process."""
    return {variant: launch for variant, *launch in representative_launches(DTYPES[dtype_name], rank, (tasks,))}


def _configs(dtype_name: str, rank: int, tasks: bool, variant: str):
    autotuner, args, constexprs = _launches(dtype_name, rank, tasks)[variant]
    return kernels.launch_configs(autotuner.configs, dict(zip(autotuner.arg_names, args)), **constexprs)


def _config_tuple(config) -> tuple:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_D"], config.num_warps, config.num_stages


def grid_jobs(grid: str):
    """The (dtype, rank, tasks, variant, config tuple) launches of ``grid`` (see CI_VARIANTS, FULL_RANKS). ``sweep``
    measures the budgets of sas_adapter.config_fits: at each R_PAD (rank R_PAD - 8, and R_PAD itself), in each
    kernel's heaviest launch (CI_VARIANTS), every config of AUTOTUNE_SPACE that fits there or at half that R_PAD
    (one step past the budget; the records say which fit)."""
    jobs = []
    if grid == "sweep":
        r_pads = [kernels.MIN_RANK_PAD << i for i in range((kernels.MAX_RANK // kernels.MIN_RANK_PAD).bit_length())]
        for dtype_name, variants in CI_VARIANTS.items():
            for variant in variants:
                kind = "weights" if variant.startswith("weights") else "rows"
                jobs += [(dtype_name, rank, True, variant, config) for r_pad in r_pads for rank in (r_pad - 8, r_pad)
                         for config in kernels.AUTOTUNE_SPACE
                         if kernels.config_fits(kernels._config(*config), r_pad // 2, DTYPES[dtype_name].itemsize,
                                                kind)]
        return jobs
    if grid == "full":
        for dtype_name, ranks in FULL_RANKS.items():
            for rank in ranks:
                for tasks in (False, True):
                    for variant in _launches(dtype_name, rank, tasks):
                        jobs += [(dtype_name, rank, tasks, variant, _config_tuple(c))
                                 for c in _configs(dtype_name, rank, tasks, variant)]
        return jobs
    for dtype_name, variants in CI_VARIANTS.items():
        element_size = DTYPES[dtype_name].itemsize
        for variant in variants:
            kind = "weights" if variant.startswith("weights") else "rows"
            largest, fallbacks = {}, []  # config -> the largest R_PAD it fits; launches that fit no config
            r_pad = kernels.MIN_RANK_PAD
            while r_pad <= kernels.MAX_RANK:
                for c in _configs(dtype_name, r_pad - 8, True, variant):
                    if kernels.config_fits(c, r_pad, element_size, kind):
                        largest[_config_tuple(c)] = r_pad
                    else:
                        fallbacks.append((dtype_name, r_pad - 8, True, variant, _config_tuple(c)))
                r_pad *= 2
            jobs += [(dtype_name, pad - 8, True, variant, config) for config, pad in largest.items()] + fallbacks
    for variant in _launches("fp16", 8, False):
        jobs.append(("fp16", 8, False, variant, _config_tuple(_configs("fp16", 8, False, variant)[0])))
    return jobs
@contextlib.contextmanager
def _recorded_launches():
    """Replace the launchers' ``_launch`` by a recorder: a list of (kernel, args, constexprs), nothing run."""
    launches = []

    def record(kernel, grid, args, constexprs, tuning_key, traced, inplace=()):
        launches.append((kernel, args, constexprs))

    launch = kernels._launch
    kernels._launch = record
    try:
        yield launches
    finally:
        kernels._launch = launch


def representative_launches(dtype: torch.dtype, rank: int, task_modes=(False, True)):
    """(variant name, Autotuner, args, constexprs) of every launch an adapted layer makes at the representative
    shape: the forward writing y over the frozen output (keeping x, or writing its int8 or fp8 copy), the
    rows kernel adding into the frozen dx, the weights kernel adding into shared dA/dB totals from x, from
    either copy, or with no dA (A frozen); with one shared h and/or one h per task (``task_modes``)."""
    def empty(*shape, dtype=dtype):
        return torch.empty(shape, dtype=dtype)

    out = []
    for tasks in task_modes:
        h = empty(TASKS, rank) if tasks else empty(rank)
        task_ids = torch.zeros(SEQUENCES, dtype=torch.int64) if tasks else None
        x, A, B = empty(ROWS, D_IN), empty(rank, D_IN), empty(D_OUT, rank)
        suffix = " tasks" if tasks else ""
        for kind in (None, "int8", "fp8"):
            saved = None if kind is None else (kind, *kernels.saved_input_buffers(kind, ROWS, D_IN, "cpu"))
            with _recorded_launches() as launches:
                base = empty(ROWS, D_OUT)
                kernels.sas_forward(x, base, A, B, h, task_ids, 0.5, True, out=base, saved_input=saved)
            out += [(f"forward {kind or 'full'}{suffix}", *launch) for launch in launches]
            with _recorded_launches() as launches:
                q, qscale = saved[1:] if saved else (None, None)
                kernels.sas_backward(empty(ROWS, D_OUT), x if kind is None else q,
                                     empty(ROWS, rank, dtype=torch.float32),
                                     A, B, h, task_ids, 0.5, dx=empty(ROWS, D_IN), dA=empty(rank, D_IN),
                                     dB=empty(D_OUT, rank), saved_input=None if kind is None else (kind, qscale))
            rows_launch, weights_launch = launches
            if kind is None:
                out.append((f"rows{suffix}", *rows_launch))
            out.append((f"weights {kind or 'full'}{suffix}", *weights_launch))
        with _recorded_launches() as launches:
            kernels.sas_backward(empty(ROWS, D_OUT), None, empty(ROWS, rank, dtype=torch.float32), A, B, h, task_ids,
                                 0.5, dx=empty(ROWS, D_IN), dB=empty(D_OUT, rank))
        out.append((f"weights no dA{suffix}", *launches[1]))
    return out


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack/local bytes (local memory is where registers spill) of a compiled
    kernel, from ``cuobjdump --dump-resource-usage`` shipped with Triton; {} when the tool is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"])} if found else {}


def _specialise(autotuner, args: tuple, constexprs: dict, config: triton.Config, arch: int):
    """What ``JITFunction.run`` computes before compiling a new specialisation: its binder specialises the real
    arguments. Returns (target, ASTSource, options, constants, attrs, kwargs)."""
    fn = autotuner.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(constexprs, **config.all_kwargs())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constants, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, ASTSource(fn, signature, constants, attrs), options, constants, attrs, kwargs


def compile_launch(autotuner, args: tuple, constexprs: dict, config: triton.Config, arch: int):
    """Compile ``autotuner``'s kernel for ``arch`` as the JIT would for this launch with ``config``.
    Returns (compiled kernel, {"divisible": args given tt.divisibility 16, "constants": ints made constants})."""
    target, source, options, constants, attrs, kwargs = _specialise(autotuner, args, constexprs, config, arch)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    names = autotuner.fn.arg_names
    specialised = {"divisible": [names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr],
                   "constants": {names[path[0]]: value for path, value in constants.items()
                                 if names[path[0]] not in kwargs and isinstance(value, int)}}
    return compiled, specialised


def _find_config(autotuner, config: tuple) -> triton.Config:
    return next(c for c in autotuner.configs if _config_tuple(c) == config)


def specialisation_key(arch: int, job: tuple) -> tuple:
    """Equal for two jobs exactly when Triton would compile them to the same kernel (its own cache key parts)."""
    dtype_name, rank, tasks, variant, config = job
    autotuner, args, constexprs = _launches(dtype_name, rank, tasks)[variant]
    _, source, options, *_ = _specialise(autotuner, args, constexprs, _find_config(autotuner, config), arch)
    return arch, source.hash(), options.hash()


def compile_job(arch: int, job: tuple) -> dict:
    """The record of one (dtype, rank, tasks, variant, config tuple) launch compiled for ``arch``."""
    dtype_name, rank, tasks, variant, config_key = job
    autotuner, args, constexprs = _launches(dtype_name, rank, tasks)[variant]
    config = _find_config(autotuner, config_key)
    start = time.perf_counter()
    compiled, specialised = compile_launch(autotuner, args, constexprs, config, arch)
    kind = "weights" if autotuner.fn.__name__ == "_sas_backward_weights_kernel" else "rows"
    return {"kernel": autotuner.fn.__name__, "variant": variant, "arch": arch, "dtype": dtype_name,
            "rank": rank, "R_PAD": constexprs["R_PAD"], **config.kwargs,
            "num_warps": config.num_warps, "num_stages": config.num_stages, "triton": triton.__version__,
            "fits": kernels.config_fits(config, constexprs["R_PAD"], DTYPES[dtype_name].itemsize, kind),
            "shared": compiled.metadata.shared, "limit": SMEM_LIMIT[arch],
            **resource_usage(compiled.asm["cubin"]), **specialised,
            "signature_i64": [k for k, v in compiled.src.signature.items() if v == "i64"],
            "seconds": round(time.perf_counter() - start, 2)}


def compile_grid(archs, grid: str, jobs: int = 1):
    """One record per (arch, launch of ``grid``), in grid order; identical specialisations compiled once, the
    others by ``jobs`` worker processes (spawned: each imports Triton afresh rather than inherit threads)."""
    work = [(arch, job) for arch in archs for job in grid_jobs(grid)]
    first = {}  # specialisation key -> index in work of the launch that compiles it
    owner = [first.setdefault(specialisation_key(*item), i) for i, item in enumerate(work)]
    unique = sorted(set(owner))
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context))
            results = pool.map(compile_job, *zip(*(work[i] for i in unique)))
        else:
            results = (compile_job(*work[i]) for i in unique)
        # In grid order as they finish: a launch's owner comes no later than itself.
        compiled = {}
        for i, (_, (_, rank, _, variant, _)) in enumerate(work):
            if owner[i] == i:
                compiled[i] = next(results)
                yield compiled[i]
            else:
                yield dict(compiled[owner[i]], variant=variant, rank=rank, seconds=0.0, deduplicated=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sas_kernels.aot",
        description="Compile every Triton kernel as the runtime launches it, with each config the runtime can "
                    "pick, for NVIDIA targets on any machine, and print one JSON line per compilation (registers, "
                    "stack/spill bytes, shared memory). Run without TRITON_INTERPRET=1.")
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(SMEM_LIMIT), choices=sorted(SMEM_LIMIT),
                        help="compute capabilities to compile for (default: %(default)s)")
    parser.add_argument("--grid", choices=GRIDS, default="ci",
                        help="ci: each config at the largest rank it fits in bf16 and fp32, in each kernel's "
                             "heaviest launch, plus every launch once in fp16 (what `make test` compiles); full: "
                             "ranks 1-256 in fp32, fp16 and bf16, every launch, with and without tasks (`make aot`); "
                             "sweep: each config at each R_PAD it fits or is one step past, in each kernel's heaviest "
                             "launch, to measure config_fits's budgets (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="worker processes compiling in parallel (default: the CPU count, %(default)s)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter hides the JIT functions")
    for record in compile_grid(args.arch, args.grid, args.jobs):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

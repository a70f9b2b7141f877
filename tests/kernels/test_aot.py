"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 on CPU, as the runtime launches them
(docs/design.md section 5): ``sas_kernels.aot`` records the host launchers' real launches at a representative
shape and compiles each with every config the runtime can pick for it and the JIT's own specialisation
(divisibility and constant attributes from the real arguments). Catches code the interpreter accepts and the
compiler rejects, and checks each config's real shared memory against the device's per-block limit and its
stack (spill) bytes. Runs in one subprocess without ``TRITON_INTERPRET`` (which would hide the JIT functions),
compiling in one worker process per core.

``make test`` compiles the ``ci`` grid (41 compilations per target: each config at the largest rank it fits,
per kernel in its heaviest launch, in bf16 and fp32, plus every launch variant once in fp16). It runs on both
Triton versions the project meets: 3.8 in ``make test``, 3.6 (the lent GPU machine's) in ``make test-compat``.
``SAS_AOT_GRID=full`` (``make aot``) compiles the full grid instead (ranks 1-256 in fp32, fp16 and bf16, every
launch, with and without tasks; 1,464 distinct compilations per target):
``SAS_AOT_GRID=full .venv/bin/python -m pytest tests/kernels/test_aot.py``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sas_kernels import sas_adapter as kernels
from sas_kernels.aot import SMEM_LIMIT

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_sas_forward_kernel", "_sas_backward_rows_kernel", "_sas_backward_weights_kernel"}
GRID = os.environ.get("SAS_AOT_GRID", "ci")
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-m", "sas_kernels.aot", "--arch", *map(str, SMEM_LIMIT), "--grid", GRID],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200)
    assert out.returncode == 0, f"compilation failed:\n{out.stderr[-4000:]}"
    records = {arch: [] for arch in SMEM_LIMIT}
    for line in out.stdout.splitlines():
        record = json.loads(line)
        records[record["arch"]].append(record)
    return records


@pytest.mark.parametrize("arch", sorted(SMEM_LIMIT))
def test_every_kernel_compiles_within_shared_memory(compiled, arch):
    records = compiled[arch]
    assert {r["kernel"] for r in records} == KERNELS
    over = [r for r in records if r["shared"] > SMEM_LIMIT[arch]]
    assert not over, over


def test_launches_compile_with_the_jits_specialisation(compiled):
    # What the JIT computes from real tensors and ints: aligned pointers and multiples of 16 get divisibility 16,
    # unit strides and a single task become constants; nothing at these sizes needs i64.
    for records in compiled.values():
        for r in records:
            if r["kernel"] == "_sas_forward_kernel" and r["variant"].startswith("forward full"):
                assert {"x_ptr", "base_ptr", "a_ptr", "b_ptr", "y_ptr", "u_ptr", "d_in", "d_out", "stride_xm",
                        "stride_ym"} <= set(r["divisible"]), r
                assert {"stride_ak": 1, "stride_br": 1, "stride_hr": 1}.items() <= r["constants"].items(), r
                assert r["signature_i64"] == [], r


def test_no_config_the_runtime_can_pick_spills(compiled):
    # Every config the runtime can pick compiles with no stack, in every dtype and rank (sas_adapter's budgets, the
    # stricter of Triton 3.6's and 3.8's); only the row kernels in fp32 at R_PAD 256 run a config that does not
    # fit (the fallback of sas_adapter.fitting_configs), and it spills nothing either.
    spills, fallbacks = [], []
    for records in compiled.values():
        for r in records:
            config = kernels._config(r["BLOCK_M"], r["BLOCK_D"], r["num_warps"], r["num_stages"])
            kind = "weights" if r["kernel"] == "_sas_backward_weights_kernel" else "rows"
            element_size = ELEMENT_SIZE[r["dtype"]]
            key = (r["arch"], r["variant"], r["dtype"], r["rank"], r["BLOCK_M"], r["BLOCK_D"], r["num_warps"],
                   r["stack"])
            if not kernels.config_fits(config, r["R_PAD"], element_size, kind):
                fallbacks.append(key)
                assert (kind, r["dtype"], r["R_PAD"]) == ("rows", "fp32", 256), key
            spills += [key] * (r["stack"] > 0)
    assert not spills, spills
    assert fallbacks, "the grid compiles fp32 at R_PAD 256"


def test_every_launch_variant_compiles(compiled):
    # The 8-bit copy written by the forward (SAVE_X) and read by the weights kernel (SAVED_X), the weights kernel
    # without dA (train_down=False), and the rows kernel, each compiled for each target.
    expected = {"forward full", "forward int8", "forward fp8", "rows", "weights full", "weights int8", "weights fp8",
                "weights no dA"}
    for arch, records in compiled.items():
        variants = {r["variant"].removesuffix(" tasks") for r in records}
        assert variants == expected, (arch, variants)


def test_every_config_is_compiled_for_each_kernel(compiled):
    # The subprocess imports without the interpreter, so it sees the whole AUTOTUNE_SPACE: each kernel is compiled
    # with every config that fits it at some rank in bf16 (all of them for the row kernels, those of up to 32 rows
    # for the weights kernel: the 64- and 128-row ones spill at every R_PAD on Triton 3.6).
    for records in compiled.values():
        for kernel in KERNELS:
            kind = "weights" if kernel == "_sas_backward_weights_kernel" else "rows"
            expected = {c for c in kernels.AUTOTUNE_SPACE
                        if any(kernels.config_fits(kernels._config(*c), 2 ** p, 2, kind) for p in range(4, 9))}
            seen = {(r["BLOCK_M"], r["BLOCK_D"], r["num_warps"], r["num_stages"]) for r in records
                    if r["kernel"] == kernel and r["dtype"] == "bf16"}
            assert seen == expected, kernel
            assert len(expected) == len(kernels.AUTOTUNE_SPACE) - 4 * (kind == "weights"), kernel


def _fitting(rank_pad, element_size, kind):
    configs = [kernels._config(*c) for c in kernels.AUTOTUNE_SPACE]
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], c.num_warps) for c in configs
            if kernels.config_fits(c, rank_pad, element_size, kind)]


@pytest.mark.parametrize("kind", ["rows", "weights"])
@pytest.mark.parametrize("element_size", [2, 4])
def test_every_rank_has_a_fitting_config(element_size, kind):
    # Every kernel fits some config at every R_PAD up to MAX_RANK's, but the row kernels in fp32 at 256, which fall
    # back to the smallest tiles, 16x16 over 8 warps (spill-free there, test_no_config_the_runtime_can_pick_spills).
    r_pad = kernels.MIN_RANK_PAD
    while r_pad <= kernels.MAX_RANK:
        if (kind, element_size, r_pad) == ("rows", 4, 256):
            assert _fitting(r_pad, element_size, kind) == []
            configs = [kernels._config(*c) for c in kernels.AUTOTUNE_SPACE]
            assert kernels.fitting_configs(configs, r_pad, element_size, kind) == [kernels._config(16, 16, 8, 2)]
        else:
            assert _fitting(r_pad, element_size, kind), r_pad
        r_pad *= 2


@pytest.mark.parametrize("kind, rank_pad, element_size, config", [
    # Configs measured to spill (stack bytes sm_90/sm_80, heaviest launch, Triton 3.8 unless marked 3.6) that
    # config_fits must keep out: the forward at fp32 rank 128 16x64/8 warps (8/-) and rank 16 64x128/4 warps
    # (16-384/-); the weights kernel at fp32 R_PAD 16 64x64/4 warps (128/-; 3.6 2040/2008), 32 32x64/4 warps (0/40;
    # 3.6 1520/1440), 64 32x64/4 warps (440/-), at half precision R_PAD 32 128x64/8 warps (200/256) and 128x128/8
    # warps (176/256), 64 64x64/4 warps (280/400), 128 32x64/4 warps (0/8), 256 32x64/8 warps (8/8); fp32 R_PAD 64
    # 32x64/8 warps from x itself (0/40; 3.6 232/224). Triton 3.6 only: half precision R_PAD 16 64x64/4 and 64x128/4
    # warps (32/32 each), 32 64x64/4 warps (488/512), 64 32x64/4 warps (0/32), 128 32x64/8 warps (40/32); fp32
    # R_PAD 256 16x32/8 warps (168/128; 112/72 on 3.8).
    ("rows", 128, 4, (16, 64, 8)), ("rows", 16, 4, (64, 128, 4)), ("weights", 16, 4, (64, 64, 4)),
    ("weights", 32, 4, (32, 64, 4)), ("weights", 64, 4, (32, 64, 4)), ("weights", 32, 2, (128, 64, 8)),
    ("weights", 32, 2, (128, 128, 8)), ("weights", 64, 2, (64, 64, 4)), ("weights", 128, 2, (32, 64, 4)),
    ("weights", 256, 2, (32, 64, 8)), ("weights", 64, 4, (32, 64, 8)), ("weights", 16, 2, (64, 64, 4)),
    ("weights", 16, 2, (64, 128, 4)), ("weights", 32, 2, (64, 64, 4)), ("weights", 64, 2, (32, 64, 4)),
    ("weights", 128, 2, (32, 64, 8)), ("weights", 256, 4, (16, 32, 8))])
def test_measured_spilling_configs_do_not_fit(kind, rank_pad, element_size, config):
    assert not kernels.config_fits(kernels._config(*config, 2), rank_pad, element_size, kind)


@pytest.mark.parametrize("rank_pad, element_size", [(16, 2), (256, 4)])
def test_untuned_mode_keeps_the_first_fitting_config(monkeypatch, rank_pad, element_size):
    configs = [kernels._config(*c) for c in kernels.AUTOTUNE_SPACE]
    args = {"R_PAD": rank_pad, "x_ptr": torch.empty(0, dtype={2: torch.bfloat16, 4: torch.float32}[element_size])}
    fitting = kernels.fitting_configs(configs, rank_pad, element_size)
    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    assert kernels.prune_configs(configs, args) == fitting
    monkeypatch.setattr(kernels, "AUTOTUNE", False)
    assert kernels.prune_configs(configs, args) == fitting[:1]


def test_help_runs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "sas_kernels.aot", "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--grid" in out.stdout and "--arch" in out.stdout, out.stderr

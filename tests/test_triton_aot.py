"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 on CPU, as the runtime launches them
(docs/design.md section 5): ``sas_kernels.aot`` records the host launchers' real launches at a representative
shape and compiles each with every config the runtime can pick for it and the JIT's own specialisation
(divisibility and constant attributes from the real arguments). Catches code the interpreter accepts and the
compiler rejects, and checks each config's real shared memory against the device's per-block limit and its
stack (spill) bytes. Runs in subprocesses without ``TRITON_INTERPRET`` (which would hide the JIT functions),
one per target so the two compiles overlap on the CI's 2 cores.

``make test`` compiles the ``ci`` grid (64 compilations per target). ``SAS_AOT_GRID=full`` compiles the full
grid instead (ranks 8-64 in fp32, fp16 and bf16, up to 256 in fp16 and bf16, with and without tasks):
``SAS_AOT_GRID=full .venv/bin/python -m pytest tests/test_triton_aot.py``.
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

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_sas_forward_kernel", "_sas_backward_rows_kernel", "_sas_backward_weights_kernel"}
GRID = os.environ.get("SAS_AOT_GRID", "ci")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    procs = {arch: subprocess.Popen([sys.executable, "-m", "sas_kernels.aot", "--arch", str(arch), "--grid", GRID],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in SMEM_LIMIT}
    records = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"sm_{arch} compilation failed:\n{err[-4000:]}"
        records[arch] = [json.loads(line) for line in out.splitlines()]
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


@pytest.mark.xfail(strict=True, reason="config_fits bounds BLOCK_M x R_PAD only: the weights kernel's R_PAD x BLOCK_D "
                                       "accumulators and fp32's FMA dot operands spill (e.g. sm_90 fp32 rank 24 "
                                       "weights 64x64: 128 stack bytes; bf16 rank 192 weights 32x64: 648)")
def test_no_config_the_runtime_can_pick_spills(compiled):
    spills = [(r["arch"], r["variant"], r["dtype"], r["rank"], r["BLOCK_M"], r["BLOCK_D"], r["num_warps"], r["stack"])
              for records in compiled.values() for r in records if r["stack"] > 0]
    assert not spills, spills


def test_every_launch_variant_compiles(compiled):
    # The 8-bit copy written by the forward (SAVE_X) and read by the weights kernel (SAVED_X), the weights kernel
    # without dA (train_down=False), and the rows kernel, each compiled for each target.
    expected = {"forward full", "forward int8", "forward fp8", "rows", "weights full", "weights int8", "weights fp8",
                "weights no dA"}
    for arch, records in compiled.items():
        variants = {r["variant"].removesuffix(" tasks") for r in records}
        assert variants == expected, (arch, variants)


def test_autotune_space_is_fully_compiled_at_low_rank(compiled):
    # The subprocess imports without the interpreter, so it sees the whole AUTOTUNE_SPACE; at the smallest
    # padded rank every config fits.
    expected = set(kernels.AUTOTUNE_SPACE)
    for records in compiled.values():
        seen = {(r["BLOCK_M"], r["BLOCK_D"], r["num_warps"], r["num_stages"]) for r in records
                if r["kernel"] == "_sas_forward_kernel" and r["dtype"] == "bf16" and r["R_PAD"] == kernels.MIN_RANK_PAD}
        assert seen == expected


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

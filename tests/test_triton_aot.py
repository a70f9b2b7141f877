"""Ahead-of-time compilation of every Triton kernel x autotune config for sm_80 and sm_90 on CPU
(docs/design.md section 5): catches code the interpreter accepts and the compiler rejects, and checks
each config's real shared memory against the device's per-block limit. Runs ``sas_kernels.aot`` in
subprocesses without ``TRITON_INTERPRET`` (which would hide the JIT functions), one per target
so the two 2-core CI compiles overlap."""
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


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    procs = {arch: subprocess.Popen([sys.executable, "-m", "sas_kernels.aot", str(arch)], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in SMEM_LIMIT}
    records = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{arch} compilation failed:\n{err[-4000:]}"
        records[arch] = [json.loads(line) for line in out.splitlines()]
    return records


@pytest.mark.parametrize("arch", sorted(SMEM_LIMIT))
def test_every_kernel_compiles_within_shared_memory(compiled, arch):
    records = compiled[arch]
    assert {r["kernel"] for r in records} == KERNELS
    over = [r for r in records if r["shared"] > SMEM_LIMIT[arch]]
    assert not over, over


def test_autotune_space_is_fully_compiled_at_low_rank(compiled):
    # The subprocess imports without the interpreter, so it sees the whole AUTOTUNE_SPACE.
    expected = set(kernels.AUTOTUNE_SPACE)
    for records in compiled.values():
        seen = {(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_D"], r["num_warps"], r["num_stages"])
                for r in records if r["kernel"] == "_sas_forward_kernel" and r["dtype"] == "bf16"
                and r["constexprs"]["R_PAD"] == kernels.MIN_RANK_PAD}
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


def test_saved_input_variants_compile(compiled):
    # The 8-bit copy written by the forward (SAVE_X) and read by the weights kernel (SAVED_X), and the weights
    # kernel without dA (train_down=False), compiled for each target within shared memory.
    from sas_kernels.aot import SAVED_INPUT_VARIANTS

    for arch, records in compiled.items():
        variants = {r["saved_input"] for r in records if r["saved_input"] is not None}
        assert variants == set(SAVED_INPUT_VARIANTS), (arch, variants)

"""``sas.testing`` and ``python -m sas.check`` catch wrong kernels, silent fallbacks and crashes.

A stand-in kernel (docs/design.md section 1's forward and backward written out by hand in an
``autograd.Function``) is installed in place of the ``cpp`` backend's loaded op; its optional bugs are
the ones real kernels make: a dropped scale, a mishandled last block of rows, an unscaled ``dh``.
"""
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import sas
from sas import backends, check, functional, reference, testing
from sas.reference import gather_modulation

ROW_BLOCK = 16  # the stand-in's "kernel" handles rows in blocks of this many


def stand_in_update(x2, A, B, h, scale, task_ids, bug):
    """(u, modulation, update) of the forward: ``update = s * (u * h) @ B.T`` with the chosen bug."""
    rows = x2.shape[0]
    modulation = gather_modulation(h, task_ids, rows)
    u = x2 @ A.t()
    update = (1.0 if bug == "drop scale" else scale) * (u * modulation) @ B.t()
    if bug == "last block":  # rows past the last full block keep base only
        update[rows - rows % ROW_BLOCK:] = 0
    return u, modulation, update


def stand_in_grads(g2, x2, u, A, B, h, modulation, scale, task_ids, bug):
    """(dx, dA, dB, dh) of the adapter by docs/design.md section 1, with the chosen bug."""
    gB = g2 @ B
    dB = scale * g2.t() @ (u * modulation)
    dh_rows = (1.0 if bug == "unscaled dh" else scale) * gB * u
    if h.dim() == 1:
        dh = dh_rows.sum(0)
    else:
        ids = task_ids if task_ids.numel() == x2.shape[0] else task_ids.repeat_interleave(
            x2.shape[0] // max(task_ids.numel(), 1))
        dh = torch.zeros_like(h).index_add_(0, ids, dh_rows)
    du = scale * gB * modulation
    return du @ A, du.t() @ x2, dB, dh


class StandInKernel(torch.autograd.Function):
    """``base + s * ((x @ A.T) * h) @ B.T`` with the backward of docs/design.md section 1, and a chosen bug."""

    @staticmethod
    def forward(ctx, x, base, A, B, h, scale, task_ids, bug):
        x2 = x.reshape(-1, x.shape[-1])
        u, modulation, update = stand_in_update(x2, A, B, h, scale, task_ids, bug)
        ctx.save_for_backward(x2, u, A, B, h, modulation)
        ctx.scale, ctx.task_ids, ctx.bug, ctx.x_shape = scale, task_ids, bug, x.shape
        return (base.reshape(x2.shape[0], base.shape[-1]) + update).reshape(base.shape)

    @staticmethod
    def backward(ctx, g):
        x2, u, A, B, h, modulation = ctx.saved_tensors
        dx, dA, dB, dh = stand_in_grads(g.reshape(-1, g.shape[-1]), x2, u, A, B, h, modulation, ctx.scale,
                                        ctx.task_ids, ctx.bug)
        return dx.reshape(ctx.x_shape), g, dA, dB, dh, None, None, None


def stand_in(bug=None):
    def op(x, base, A, B, h, scale, task_ids):
        return StandInKernel.apply(x, base, A, B, h, scale, task_ids, bug)
    return op


def stand_in_layer(bug=None):
    """The same stand-in as the whole-layer op SaSLinear calls (the backend record's ``adapted_linear``)."""
    def layer(x, weight, bias, A, B, h, scale, task_ids):
        return StandInKernel.apply(x, torch.nn.functional.linear(x, weight, bias), A, B, h, scale, task_ids, bug)
    return layer


@pytest.fixture
def install(monkeypatch):
    """Install the stand-in with ``bug`` as the ``cpp`` backend (op and whole-layer op) for one test, or
    an op callable at op level only; ``missing=True`` makes the backend unavailable, as if the C++
    extension failed to import. Restored afterwards."""
    def put(bug=None, missing=False):
        real = backends.load("cpp")
        op = bug if callable(bug) else stand_in(bug)
        record = None if missing else dataclasses.replace(
            real, sas_adapter=op, adapted_linear=real.adapted_linear if callable(bug) else stand_in_layer(bug))
        monkeypatch.setitem(backends._loaded, "cpp", record)
        monkeypatch.setattr(backends, "_generation", backends._generation + 1)  # layers pick their route again
    return put


def op_inputs(rows=37, dtype=torch.float32, **extra):
    case = testing.OpCase("t", (rows,), 45, 30, 6, scale=0.5, **extra)
    return case.make_inputs(dtype, "cpu", seed=1)


def failing_tensors(report):
    return {c.tensor for c in report.failures()}


def test_healthy_stand_in_kernel_passes_and_is_seen_running(install):
    install()
    report = testing.compare_op(**op_inputs(tasks=3), backends=["cpp", "reference"])
    assert report.passed, report.table()
    assert {c.tensor for c in report.checks} == {"y", "grad x", "grad base", "grad A", "grad B", "grad h"}
    assert {(c.backend, c.ran) for c in report.checks} == {("cpp", "cpp"), ("reference", "reference")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dropped_scale_is_caught_in_every_dtype(install, dtype):
    install("drop scale")
    report = testing.compare_op(**op_inputs(dtype=dtype), backends=["cpp"])
    assert failing_tensors(report) == {"y"}  # the stand-in drops it in the forward only
    assert all(c.status == "FAIL" and c.ran == "cpp" for c in report.failures())
    assert report.verdict().startswith("FAIL")


def test_last_block_of_rows_is_caught_only_when_rows_are_not_a_multiple_of_the_block(install):
    install("last block")
    assert testing.compare_op(**op_inputs(rows=2 * ROW_BLOCK), backends=["cpp"]).passed
    report = testing.compare_op(**op_inputs(rows=2 * ROW_BLOCK + 5), backends=["cpp"])
    assert "y" in failing_tensors(report), report.table()


def test_backward_only_bug_is_caught_in_its_gradient(install):
    install("unscaled dh")
    report = testing.compare_op(**op_inputs(), backends=["cpp"])
    assert failing_tensors(report) == {"grad h"}, report.table()


def test_raise_on_failure_and_pytest_helper(install):
    install("drop scale")
    with pytest.raises(testing.BackendMismatchError, match="FAIL"):
        testing.compare_op(**op_inputs(), backends=["cpp"], raise_on_failure=True)
    with pytest.raises(AssertionError, match="op float32 cpp y: max abs"):
        testing.assert_matches_reference(*op_inputs().values(), backends=["cpp"])


def test_silent_fallback_is_reported_never_passed(install):
    install(lambda x, base, A, B, h, scale, task_ids: reference.sas_adapter(x, base, A, B, h, scale, task_ids))
    report = testing.compare_op(**op_inputs(), backends=["cpp"])
    assert not report.passed
    assert {c.status for c in report.checks} == {"fallback"} and {c.ran for c in report.checks} == {"reference"}
    allowed = testing.compare_op(**op_inputs(), backends=["cpp"], allow_fallback=True)
    assert allowed.passed and "fell back" in allowed.verdict()


def test_crashing_backend_is_reported_as_error(install):
    def crash(*args):
        raise RuntimeError("kernel launch failed")
    install(crash)
    report = testing.compare_op(**op_inputs(), backends=["cpp", "reference"])
    assert [c.status for c in report.failures()] == ["ERROR"]
    assert "kernel launch failed" in report.table()


def test_bound_is_twice_torch_error_plus_one_rounding_unit():
    exact = torch.tensor([4.0, -2.0], dtype=torch.float64)
    low = torch.tensor([4.0 + 1e-6, -2.0])  # rounds to 4 + 2**-20
    bound = 2 * 2 ** -20 + torch.finfo(torch.float32).eps * 4.0
    check = testing.check_tensor("c", "cpp", ("cpp", False), "y", low, exact, low)
    assert check.status == "pass" and math.isclose(check.bound, bound, rel_tol=1e-3)
    too_far = torch.tensor([4.0 + 2.5 * bound, -2.0])
    assert testing.check_tensor("c", "cpp", ("cpp", False), "y", too_far, exact, low).status == "FAIL"
    nan = torch.tensor([float("nan"), -2.0])
    assert testing.check_tensor("c", "cpp", ("cpp", False), "y", nan, exact, low).status == "FAIL"
    missing = testing.check_tensor("c", "cpp", ("cpp", False), "grad h", None, exact, low)
    assert missing.status == "FAIL" and "no gradient" in missing.message


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(24, 40), nn.Linear(40, 24)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def tiny_model():
    torch.manual_seed(0)
    model = sas.inject(TinyMLP(), sas.SaSConfig(rank=4, targets=["up", "down"], scale=0.5))
    return testing.randomize_adapter(model)


def test_model_check_covers_layers_and_every_trainable_gradient(install):
    install()
    model = tiny_model()
    report = testing.compare_model(model, torch.randn(3, 5, 24), backends=["cpp", "reference"])
    assert report.passed, report.table()
    tensors = {c.tensor for c in report.checks}
    assert {"output", "layer up", "layer down", "grad input 0", "grad sas_shared.embeddings",
            "grad sas_shared.hyper.output.weight"} <= tensors
    assert {f"grad {n}" for n, p in model.named_parameters() if p.requires_grad} <= tensors


def test_model_check_catches_a_wrong_kernel_and_restores_the_backend(install):
    install("drop scale")
    functional.set_backend("reference")
    try:
        report = testing.compare_model(tiny_model(), torch.randn(7, 24), backends=["cpp"])
        assert functional.get_backend() == "reference"
    finally:
        functional.set_backend(None)
    assert {"layer up", "layer down", "output"} <= failing_tensors(report)


def test_model_returning_a_tuple_is_refused_and_backend_restored():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(8, 8)

        def forward(self, x):
            return self.inner(x), x

    model = sas.inject(TwoOutputs(), sas.SaSConfig(rank=2, targets=["inner"]))
    before = functional.get_backend()
    with pytest.raises(TypeError, match="one tensor"):
        testing.compare_model(model, torch.randn(2, 8), backends=["reference"])
    assert functional.get_backend() == before


def test_standalone_sas_linear(install):
    install()
    layer = testing.randomize_adapter(sas.SaSLinear.from_linear(nn.Linear(33, 17), rank=5, scale=0.5))
    testing.assert_matches_reference(layer, torch.randn(2, 9, 33), backends=["cpp", "reference"])


def test_report_is_json_ready(install):
    install("drop scale")
    report = testing.compare_op(**op_inputs(rows=0), backends=["cpp"])
    report.extend(testing.compare_op(**op_inputs(), backends=["cpp"]))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False and len(data["checks"]) == 12


def test_cli_passes_on_the_healthy_build(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert check.main(["--quick", "--json", str(out)]) == 0
    assert "sas.check: PASS" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["passed"] and set(data["environment"]["backends"]) == {c["backend"] for c in data["checks"]}


@pytest.mark.parametrize("bug", ["drop scale", "last block", "unscaled dh"])
def test_cli_fails_on_a_wrong_kernel(install, bug, capsys):
    install(bug)
    assert check.main(["--quick", "--backend", "cpp"]) == 1
    assert "sas.check: FAIL" in capsys.readouterr().out


def test_cli_fails_when_nothing_could_be_checked(install, capsys):
    install(missing=True)  # as if the C++ extension failed to import
    assert check.main(["--quick", "--backend", "cpp"]) == 1
    assert "FAIL: nothing was checked" in capsys.readouterr().out


def test_cli_model_check_catches_a_wrong_kernel(install, capsys):
    install("drop scale")
    assert check.main(["--model", "test_vit", "--dtype", "fp32", "--backend", "cpp"]) == 1
    assert "layer blocks.0.attn.qkv" in capsys.readouterr().out


def test_cli_as_a_subprocess(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "sas.check", "--quick", "--dtype", "fp32", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(out.read_text())["passed"]

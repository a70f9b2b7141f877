"""The Triton kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest
when CUDA is absent): forward and every gradient against the fp64 reference, by the
tolerance rule (``sas.testing.compare_op``). fp32 and fp16 only: the interpreter's bf16
``tl.dot`` is broken (docs/design.md section 5); bf16 runs in ``test_gpu.py``."""
import pytest
import torch

from sas import functional
from sas.testing import OpCase, compare_op, run_op
from sas_kernels import sas_adapter as kernels

from kernel_cases import KERNEL_GRID, MULTI_TASK_GRID, assert_matches_reference, each_case, triton_op

pytestmark = pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)")

DTYPES = (torch.float32, torch.float16)


@each_case(KERNEL_GRID, DTYPES)
def test_matches_reference(case, dtype):
    assert_matches_reference(case, "triton", dtype, "cpu")


def test_rank_256_and_rows_spanning_several_splits():
    # 1100 rows > MIN_ROWS_PER_SPLIT: dA/dB/dh partials from 3 splits are summed.
    case = OpCase("rank-256-split-rows", (1100,), 16, 16, rank=256, scale=0.5)
    assert_matches_reference(case, "triton", torch.float32, "cpu")


@each_case(MULTI_TASK_GRID, DTYPES)
def test_multi_task_rows(case, dtype):
    assert_matches_reference(case, "triton", dtype, "cpu")


def test_strided_task_ids():
    # task_ids[::2] is 1-D but not contiguous: the kernels index ids with unit stride, so the launcher copies it.
    inputs = OpCase("strided-ids", (29,), 24, 19, rank=5, tasks=3, scale=0.5).make_inputs(torch.float32, "cpu")
    ids = inputs["task_ids"]
    inputs["task_ids"] = torch.stack([ids, torch.full_like(ids, -1)], dim=1).reshape(-1)[::2]
    assert not inputs["task_ids"].is_contiguous() and torch.equal(inputs["task_ids"], ids)
    report = compare_op(**inputs, backends=["triton"], case="strided task_ids")
    assert report.passed, report.table()


@pytest.mark.parametrize("tasks", (0, 3))
def test_zero_rows(tasks):
    case = OpCase("zero-rows", (0,), 12, 9, rank=4, tasks=tasks, scale=0.5)
    out = run_op(triton_op, **case.make_inputs(torch.float32, "cpu"))
    assert out["y"].shape == (0, 9) and out["grad x"].shape == (0, 12) and out["grad base"].shape == (0, 9)
    for name in ("grad A", "grad B", "grad h"):
        assert torch.count_nonzero(out[name]) == 0


def test_column_slices_are_not_copied():
    wide = torch.randn(6, 4, 30)
    x = wide[..., 5:21]
    assert kernels.as_rows(x).data_ptr() == x.data_ptr()


def test_inference_path_matches_training_path():
    inputs = OpCase("no-grad", (10,), 20, 18, rank=6, tasks=2, scale=0.5).make_inputs(torch.float32, "cpu")
    with torch.no_grad():
        y_inference = triton_op(**inputs)
    y_training = run_op(triton_op, **inputs)["y"]
    assert torch.equal(y_inference, y_training)


def test_gradients_are_bitwise_deterministic():
    inputs = OpCase("determinism", (600,), 20, 24, rank=8, tasks=3, scale=0.5).make_inputs(torch.float32, "cpu")
    first, second = (run_op(triton_op, **inputs) for _ in range(2))
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


def test_bad_input_gets_the_reference_paths_errors():
    x, base, A, B, h = torch.randn(4, 8), torch.randn(4, 6), torch.randn(3, 8), torch.randn(6, 2), torch.randn(3)
    messages = []
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError) as info:
            functional.sas_adapter(x, base, A, B, h, backend=backend)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_rank_above_256_is_refused():
    x, base = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="rank 1..256"):
        triton_op(x, base, torch.randn(257, 4), torch.randn(4, 257), torch.randn(257), 1.0, None)


def test_out_of_range_task_ids_give_nan_rows_never_zero():
    # The host checks raise before a kernel sees such ids (CPU: ValueError; CUDA: a device-side assert);
    # called directly, the kernel still must not pick a modulation silently.
    inputs = OpCase("bad ids", (4,), 8, 6, rank=2, tasks=3).make_inputs(torch.float32, "cpu")
    ids = torch.tensor([0, 1, 5, -1])
    y, _ = kernels.sas_forward(inputs["x"], inputs["base"], inputs["A"], inputs["B"], inputs["h"], ids, 1.0, False)
    assert torch.isfinite(y[:2]).all() and torch.isnan(y[2:]).all()

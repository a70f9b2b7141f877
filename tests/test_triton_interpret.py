"""The Triton kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest
when CUDA is absent): forward and every gradient against the fp64 reference, by DESIGN.md's
tolerance rule (see ``sas_kernels.testing``). fp32 and fp16 only: the interpreter's bf16
``tl.dot`` is broken (DESIGN.md section 4); bf16 runs in ``test_triton_gpu.py``."""
import pytest
import torch

from sas import functional
from sas_kernels import sas_adapter as kernels
from sas_kernels.testing import (KERNEL_GRID, MULTI_TASK_GRID, Case, assert_close_to_reference, case_id, make_inputs,
                                 run_op)

pytestmark = pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)")

DTYPES = (torch.float32, torch.float16)

def triton_op(x, base, A, B, h, scale, task_ids):
    return functional.sas_adapter(x, base, A, B, h, scale, task_ids, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KERNEL_GRID, ids=case_id)
def test_matches_reference(case, dtype):
    assert_close_to_reference(case, "triton", dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MULTI_TASK_GRID, ids=case_id)
def test_multi_task_rows(case, dtype):
    assert_close_to_reference(case, "triton", dtype, "cpu")


def test_rank_256_and_rows_spanning_several_splits():
    # 1100 rows > MIN_ROWS_PER_SPLIT: dA/dB/dh partials from 3 splits are summed.
    assert_close_to_reference(Case(leading=(1100,), d_in=16, d_out=16, rank=256), "triton", torch.float32, "cpu")


@pytest.mark.parametrize("tasks", (0, 3))
def test_zero_rows(tasks):
    case = Case(leading=(0,), d_in=12, d_out=9, rank=4, tasks=tasks)
    y, dx, dbase, dA, dB, dh = run_op(triton_op, make_inputs(case, torch.float32, "cpu"), torch.float32, case.scale)
    assert y.shape == (0, 9) and dx.shape == (0, 12) and dbase.shape == (0, 9)
    for grad in (dA, dB, dh):
        assert torch.count_nonzero(grad) == 0


def test_column_slices_are_not_copied():
    wide = torch.randn(6, 4, 30)
    x = wide[..., 5:21]
    assert kernels.as_rows(x).data_ptr() == x.data_ptr()


def test_inference_path_matches_training_path():
    case = Case(leading=(10,), d_in=20, d_out=18, rank=6, tasks=2)
    inputs = make_inputs(case, torch.float32, "cpu")
    args = [inputs[k].float() for k in ("x", "base", "A", "B", "h")]
    with torch.no_grad():
        y_inference = triton_op(*args, case.scale, inputs["task_ids"])
    y_training = run_op(triton_op, inputs, torch.float32, case.scale)[0]
    assert torch.equal(y_inference, y_training)


def test_gradients_are_bitwise_deterministic():
    case = Case(leading=(600,), d_in=20, d_out=24, rank=8, tasks=3)
    inputs = make_inputs(case, torch.float32, "cpu")
    first, second = (run_op(triton_op, inputs, torch.float32, case.scale) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


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

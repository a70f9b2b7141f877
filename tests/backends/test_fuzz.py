"""Property-based fuzzing of every backend present against the float64 reference (hypothesis).

Random leading dims (zero rows included), sizes, ranks 1..64, scales (zero and negative included),
dtypes, single or per-task modulations, and a random memory layout per tensor; each drawn call goes
through :func:`sas.testing.compare_op`, so a wrong result, a crash or a silent fallback fails.
Examples are bounded so the CPU run, Triton's interpreter included, stays well under a minute.
Every failure fuzzing finds is pinned as an ``@example`` here, so `make test` replays it on every run.
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sas import testing

# How many examples and whether they are drawn at random comes from the hypothesis profile
# (tests/conftest.py): `make test` runs the derandomized "ci" profile (30 examples, 10-15 s on the
# 2-core CI machine with the reference, C++ and interpreted Triton backends), `make fuzz` the
# open-ended "fuzz" profile. Every failure ever found is pinned below as an @example.
FUZZ_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Leading dims per rank of the leading shape, bounded so rows stay <= 200 (the interpreter's speed,
# docs/design.md section 5).
LEADING_SIZE_LIMIT = {1: 200, 2: 14, 3: 5}

LAYOUTS = ("contiguous", "padded", "every other", "transposed")


def relayout(t: torch.Tensor, layout: str, offset: int) -> torch.Tensor:
    """``t``'s values in another memory layout: a view into a larger buffer, or a transposed matrix."""
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "padded":
        buffer = t.new_zeros(*t.shape[:-1], t.shape[-1] + offset + 3)
        view = buffer.narrow(-1, offset, t.shape[-1])
    elif layout == "every other":
        view = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]
    else:
        return t
    return view.copy_(t)


@st.composite
def op_calls(draw, device):
    dims = draw(st.integers(1, 3))
    leading = tuple(draw(st.lists(st.integers(0, LEADING_SIZE_LIMIT[dims]), min_size=dims, max_size=dims)))
    tasks = draw(st.sampled_from((0, 0, 1, 4)))
    case = testing.OpCase(
        "fuzz", leading, d_in=draw(st.integers(1, 80)), d_out=draw(st.integers(1, 80)), rank=draw(st.integers(1, 64)),
        tasks=tasks, ids_per_batch=bool(tasks) and dims >= 2 and draw(st.booleans()),
        scale=draw(st.one_of(st.just(0.0), st.floats(-4, 4, allow_nan=False, width=32))))
    dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    inputs = case.make_inputs(dtype, device, seed=draw(st.integers(0, 2 ** 16)))
    for name in ("x", "base", "A", "B", "h"):
        inputs[name] = relayout(inputs[name], draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 5)))
    return case, inputs


def pinned_call(case: testing.OpCase, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """A fuzz call rebuilt from its case, dtype and seed (contiguous layouts), for an @example."""
    return case, case.make_inputs(dtype, device, seed=seed)


# C++ fp32 y at 1.16x the bound, found at random by an earlier `make test`: the kernel seeded its rank
# sum with base, rounding each of the 20 additions at base's magnitude (fixed in csrc/adapter_cpu.cpp).
FOUND_CPP_Y_ROUNDING = pinned_call(testing.OpCase("fuzz", (1,), 1, 34, 20, scale=0.0625), torch.float32, seed=0)


def check_every_backend(case, inputs):
    report = testing.compare_op(**inputs, case=case.describe())
    strides = {name: tuple(inputs[name].stride()) for name in ("x", "base", "A", "B", "h")}
    assert report.passed, f"strides {strides}\n{report.table()}"


@FUZZ_SETTINGS
@given(op_calls("cpu"))
@example(FOUND_CPP_Y_ROUNDING)
def test_fuzz_every_cpu_backend_against_float64(call):
    check_every_backend(*call)


@pytest.mark.gpu
@FUZZ_SETTINGS
@given(op_calls("cuda"))
def test_fuzz_every_cuda_backend_against_float64(call):
    check_every_backend(*call)

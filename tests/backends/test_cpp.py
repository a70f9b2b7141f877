"""The C++ CPU backend (``sas._C`` via ``sas.backends.cpp``) against the float64 reference.

Accuracy follows the tolerance rule (``sas.testing.compare_op``). Skipped when the extension is not
built, except under ``SAS_REQUIRE_CPP=1`` (set by the Makefile's test target, which builds it),
where a missing build fails.
"""
import os

import pytest
import torch

from sas import functional, reference
from sas.testing import GRAD_NAMES, OpCase, compare_op, run_op

from kernel_cases import assert_matches_reference, each_case

try:
    from sas.backends import cpp as cpp_backend

    CPP_IMPORT_ERROR = None
except ImportError as exc:
    cpp_backend = None
    CPP_IMPORT_ERROR = str(exc)

needs_cpp = pytest.mark.skipif(cpp_backend is None, reason=f"the C++ extension is not usable: {CPP_IMPORT_ERROR}")

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE = 0.75


def cpp_op(x, base, A, B, h, scale=1.0, task_ids=None):
    return functional.sas_adapter(x, base, A, B, h, scale, task_ids, backend="cpp")


def case(name, leading, d_in, d_out, rank, **extra):
    return OpCase(name, leading, d_in, d_out, rank, scale=SCALE, **extra)


CASES = [
    case("vit-like", (2, 17), 64, 96, 8),
    case("odd-dims", (37,), 45, 67, 5),
    case("rank-13-tiles", (3, 5, 7), 33, 19, 13),
    case("rank-1-tiny", (1,), 1, 3, 1),
    case("unbatched", (), 24, 40, 8),
    case("tasks-per-row", (41,), 32, 48, 6, tasks=3),
    case("tasks-per-batch-element", (4, 9), 40, 24, 8, tasks=5, ids_per_batch=True),
]


@needs_cpp
@each_case(CASES, KERNEL_DTYPES)
def test_forward_and_gradients_match_reference(case, dtype):
    assert_matches_reference(case, "cpp", dtype, "cpu")


@needs_cpp
@pytest.mark.parametrize("tasks", [0, 3])
def test_zero_rows(tasks):
    inputs = case("zero-rows", (0,), 16, 24, 4, tasks=tasks).make_inputs(torch.float32, "cpu")
    out = run_op(cpp_op, **inputs)
    assert out["y"].shape == (0, 24) and out["grad x"].shape == (0, 16) and out["grad base"].shape == (0, 24)
    for name in ("A", "B", "h"):
        grad = out[f"grad {name}"]
        assert grad.shape == inputs[name].shape and not grad.any()


@needs_cpp
def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(1)
    rows, d_in, d_out, rank = 29, 37, 53, 6
    # Column-strided x (a transpose), row-strided base (a slice), transposed A and B, strided h.
    x = torch.randn(d_in, rows, generator=gen).t()
    base = torch.randn(rows, d_out + 11, generator=gen)[:, 3:3 + d_out]
    A = torch.randn(d_in, rank, generator=gen).t() / d_in ** 0.5
    B = torch.randn(rank, d_out, generator=gen).t()
    h = torch.randn(2 * rank, generator=gen)[::2]
    grad_y = torch.randn(d_out, rows, generator=gen).t()
    for t in (x, base, A, B, h, grad_y):
        assert not t.is_contiguous()
    # float32 in, float32 run: compare_op hands the kernel these very views (no copy in the same dtype).
    report = compare_op(x, base, A, B, h, SCALE, backends=["cpp"], grad_output=grad_y, case="non-contiguous")
    assert report.passed, report.table()
    # A gradient broadcast over rows (as from a bias-like loss) has row stride 0.
    broadcast_grad = torch.randn(d_out, generator=gen).expand(rows, d_out)
    assert broadcast_grad.stride() == (0, 1)
    report = compare_op(x, base, A, B, h, SCALE, backends=["cpp"], grad_output=broadcast_grad,
                        case="broadcast grad_output")
    assert report.passed, report.table()


@needs_cpp
@pytest.mark.parametrize("tasks", [0, 4])
def test_thread_counts_agree_bitwise(tasks):
    # 300 rows = 19 row blocks: more than the 16 row chunks, so chunks hold unequal block counts.
    inputs = case("threads", (300,), 80, 112, 8, tasks=tasks).make_inputs(torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):  # 3: chunks split unevenly over threads
            torch.set_num_threads(count)
            results.append(run_op(cpp_op, **inputs))
    finally:
        torch.set_num_threads(threads)
    single, *multi = results
    for name, value in single.items():
        assert all(torch.equal(value, other[name]) for other in multi), name


@needs_cpp
def test_auto_backend_uses_cpp_on_cpu():
    assert functional.resolve_backend(torch.device("cpu"), "auto") == "cpp"
    assert "cpp" in functional.available_backends(torch.device("cpu"))


@needs_cpp
def test_float64_runs_the_exact_reference():
    inputs = case("float64", (5,), 8, 12, 3).make_inputs(torch.float64, "cpu")
    assert torch.equal(cpp_op(**inputs), reference.sas_adapter(**inputs))


BAD_INPUTS = {
    "dtype-mismatch": (lambda t: t.update(A=t["A"].double()), TypeError, "dtype mismatch"),
    "A-wrong-d_in": (lambda t: t.update(A=t["A"][:, :-1]), ValueError, "A must be"),
    "B-wrong-rank": (lambda t: t.update(B=t["B"][:, :-1]), ValueError, "B must be"),
    "h-wrong-rank": (lambda t: t.update(h=t["h"][:-1]), ValueError, "h must be"),
    "task-id-out-of-range": (lambda t: t.update(h=t["h"].repeat(2, 1), task_ids=torch.full((6,), 2)),
                             ValueError, "task_ids must lie in"),
}


@needs_cpp
@pytest.mark.parametrize("mutate, error, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_through_public_op(mutate, error, message):
    named = case("bad-input", (6,), 8, 10, 4).make_inputs(torch.float32, "cpu")
    mutate(named)
    with pytest.raises(error, match=message):
        functional.sas_adapter(**named, backend="cpp")


@needs_cpp
def test_bad_inputs_raise_from_the_ops():
    inputs = case("bad-input", (6,), 8, 10, 4).make_inputs(torch.float32, "cpu")
    x, base, A, B, h = (inputs[name] for name in GRAD_NAMES)
    forward = torch.ops.sas.cpu_adapter_forward
    with pytest.raises(RuntimeError, match="is not supported"):
        forward(x.double(), base.double(), A.double(), B.double(), h.double(), SCALE, None)
    with pytest.raises(RuntimeError, match="B must be"):
        forward(x, base, A, B[:, :2], h, SCALE, None)
    with pytest.raises(RuntimeError, match="task_ids must lie in"):
        forward(x, base, A, B, h.repeat(2, 1), SCALE, torch.full((6,), 5))
    with pytest.raises(RuntimeError, match="do not split"):
        forward(x, base, A, B, h.repeat(2, 1), SCALE, torch.zeros(4, dtype=torch.long))


@needs_cpp
@pytest.mark.parametrize("tasks", [0, 3])
def test_opcheck(tasks):
    inputs = case("opcheck", (12,), 20, 28, 5, tasks=tasks).make_inputs(torch.float32, "cpu")
    x, base, A, B, h = (inputs[name].requires_grad_() for name in GRAD_NAMES)
    task_ids = inputs["task_ids"]
    grad_y = torch.randn(base.shape, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.sas.cpu_adapter_forward.default, (x, base, A, B, h, SCALE, task_ids))
    _, u = torch.ops.sas.cpu_adapter_forward(x, base, A, B, h, SCALE, task_ids)
    detached = [t.detach() for t in (x, A, B, h)]
    torch.library.opcheck(torch.ops.sas.cpu_adapter_backward.default,
                          (grad_y, *detached, u, SCALE, task_ids))


@needs_cpp
@pytest.mark.parametrize("tasks", [0, 3])
def test_opcheck_whole_layer_and_hypernetwork(tasks):
    inputs = case("opcheck", (3, 4), 20, 28, 5, tasks=tasks, ids_per_batch=bool(tasks)).make_inputs(
        torch.float32, "cpu")
    weight, bias = torch.randn(28, 20), torch.randn(28)
    x, A, B, h = (inputs[name].requires_grad_() for name in ("x", "A", "B", "h"))
    torch.library.opcheck(torch.ops.sas.cpu_adapted_linear.default,
                          (x, weight, bias, A, B, h, SCALE, inputs["task_ids"]))
    torch.library.opcheck(torch.ops.sas.cpu_adapted_linear.default, (x, weight, None, A, B, h, SCALE,
                                                                     inputs["task_ids"]))
    hyper = [torch.randn(shape, requires_grad=True) for shape in ((6, 8), (32, 8), (32,), (5, 32), (5,))]
    for activation in (0, 1, 2):
        torch.library.opcheck(torch.ops.sas.cpu_hypernetwork.default, (*hyper, activation))


def _hypernetwork_inputs():
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in ((6, 8), (32, 8), (32,), (5, 32),
                                                                                   (5,))]


def _hypernetwork_by_autograd(embeddings, w1, b1, w2, b2):
    return 1 + torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(embeddings, w1, b1)), w2, b2)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hypernetwork_op_under_autocast_computes_in_its_inputs_dtype(dtype):
    """Under autocast the op saved half-precision activations and its backward crashed on them
    (``expected m1 and m2 to have the same dtype``); it now runs in its inputs' dtype with autocast off."""
    inputs = _hypernetwork_inputs()
    grad_h = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=dtype):
        h = torch.ops.sas.cpu_hypernetwork(*inputs, 0)
    assert h.dtype == torch.float32
    got = torch.autograd.grad(h, inputs, grad_h)
    expected = torch.autograd.grad(_hypernetwork_by_autograd(*inputs), inputs, grad_h)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@needs_cpp
@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double backward"])
@pytest.mark.parametrize("written", [0, 1, 3], ids=["embeddings", "w1", "w2"])
def test_hypernetwork_op_refuses_an_input_written_since_the_forward(written, create_graph):
    """The op keeps its inputs in saved_data, out of autograd's version check, and computed
    gradients from values written after the forward; it now raises as autograd does."""
    inputs = _hypernetwork_inputs()
    h = torch.ops.sas.cpu_hypernetwork(*inputs, 0)
    with torch.no_grad():
        inputs[written].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(h.sum(), inputs, create_graph=create_graph)


def test_extension_is_built_when_required():
    if os.environ.get("SAS_REQUIRE_CPP") != "1":
        pytest.skip("set SAS_REQUIRE_CPP=1 (as `make test` does after building) to require sas._C")
    assert cpp_backend is not None, f"SAS_REQUIRE_CPP=1 but the C++ extension is unusable: {CPP_IMPORT_ERROR}"

"""The C++ CPU backend (``sas._C`` via ``sas._cpp``) against the float64 reference.

Skipped when the extension is not built, except under ``SAS_REQUIRE_CPP=1``
(set by the Makefile's test target, which builds it), where a missing build fails.
"""
import os

import pytest
import torch

from sas import functional, reference

try:
    from sas import _cpp as cpp_backend

    CPP_IMPORT_ERROR = None
except ImportError as exc:
    cpp_backend = None
    CPP_IMPORT_ERROR = str(exc)

needs_cpp = pytest.mark.skipif(cpp_backend is None, reason=f"the C++ extension is not usable: {CPP_IMPORT_ERROR}")

# DESIGN.md §4: the kernel's error against float64 may be at most twice the error of
# PyTorch's own path in the same dtype (sas.reference, which also accumulates half
# precision in float32), plus an atol of about one rounding step at the values' scale
# (|values| <= ~10 here), for elements where both errors happen to be near zero.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE = 0.75


def make_inputs(leading, d_in, d_out, rank, tasks=0, ids_per="row", dtype=torch.float32, seed=0):
    """Random op inputs in float64 (scaled so u and y stay O(1)) and task ids, or None."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, d_in, generator=gen, dtype=torch.float64)
    base = torch.randn(*leading, d_out, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5
    B = torch.randn(d_out, rank, generator=gen, dtype=torch.float64) / rank ** 0.5
    h = 1 + 0.1 * torch.randn(*((tasks, rank) if tasks else (rank,)), generator=gen, dtype=torch.float64)
    task_ids = None
    if tasks:
        count = x[..., 0].numel() if ids_per == "row" else leading[0]
        task_ids = torch.randint(0, tasks, (count,), generator=gen)
    grad_y = torch.randn(*leading, d_out, generator=gen, dtype=torch.float64)
    return [x, base, A, B, h], task_ids, grad_y


def run(op, tensors, task_ids, grad_y, dtype):
    """y and the gradients of (x, base, A, B, h) of ``op`` on copies of ``tensors`` in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    y = op(*leaves, SCALE, task_ids)
    grads = torch.autograd.grad(y, leaves, grad_y.to(dtype))
    return [y.detach(), *grads]


def cpp_op(x, base, A, B, h, scale, task_ids):
    return functional.sas_adapter(x, base, A, B, h, scale, task_ids, backend="cpp")


def assert_matches_reference(tensors, task_ids, grad_y, dtype):
    names = ["y", "grad_x", "grad_base", "grad_A", "grad_B", "grad_h"]
    exact = run(reference.sas_adapter, tensors, task_ids, grad_y, torch.float64)
    torch_path = run(reference.sas_adapter, tensors, task_ids, grad_y, dtype)
    kernel = run(cpp_op, tensors, task_ids, grad_y, dtype)
    for name, want, torch_out, got in zip(names, exact, torch_path, kernel):
        assert got.dtype == dtype and got.shape == want.shape, name
        if want.numel() == 0:
            continue
        kernel_error = (got.double() - want).abs().max().item()
        torch_error = (torch_out.double() - want).abs().max().item()
        assert kernel_error <= 2 * torch_error + ATOL[dtype], (
            f"{name}: kernel error {kernel_error:.3g} vs PyTorch {dtype} error {torch_error:.3g}")


CASES = {
    # leading dims, d_in, d_out, rank, tasks, task ids per
    "vit-like": ((2, 17), 64, 96, 8, 0, "row"),
    "odd-dims": ((37,), 45, 67, 5, 0, "row"),
    "rank-13-tiles": ((3, 5, 7), 33, 19, 13, 0, "row"),
    "rank-1-tiny": ((1,), 1, 3, 1, 0, "row"),
    "unbatched": ((), 24, 40, 8, 0, "row"),
    "tasks-per-row": ((41,), 32, 48, 6, 3, "row"),
    "tasks-per-batch-element": ((4, 9), 40, 24, 8, 5, "batch"),
}


@needs_cpp
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_reference(case, dtype):
    leading, d_in, d_out, rank, tasks, ids_per = case
    tensors, task_ids, grad_y = make_inputs(leading, d_in, d_out, rank, tasks, ids_per)
    assert_matches_reference(tensors, task_ids, grad_y, dtype)


@needs_cpp
@pytest.mark.parametrize("tasks", [0, 3])
def test_zero_rows(tasks):
    tensors, task_ids, grad_y = make_inputs((0,), 16, 24, 4, tasks)
    y, grad_x, grad_base, grad_A, grad_B, grad_h = run(cpp_op, tensors, task_ids, grad_y, torch.float32)
    assert y.shape == (0, 24) and grad_x.shape == (0, 16) and grad_base.shape == (0, 24)
    for grad, weight in zip((grad_A, grad_B, grad_h), tensors[2:]):
        assert grad.shape == weight.shape and not grad.any()


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
    # float32 in, float32 run: run() hands the kernel these very views (.to() of the same dtype is a no-op).
    assert_matches_reference([x, base, A, B, h], None, grad_y, torch.float32)
    # A gradient broadcast over rows (as from a bias-like loss) has row stride 0.
    broadcast_grad = torch.randn(d_out, generator=gen).expand(rows, d_out)
    assert broadcast_grad.stride() == (0, 1)
    assert_matches_reference([x, base, A, B, h], None, broadcast_grad, torch.float32)


@needs_cpp
@pytest.mark.parametrize("tasks", [0, 4])
def test_thread_counts_agree_bitwise(tasks):
    # 300 rows = 19 row blocks: more than the 16 row chunks, so chunks hold unequal block counts.
    tensors, task_ids, grad_y = make_inputs((300,), 80, 112, 8, tasks)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):  # 3: chunks split unevenly over threads
            torch.set_num_threads(count)
            results.append(run(cpp_op, tensors, task_ids, grad_y, torch.float32))
    finally:
        torch.set_num_threads(threads)
    for single, *multi in zip(*results):
        assert all(torch.equal(single, other) for other in multi)


@needs_cpp
def test_auto_backend_uses_cpp_on_cpu():
    assert functional.resolve_backend(torch.device("cpu"), "auto") == "cpp"
    assert "cpp" in functional.available_backends(torch.device("cpu"))


@needs_cpp
def test_float64_runs_the_exact_reference():
    tensors, _, _ = make_inputs((5,), 8, 12, 3)
    assert torch.equal(cpp_op(*tensors, SCALE, None), reference.sas_adapter(*tensors, SCALE))


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
    tensors, _, _ = make_inputs((6,), 8, 10, 4, dtype=torch.float32)
    named = dict(zip(["x", "base", "A", "B", "h"], [t.float() for t in tensors]), task_ids=None)
    mutate(named)
    with pytest.raises(error, match=message):
        functional.sas_adapter(**named, scale=SCALE, backend="cpp")


@needs_cpp
def test_bad_inputs_raise_from_the_ops():
    x, base, A, B, h = [t.float() for t in make_inputs((6,), 8, 10, 4)[0]]
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
    tensors, task_ids, grad_y = make_inputs((12,), 20, 28, 5, tasks)
    x, base, A, B, h = [t.float().requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.sas.cpu_adapter_forward.default, (x, base, A, B, h, SCALE, task_ids))
    _, u = torch.ops.sas.cpu_adapter_forward(x, base, A, B, h, SCALE, task_ids)
    detached = [t.detach() for t in (x, A, B, h)]
    torch.library.opcheck(torch.ops.sas.cpu_adapter_backward.default,
                          (grad_y.float(), *detached, u, SCALE, task_ids))


def test_extension_is_built_when_required():
    if os.environ.get("SAS_REQUIRE_CPP") != "1":
        pytest.skip("set SAS_REQUIRE_CPP=1 (as `make test` does after building) to require sas._C")
    assert cpp_backend is not None, f"SAS_REQUIRE_CPP=1 but the C++ extension is unusable: {CPP_IMPORT_ERROR}"

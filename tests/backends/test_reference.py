"""The oracle itself: formula against an independent float64 loop, gradcheck, shapes."""
import pytest
import torch

from sas import functional, reference


def _inputs(rows, d_in, d_out, rank, dtype=torch.float64, leading=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = leading if leading is not None else (rows,)
    x = torch.randn(*lead, d_in, generator=gen, dtype=dtype)
    base = torch.randn(*lead, d_out, generator=gen, dtype=dtype)
    A = torch.randn(rank, d_in, generator=gen, dtype=dtype)
    B = torch.randn(d_out, rank, generator=gen, dtype=dtype)
    h = torch.randn(rank, generator=gen, dtype=dtype)
    return x, base, A, B, h


def _loop_formula(x, base, A, B, h, scale):
    """y[n, o] = base[n, o] + s * sum_j B[o, j] h[j] sum_i A[j, i] x[n, i], one row at a time."""
    out = base.clone()
    for n in range(x.shape[0]):
        u = [sum(A[j, i].item() * x[n, i].item() for i in range(x.shape[1])) for j in range(A.shape[0])]
        for o in range(base.shape[1]):
            out[n, o] += scale * sum(B[o, j].item() * h[j].item() * u[j] for j in range(A.shape[0]))
    return out


def test_formula_matches_independent_loop():
    x, base, A, B, h = _inputs(5, 7, 6, 3)
    expected = _loop_formula(x, base, A, B, h, 0.7)
    torch.testing.assert_close(reference.sas_adapter(x, base, A, B, h, 0.7), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("leading", [(4,), (2, 3), (2, 1, 3)])
def test_leading_dims_match_flattened_rows(leading):
    x, base, A, B, h = _inputs(None, 37, 101, 3, leading=leading)
    y = functional.sas_adapter(x, base, A, B, h, 0.5)
    assert y.shape == base.shape
    flat = reference.sas_adapter(x.reshape(-1, 37), base.reshape(-1, 101), A, B, h, 0.5)
    torch.testing.assert_close(y.reshape(-1, 101), flat)


def test_zero_rows_give_empty_output_and_zero_grads():
    x, base, A, B, h = _inputs(0, 37, 101, 3)
    for t in (x, base, A, B, h):
        t.requires_grad_(True)
    y = functional.sas_adapter(x, base, A, B, h, 2.0)
    assert y.shape == (0, 101)
    y.sum().backward()
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0 and torch.count_nonzero(h.grad) == 0


def test_gradcheck_every_input():
    x, base, A, B, h = _inputs(4, 37, 11, 3)
    args = [t.requires_grad_(True) for t in (x, base, A, B, h)]
    assert torch.autograd.gradcheck(lambda *a: functional.sas_adapter(*a, 0.3), args)


def test_gradients_follow_design_formulas():
    """dB, dh, dA, dx as docs/design.md §1 writes them, against autograd of the reference."""
    x, base, A, B, h = _inputs(6, 9, 5, 4)
    s = 1.7
    for t in (x, A, B, h):
        t.requires_grad_(True)
    g = torch.randn(6, 5, dtype=torch.float64)
    reference.sas_adapter(x, base, A, B, h, s).backward(g)
    with torch.no_grad():
        u = x @ A.T
        gB = g @ B
        du = s * gB * h
        torch.testing.assert_close(B.grad, s * g.T @ (u * h))
        torch.testing.assert_close(h.grad, s * (gB * u).sum(0))
        torch.testing.assert_close(A.grad, du.T @ x)
        torch.testing.assert_close(x.grad, du @ A)


def test_multitask_rows_use_their_task_modulation():
    x, base, A, B, _ = _inputs(6, 9, 5, 4)
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 2, 2, 1, 0, 2])
    y = functional.sas_adapter(x, base, A, B, h, 1.0, task_ids=ids)
    for row, task in enumerate(ids.tolist()):
        torch.testing.assert_close(y[row], reference.sas_adapter(x[row:row + 1], base[row:row + 1], A, B, h[task])[0])
    y.sum().backward()
    assert torch.count_nonzero(h.grad[1]) > 0  # task 1 is used by row 3 only and still gets its gradient


def test_multitask_ids_per_leading_batch_element():
    x, base, A, B, _ = _inputs(None, 9, 5, 4, leading=(2, 3))
    h = torch.randn(2, 4, dtype=torch.float64)
    per_batch = functional.sas_adapter(x, base, A, B, h, 1.0, task_ids=torch.tensor([1, 0]))
    per_row = functional.sas_adapter(x, base, A, B, h, 1.0, task_ids=torch.tensor([1, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(per_batch, per_row)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    x, base, A, B, h = _inputs(8, 64, 32, 8, dtype=torch.float32)
    low = [t.to(dtype) for t in (x, base, A, B, h)]
    upcast = reference.sas_adapter(*low, 0.5)
    exact = reference.sas_adapter(*[t.double() for t in low], 0.5)
    assert upcast.dtype == dtype
    # fp32 compute rounded once at the end: within one half-precision ulp of the exact result.
    torch.testing.assert_close(upcast.double(), exact, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)

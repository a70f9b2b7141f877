"""The adapted layer as one op (``sas.backends.fold``): every design against the reference.

The oracle is the frozen ``F.linear`` composed with :func:`sas.reference.sas_adapter` in float64.
Low-precision runs follow the tolerance rule (docs/design.md section 4): a design's error against the float64
oracle may be at most twice the error of the same eager reference path run in that precision, plus a small atol.
"""
import pytest
import torch
import torch.nn.functional as F

from sas import reference
from sas.backends import fold as fused_linear
from sas.backends.fold import DESIGNS
from sas.functional import sas_linear

SCALE = 0.7
TRAINABLE = ("x", "A", "B", "h")
# Absolute slack next to the 2x rule, for entries whose reference value rounds to about zero:
# fp32's unit roundoff (6e-8) times the largest |value| of these O(1)-scaled tests (< 50), rounded up.
FP32_ATOL = 1e-5
# bf16 (the CUDA-only test): slack relative to the largest |value|, about twice bf16's unit roundoff 2^-8.
BF16_ATOL = 1e-2


def make_case(lead, d_in, d_out, rank, bias=True, dtype=torch.float64, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    return dict(x=rand(*lead, d_in), weight=rand(d_out, d_in, std=d_in ** -0.5),
                bias=rand(d_out) if bias else None, A=rand(rank, d_in, std=d_in ** -0.5),
                B=rand(d_out, rank), h=1 + rand(rank, std=0.3), g=rand(*lead, d_out))


def reference_layer(x, weight, bias, A, B, h, scale):
    return reference.sas_adapter(x, F.linear(x, weight, bias), A, B, h, scale)


def run(fn, case, dtype):
    """``y`` and the grads of x, A, B, h of ``fn`` on ``case`` cast to ``dtype`` (backward with ``case['g']``)."""
    leaves = {k: case[k].detach().to(dtype).requires_grad_() for k in TRAINABLE}
    weight = case["weight"].to(dtype)
    bias = None if case["bias"] is None else case["bias"].to(dtype)
    y = fn(leaves["x"], weight, bias, leaves["A"], leaves["B"], leaves["h"], SCALE)
    y.backward(case["g"].to(dtype))
    return [y] + [leaves[k].grad for k in TRAINABLE]


def designed(design):
    return lambda *args: sas_linear(*args, design=design)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(design, bias):
    case = make_case((2, 3), d_in=5, d_out=7, rank=3, bias=bias)
    weight, bias_t = case["weight"], case["bias"]
    inputs = tuple(case[k].clone().requires_grad_() for k in TRAINABLE)
    assert torch.autograd.gradcheck(
        lambda x, A, B, h: sas_linear(x, weight, bias_t, A, B, h, SCALE, design=design), inputs)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("lead,d_in,d_out,rank,bias", [
    ((33,), 48, 40, 8, True),       # plain rows
    ((2, 5, 3), 17, 29, 3, False),  # odd sizes, three leading dims, no bias, rank not a multiple of 4
    ((19,), 64, 24, 1, True),       # rank 1
    ((), 20, 12, 4, True),          # a single un-batched row
])
def test_fp32_matches_reference_within_twice_torch_error(design, lead, d_in, d_out, rank, bias):
    case = make_case(lead, d_in, d_out, rank, bias)
    exact = run(reference_layer, case, torch.float64)
    torch_fp32 = run(reference_layer, case, torch.float32)
    got = run(designed(design), case, torch.float32)
    for name, g, t, e in zip(("y",) + TRAINABLE, got, torch_fp32, exact):
        assert g.shape == e.shape and g.dtype == torch.float32, name
        torch_error = (t.double() - e).abs().max()
        assert (g.double() - e).abs().max() <= 2 * torch_error + FP32_ATOL, name


@pytest.mark.parametrize("design", DESIGNS)
def test_zero_rows(design):
    case = make_case((0,), d_in=6, d_out=5, rank=2)
    y, dx, dA, dB, dh = run(designed(design), case, torch.float64)
    assert y.shape == (0, 5) and dx.shape == (0, 6)
    for grad in (dA, dB, dh):
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("design", DESIGNS)
def test_output_can_be_modified_in_place(design):
    """As with ``F.linear``'s output (e.g. ``ReLU(inplace=True)``), and the gradients stay right."""
    case = make_case((6,), d_in=8, d_out=10, rank=2)
    def relu_in_place(*args):
        return sas_linear(*args, design=design).relu_()

    def relu(*args):
        return reference_layer(*args).relu()

    for got, want in zip(run(relu_in_place, case, torch.float64), run(relu, case, torch.float64)):
        torch.testing.assert_close(got, want)


def test_fold_returns_a_window_of_the_stacked_output():
    """``fold`` writes [y | u] in one GEMM; y is returned without a copy (row stride d_out + padded rank)."""
    case = make_case((4, 3), d_in=8, d_out=10, rank=3, dtype=torch.float32)
    y = sas_linear(case["x"], case["weight"], case["bias"], case["A"], case["B"], case["h"], design="fold")
    assert y.shape == (4, 3, 10) and y.stride() == (3 * 14, 14, 1)  # rank 3 padded to 4 fp32 = 16 bytes
    assert y._base is None  # a fresh tensor to autograd, not a view


@pytest.mark.parametrize("design", DESIGNS)
def test_unfrozen_weight_and_bias_get_their_exact_gradient(design):
    """The fused designs used the base weight detached, so an unfrozen one got no gradient."""
    case = make_case((4,), d_in=6, d_out=5, rank=2)
    leaves = {k: case[k].clone().requires_grad_() for k in ("x", "weight", "bias", "A", "B", "h")}
    inputs = [leaves[k] for k in ("x", "weight", "bias", "A", "B", "h")]
    got = torch.autograd.grad(sas_linear(*inputs, SCALE, design=design), inputs, case["g"])
    expected = torch.autograd.grad(reference_layer(*inputs, SCALE), inputs, case["g"])
    for name, a, b in zip(leaves, got, expected):
        torch.testing.assert_close(a, b, msg=name)


def test_frozen_weight_and_bias_get_no_gradient():
    case = make_case((4,), d_in=6, d_out=5, rank=2)
    A = case["A"].requires_grad_()
    sas_linear(case["x"], case["weight"], case["bias"], A, case["B"], case["h"], design="fold").sum().backward()
    assert case["weight"].grad is None and A.grad is not None


@pytest.mark.parametrize("design", DESIGNS)
def test_double_backward_float64(design):
    """A double backward through the fused designs crashed (addmm with out= under autograd)."""
    case = make_case((2, 3), d_in=5, d_out=4, rank=3)
    weight, bias = case["weight"], case["bias"]
    inputs = tuple(case[k].clone().requires_grad_() for k in TRAINABLE)
    assert torch.autograd.gradgradcheck(
        lambda x, A, B, h: sas_linear(x, weight, bias, A, B, h, SCALE, design=design), inputs)


def test_auto_picks_a_design_and_matches_fold():
    case = make_case((9,), d_in=12, d_out=7, rank=2)
    assert fused_linear.choose_design("cpu", torch.float64, 12, 7, 2) in DESIGNS
    args = (case["x"], case["weight"], case["bias"], case["A"], case["B"], case["h"], SCALE)
    torch.testing.assert_close(sas_linear(*args), sas_linear(*args, design="fold"))


@pytest.mark.parametrize("change,message", [
    (dict(design="fastest"), "unknown design"),
    (dict(weight=torch.zeros(5, 7, dtype=torch.float64)), "weight must be"),
    (dict(bias=torch.zeros(4, dtype=torch.float64)), "bias must be"),
    (dict(h=torch.ones(3, 2, dtype=torch.float64)), "per-task h cannot be folded"),
    (dict(A=torch.zeros(2, 5, dtype=torch.float64)), "A must be"),
    (dict(x=torch.zeros(4, 6, dtype=torch.float32)), "outside autocast they must match"),
])
def test_rejects_bad_arguments(change, message):
    case = make_case((4,), d_in=6, d_out=5, rank=2)
    args = dict(x=case["x"], weight=case["weight"], bias=case["bias"], A=case["A"], B=case["B"], h=case["h"])
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        sas_linear(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("design", DESIGNS)
def test_bf16_autocast_on_cuda(design):
    """fp32 parameters under bf16 autocast: the layer runs in bf16 (as SaSLinear's adapter does) and
    gradients reach the fp32 leaves, within twice the error of the eager reference run wholly in bf16."""
    case = make_case((4, 197), d_in=768, d_out=2304, rank=8, dtype=torch.float32, device="cuda")
    exact = run(reference_layer, {k: None if v is None else v.double() for k, v in case.items()}, torch.float64)

    def eager_bf16(*args):
        x, weight, bias, A, B, h, scale = args
        return reference.sas_adapter(x, F.linear(x, weight, bias), A, B, h, scale, upcast=False)

    def autocast_design(*args):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return sas_linear(*args, design=design)

    torch_bf16 = run(eager_bf16, case, torch.bfloat16)
    got = run(autocast_design, case, torch.float32)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, g, t, e in zip(("y",) + TRAINABLE, got, torch_bf16, exact):
        torch_error = (t.double() - e).abs().max()
        assert (g.double() - e).abs().max() <= 2 * torch_error + BF16_ATOL * e.abs().max(), name

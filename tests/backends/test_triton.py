"""The Triton whole-layer node (``sas.backends.triton.AdaptedLinearFunction``) on CPU through Triton's
interpreter: its output takes in-place ops like any tensor, and the node and the op's
Function behave under autocast.

Everything is compared with the reference backend (plain autograd) on the same inputs. fp16 autocast
only: the interpreter's bf16 ``tl.dot`` is broken (test_interpreter.py), so bf16 autocast is
checked on a GPU (``test_gpu_hazards.py``). Whole models trained under autocast on every backend
(the hypernetwork included) are checked by the cross-backend autocast tests.
"""
import copy

import pytest
import torch
from torch import nn

import sas
from sas import backends
from sas.testing import randomize_adapter
from sas_kernels import sas_adapter as kernels

pytestmark = pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)")

SHAPES = {"2-D": (12,), "3-D": (3, 5), "4-D": (2, 3, 2)}


def _layer(seed=0):
    torch.manual_seed(seed)
    return randomize_adapter(sas.SaSLinear.from_linear(nn.Linear(24, 20), rank=4))


def _run(module, backend, x, fn, residual=None):
    """fn(module, x, residual) under ``backend``: its output and the gradients of x, residual and every parameter."""
    x = x.detach().clone().requires_grad_()
    residual = None if residual is None else residual.detach().clone().requires_grad_()
    sas.set_backend(backend)
    try:
        y = fn(module, x, residual)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype))
    finally:
        sas.set_backend(None)
    grads = {"x": x.grad, **{name: p.grad for name, p in module.named_parameters() if p.requires_grad}}
    if residual is not None:
        grads["residual"] = residual.grad
    return y.detach(), grads


def _assert_matches_reference(fn, x, residual=None, rtol=1e-4, atol=1e-5, layer=None):
    layer = _layer() if layer is None else layer
    y, grads = _run(layer, "triton", x, fn, residual)
    y_ref, grads_ref = _run(copy.deepcopy(layer), "reference", x, fn, residual)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, msg="output")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=atol, msg=name)


def _add_residual(layer, x, residual):
    y = layer(x)
    y += residual
    return y


def _relu_in_place(layer, x, residual):
    return nn.ReLU(inplace=True)(layer(x))


def _mul_in_place_then_view(layer, x, residual):
    y = layer(x)
    y.mul_(2.0)[..., :3].add_(residual[..., :3])  # an in-place op through a view of the output too
    return y


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_in_place_add_on_the_output(shape):
    x = torch.randn(*shape, 24, generator=torch.Generator().manual_seed(1))
    _assert_matches_reference(_add_residual, x, torch.randn(*shape, 20, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_in_place_relu_on_the_output(shape):
    _assert_matches_reference(_relu_in_place, torch.randn(*shape, 24, generator=torch.Generator().manual_seed(1)))


def test_in_place_op_through_a_view_of_the_output():
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    residual = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(2))
    _assert_matches_reference(_mul_in_place_then_view, x, residual)


def test_in_place_ops_in_an_injected_model_with_shared_A_B():
    # Several layers sharing A/B (their gradients added in place through sas.backends.triton.GradientSink) whose
    # outputs are each changed in place by the next module.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True),
                          nn.Linear(16, 16))
    model = randomize_adapter(sas.inject(model, sas.SaSConfig(rank=4, targets=r"[024]")))
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    _assert_matches_reference(lambda m, x, r: _add_residual(m, x, r), x,
                              torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2)), layer=model)


def test_the_output_is_no_view_and_costs_no_copy():
    layer = _layer()
    sas.set_backend("triton")
    try:
        for shape in SHAPES.values():
            x = torch.randn(*shape, 24, requires_grad=True)
            y = layer(x)
            assert y._base is None and y.shape == (*shape, 20) and y.is_contiguous()
            with torch.no_grad():
                assert layer(x)._base is None
    finally:
        sas.set_backend(None)


# --------------------------------------------------------------------------------------- autocast


def _op_tensors(dtype, seed=3):
    generator = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(20, 24, generator=generator), torch.randn(20, generator=generator)
    A = (torch.randn(4, 24, generator=generator) * 0.2).to(dtype).requires_grad_()
    B = (torch.randn(20, 4, generator=generator) * 0.5).to(dtype).requires_grad_()
    h = (1 + 0.5 * torch.randn(4, generator=generator)).to(dtype).requires_grad_()
    x = torch.randn(3, 5, 24, generator=generator, requires_grad=True)
    return x, weight, bias, A, B, h


@pytest.mark.parametrize("backward_under_autocast", (False, True))
def test_adapted_linear_under_fp16_autocast(backward_under_autocast):
    # What SaSLinear calls: A, B and h already in the autocast dtype, x and the frozen weight in fp32.
    results = {}
    for backend in ("triton", "reference"):
        x, weight, bias, A, B, h = _op_tensors(torch.float16)
        with torch.autocast("cpu", dtype=torch.float16):
            y = backends.adapted_linear(x, weight, bias, A, B, h, 0.5, backend=backend)
            if backward_under_autocast:
                y.float().square().sum().backward()
        if not backward_under_autocast:
            y.float().square().sum().backward()
        assert y.dtype == torch.float16 and x.grad.dtype == torch.float32 and A.grad.dtype == torch.float16
        results[backend] = [y.detach(), x.grad, A.grad, B.grad, h.grad]
    for name, a, b in zip(("y", "x", "A", "B", "h"), results["triton"], results["reference"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item(), msg=name)


def test_fp32_forward_with_the_backward_called_under_autocast_stays_fp32():
    # A backward run inside an autocast region computes the node's frozen-path g @ W0 in the forward's
    # dtype, as the kernels do (plain autograd would run its matmuls in fp16 there: the reference
    # runs its backward outside autocast).
    results = {}
    for backend in ("triton", "reference"):
        x, weight, bias, A, B, h = _op_tensors(torch.float32)
        y = backends.adapted_linear(x, weight, bias, A, B, h, 0.5, backend=backend)
        with torch.autocast("cpu", dtype=torch.float16, enabled=backend == "triton"):
            y.square().sum().backward()
        results[backend] = [x.grad, A.grad, B.grad, h.grad]
    for name, a, b in zip(("x", "A", "B", "h"), results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)


def test_public_op_is_unchanged_by_autocast():
    # The op's Function launches only Triton kernels, which autocast does not touch: the same bits inside
    # an autocast region (forward and backward) as outside it.
    from sas import functional
    generator = torch.Generator().manual_seed(4)
    tensors = [t.half() for t in (torch.randn(30, 24, generator=generator), torch.randn(30, 20, generator=generator),
                                  0.2 * torch.randn(4, 24, generator=generator),
                                  0.5 * torch.randn(20, 4, generator=generator),
                                  1 + 0.5 * torch.randn(4, generator=generator))]
    results = []
    for enabled in (False, True):
        leaves = [t.clone().requires_grad_() for t in tensors]
        with torch.autocast("cpu", dtype=torch.float16, enabled=enabled):
            y = functional.sas_adapter(*leaves, 0.5, backend="triton")
            y.float().square().sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)

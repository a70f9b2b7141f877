"""A model with ``layer_op="fused"``: double backward crashed (``addmm(): functions with out=...``)
and an unfrozen base weight silently got no gradient. Checked in float64, where the fused designs still run
(they are ATen ops), against plain autograd over the formulas, on every backend."""
import pytest
import torch

import sas
from sas.testing import forced_backend

from autograd_cases import WIDTH, make_model, plain_output, trainable


def _model_and_input():
    model = make_model(layer_op="fused").double()
    x = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    return model, x


def _second_order(output_fn, x, params):
    """Gradients of |d sum(y^2) / dx|^2 with respect to ``params``: a double backward."""
    (grad_x,) = torch.autograd.grad(output_fn(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(grad_x.square().sum(), params)


@pytest.mark.parametrize("backend", sas.available_backends("cpu"))
def test_double_backward_through_fused_layers(backend):
    model, x = _model_and_input()
    params = trainable(model)
    with forced_backend(backend):
        got = _second_order(model, x, list(params.values()))
    expected = _second_order(lambda t: plain_output(model, params, t), x, list(params.values()))
    for name, a, b in zip(params, got, expected):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("backend", sas.available_backends("cpu"))
def test_unfrozen_base_weight_of_a_fused_layer_gets_its_gradient(backend):
    model, x = _model_and_input()
    weight, bias = model.a.base_layer.weight, model.a.base_layer.bias
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    with forced_backend(backend):
        got = torch.autograd.grad(model(x).square().sum(), (weight, bias))
    expected = torch.autograd.grad(plain_output(model, trainable(model), x).square().sum(), (weight, bias))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)

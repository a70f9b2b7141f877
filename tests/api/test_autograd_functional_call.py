"""``torch.func.functional_call`` with substitute tensors, single- and multi-task.

The hand-written hypernetwork backward read the module's own W1/W2 rather than the tensors the forward
used (embedding and W1 gradients about 100% off on the reference and Triton backends), and the multi-task
table was recomputed from the module's tensors, so the substitutes were "not used in the graph". Now the
gradients are those of the forward's values. The model runs in float64, where every backend still runs
its own hypernetwork path (the C++ op, the Python node's hand-written or recomputing backward) and its
layers take the exact reference path, so the gradients must equal plain autograd over the formulas with
the same substitutes up to float64 rounding.
"""
import contextlib

import pytest
import torch

import sas
from sas.testing import forced_backend

from autograd_cases import OUT, WIDTH, make_model, plain_output, trainable

TASKS = torch.tensor([0, 2, 1, 1, 0, 2])


def _substitutes(model):
    """A float64 tensor per trainable parameter, with other values (so reading the module's own shows)."""
    generator = torch.Generator().manual_seed(7)
    return {name: (p.detach().double() + 0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
            .requires_grad_() for name, p in trainable(model).items()}


@pytest.mark.parametrize("backend", sas.available_backends("cpu"))
@pytest.mark.parametrize("layer_op", ["adapter", "fused"])
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_functional_call_gradients_are_those_of_the_substitutes(backend, layer_op, num_tasks):
    model = make_model(num_tasks, layer_op).double()
    own = {name: p.detach().clone() for name, p in trainable(model).items()}
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, WIDTH, generator=generator, dtype=torch.float64)
    grad_output = torch.randn(6, OUT, generator=generator, dtype=torch.float64)
    # A fused layer folds one task's h into its weight; a batch of per-row tasks takes the adapter path.
    task = None if num_tasks == 1 else (1 if layer_op == "fused" else TASKS)
    substitutes = _substitutes(model)
    with forced_backend(backend), sas.tasks(model, task) if task is not None else contextlib.nullcontext():
        output = torch.func.functional_call(model, substitutes, (x,))
    got = torch.autograd.grad(output, list(substitutes.values()), grad_output)
    plain = {name: t.detach().clone().requires_grad_() for name, t in substitutes.items()}
    expected = torch.autograd.grad(plain_output(model, plain, x, task), list(plain.values()), grad_output)
    for name, a, b in zip(substitutes, got, expected):
        torch.testing.assert_close(a, b, msg=name)
    # The module's own tensors are untouched and got no gradient.
    assert all(torch.equal(p, own[name]) and p.grad is None for name, p in trainable(model).items())

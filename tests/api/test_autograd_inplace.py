"""A hypernetwork or embedding tensor written in place between a forward and its backward.

The modulation table's backward (Python ``_ModulationTable`` and the C++ ``sas::cpu_hypernetwork``) keeps
its tensors on ``ctx``, out of autograd's version check, and used to compute gradients from the new values,
silently 50-100% off. Now it checks their version counters and raises as PyTorch does for a saved tensor.
"""
import contextlib

import pytest
import torch

import sas
from sas.testing import forced_backend

from autograd_cases import WIDTH, make_model, plain_output, trainable

BACKENDS = sas.available_backends("cpu")
# What each backward reads, by the name it has in the model; a write to any of them changes the gradients.
WRITTEN = ["sas_shared.embeddings", "sas_shared.hyper.hidden.weight", "sas_shared.hyper.output.weight"]
TASKS = torch.tensor([0, 2, 1, 1, 0, 2])


def _context(model, num_tasks):
    return sas.tasks(model, TASKS) if num_tasks > 1 else contextlib.nullcontext()


def _clamp(param):
    with torch.no_grad():
        param.clamp_(-0.1, 0.1)


def _optimizer_step(param):
    param.grad = torch.ones_like(param)
    torch.optim.SGD([param], lr=0.1).step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("name", WRITTEN + ["sas_shared.task_embeddings.1"])
@pytest.mark.parametrize("write", [_clamp, _optimizer_step], ids=["clamp_", "optimizer step"])
def test_write_between_forward_and_backward_raises_like_pytorch(backend, num_tasks, name, write):
    if name.startswith("sas_shared.task_embeddings") and num_tasks == 1:
        pytest.skip("a single-task adapter has no task embeddings")
    model = make_model(num_tasks)
    x = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(0))
    with forced_backend(backend), _context(model, num_tasks):
        loss = model(x).square().sum()
        write(trainable(model)[name])
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_write_after_backward_then_forward_gives_the_new_values_gradients(backend, num_tasks):
    """The check does not fire on the normal order (backward, step, next forward), whose gradients follow
    the new values."""
    model = make_model(num_tasks)
    x = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with forced_backend(backend), _context(model, num_tasks):
        for _ in range(2):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
        got = torch.autograd.grad(model(x).square().sum(), list(trainable(model).values()))
    params = trainable(model)
    expected = torch.autograd.grad(plain_output(model, params, x, TASKS if num_tasks > 1 else None).square().sum(),
                                   list(params.values()))
    for name, a, b in zip(params, got, expected):
        torch.testing.assert_close(a, b, msg=name)

"""``SaSConfig(train_down=False)`` (LoRA-FA style): A keeps its value and gets no gradient, every
other gradient is the full mode's, and an adapted layer keeps no tensor of its input's size for the backward
(only u = x @ A.T, 4 bytes x rank per row), on every backend and layer op. Saved bytes are counted exactly
(unique storages, ``bench.counting.saved_bytes``)."""
import copy

import pytest
import torch
from torch import nn

import sas
import sas.testing
from bench.counting import saved_bytes
from sas.testing import forced_backend

from small_models import MLP_TARGETS, Mlp

BACKENDS = sas.available_backends("cpu")  # triton through the interpreter (tests/conftest.py)
ROWS, RANK = 12, 3


def adapted(train_down: bool, layer_op: str = "kernels", **config):
    model = sas.inject(Mlp(), sas.SaSConfig(rank=RANK, targets=MLP_TARGETS, layer_op=layer_op, train_down=train_down,
                                            **config))
    return sas.testing.randomize_adapter(model)


def test_down_projections_are_frozen_and_counted_out():
    full, frozen_down = adapted(True), adapted(False)
    assert all(not p.requires_grad for p in frozen_down.sas_shared.down.values())
    assert all(p.requires_grad for p in frozen_down.sas_shared.up.values())
    down = sum(p.numel() for p in frozen_down.sas_shared.down.values())
    assert sas.count_parameters(frozen_down)[0] == sas.count_parameters(full)[0] - down
    with pytest.raises(ValueError, match="train_down must be a bool"):
        sas.SaSConfig(train_down="false")


@pytest.mark.parametrize("layer_op", ["kernels", "fold"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_full_modes_and_A_gets_none(backend, layer_op):
    full, frozen_down = adapted(True, layer_op), adapted(False, layer_op)
    x = torch.randn(ROWS, 12)
    with forced_backend(backend):
        results = []
        for model in (full, frozen_down):
            inputs = x.clone().requires_grad_()
            model(inputs).square().sum().backward()
            results.append((inputs.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (dx_full, grads_full), (dx, grads) = results
    torch.testing.assert_close(dx, dx_full, rtol=0, atol=0)
    assert set(grads) == {n for n in grads_full if ".down." not in n}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_full[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in frozen_down.sas_shared.down.values())


@pytest.mark.parametrize("layer_op", ["kernels", "fold"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_keeps_only_u(backend, layer_op):
    rows, width = 64, 48
    layer = sas.SaSLinear.from_linear(nn.Linear(width, width), rank=RANK, layer_op=layer_op, train_down=False)
    x = torch.randn(rows, width, requires_grad=True)
    with forced_backend(backend):
        kept = saved_bytes(lambda: layer(x), exclude=[x, *layer.parameters()])
        layer.shared.down.requires_grad_(True)  # the full mode keeps x (the test can fail)
        kept_full = saved_bytes(lambda: layer(x.detach().clone().requires_grad_()), exclude=list(layer.parameters()))
    # u and h (rank floats); plain autograd (the reference) keeps u and u * h, each 4 x rank bytes a row.
    copies_of_u = 2 if backend == "reference" and layer_op == "kernels" else 1
    assert kept <= copies_of_u * 4 * rows * RANK + 64, kept
    assert kept_full >= x.nbytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_says_why_it_cannot_run(backend):
    model = adapted(False)
    x = torch.randn(ROWS, 12, requires_grad=True)
    with forced_backend(backend):
        loss = model(x).square().sum()
        if backend == "reference":  # plain autograd keeps what it needs itself
            torch.autograd.grad(loss, x, create_graph=True)[0].sum().backward()
            return
        with pytest.raises(RuntimeError, match="train_down=False"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_save_load_and_merge_keep_A_frozen(tmp_path):
    model = adapted(False)
    sas.save_adapter(model, tmp_path)
    loaded = sas.load_adapter(Mlp(), tmp_path)
    assert loaded.sas_shared.config.train_down is False
    assert all(not p.requires_grad for p in loaded.sas_shared.down.values())
    x = torch.randn(ROWS, 12)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected)
        merged = sas.merge(copy.deepcopy(model))
        torch.testing.assert_close(merged(x), expected)

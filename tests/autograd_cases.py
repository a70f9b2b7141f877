"""A small adapted model and its output written from the formulas in plain PyTorch, for the autograd tests.

``plain_output`` reads every SaS tensor from a name -> tensor mapping and calls no ``sas`` code, so its
gradients (plain autograd) are an independent oracle for every backend, under autocast or in float64.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import sas
import sas.testing

WIDTH, OUT, RANK = 16, 8, 4


class Stack(nn.Module):
    """Three Linears, ``b`` called twice per forward; ``a`` and ``b`` have one shape, so ``sharing="shape"``
    gives them one A and one B."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.a, self.b, self.c = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, OUT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * WIDTH ** -0.5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def make_model(num_tasks: int = 1, layer_op: str = "adapter", seed: int = 0) -> Stack:
    """An injected :class:`Stack` with every SaS tensor away from its init (B nonzero, h spread, tasks apart)."""
    model = Stack(seed)
    torch.manual_seed(seed)  # inject draws A and the embeddings from the global generator
    sas.inject(model, sas.SaSConfig(rank=RANK, targets=["a", "b", "c"], sharing="shape", embed_dim=4, hyper_hidden=8,
                                    scale=0.5, num_tasks=num_tasks, layer_op=layer_op))
    sas.testing.randomize_adapter(model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.sas_shared.task_embeddings:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def trainable(model: nn.Module) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def plain_output(model: nn.Module, params: dict, x: torch.Tensor, task=None) -> torch.Tensor:
    """``model(x)`` from the formulas, with every SaS tensor read from ``params`` (names as in
    ``model.named_parameters()``) and the frozen layers from ``model``. ``task``: None (single task), a
    task id, or one id per row of ``x``."""
    shared = model.sas_shared
    w1, b1 = params["sas_shared.hyper.hidden.weight"], params["sas_shared.hyper.hidden.bias"]
    w2, b2 = params["sas_shared.hyper.output.weight"], params["sas_shared.hyper.output.bias"]
    activation = {nn.Tanh: torch.tanh, nn.ReLU: torch.relu, nn.GELU: F.gelu}[type(shared.hyper.activation)]

    def layer(name, inputs):
        module = getattr(model, name)
        embedding = params["sas_shared.embeddings"][module.layer_index]
        if task is None:
            h = 1 + F.linear(activation(F.linear(embedding, w1, b1)), w2, b2)
        else:
            tasks = torch.stack([params[f"sas_shared.task_embeddings.{t}"] for t in range(shared.num_tasks)])
            h = (1 + F.linear(activation(F.linear(embedding + tasks, w1, b1)), w2, b2))[task]
        A, B = params[f"sas_shared.down.{module.down_key}"], params[f"sas_shared.up.{module.up_key}"]
        base = module.base_layer
        return F.linear(inputs, base.weight, base.bias) + module.scale * F.linear(F.linear(inputs, A) * h, B)

    return layer("c", torch.tanh(layer("b", torch.tanh(layer("b", torch.tanh(layer("a", x)))))))


def float64_copy(model: nn.Module) -> nn.Module:
    """``model`` in float64 (a deep copy)."""
    return copy.deepcopy(model).to(torch.float64)

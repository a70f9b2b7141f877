"""Small models and helpers the merge, inject, save/load and task tests share (imported as ``small_models``:
pytest puts ``tests/`` on ``sys.path``, as for ``kernel_cases``)."""
import torch
from torch import nn

import sas
import sas.testing

#: The Linear layers of :class:`Mlp` the merge tests adapt.
MLP_TARGETS = ["enc.0", "enc.2", "out"]


class Mlp(nn.Module):
    """Two hidden Linears and a head: three adaptable layers with distinct shapes (12->24->12->5)."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 12))
        self.out = nn.Linear(12, 5)
        self.to(dtype)

    def forward(self, x):
        return self.out(self.enc(x))


def adapted_mlp(num_tasks=1, dtype=torch.float32, seed=7):
    """:class:`Mlp` adapted on :data:`MLP_TARGETS` with an update and tasks that really differ from the base
    and from each other (random A/B/hypernetwork, task embeddings drawn with ``seed``)."""
    model = sas.inject(Mlp().to(dtype), sas.SaSConfig(rank=3, targets=MLP_TARGETS, num_tasks=num_tasks))
    with torch.no_grad():
        sas.testing.randomize_adapter(model)
        generator = torch.Generator().manual_seed(seed)
        for embedding in model.sas_shared.task_embeddings:
            embedding.copy_(torch.randn(embedding.shape, generator=generator))
    return model


def outputs_per_task(model, x):
    """``model(x)`` for every task, each with the whole batch on that task."""
    outputs = []
    with torch.no_grad():
        for task in range(model.sas_shared.num_tasks):
            with sas.tasks(model, task):
                outputs.append(model(x))
    return outputs


class TiedLM(nn.Module):
    """A language-model head tied to the input embedding (GPT-2 style)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.mix(self.embed(tokens)))


def randomise_shared(model, seed=2):
    """Every tensor of ``model.sas_shared`` drawn from N(0, 0.1^2) with ``seed``: an update far from the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.sas_shared.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)


def frozen_weights(model):
    """Copies of the frozen base tensors of an adapted model, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def untouched(model):
    """Whether ``model`` holds no adapter at all (an inject or load that was refused left it as it was)."""
    return not sas.adapted_layers(model) and not hasattr(model, "sas_shared")

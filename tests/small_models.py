"""Small models and helpers the merge, inject and task tests share (imported as ``small_models``:
pytest puts ``tests/`` on ``sys.path``, as for ``kernel_cases``)."""
import torch
from torch import nn

import sas
import sas.testing

#: The Linear layers of :class:`Mlp` the merge tests adapt.
MLP_TARGETS = ["enc.0", "enc.2", "out"]


class Mlp(nn.Module):
    """Two hidden Linears and a head: three adaptable layers with distinct shapes (12->24->12->5)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 12))
        self.out = nn.Linear(12, 5)

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

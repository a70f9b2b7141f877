"""First-order gradients of every hypernetwork path against finite differences in float64
(``torch.autograd.gradcheck``), for every activation: the single-task autograd node with its hand-written
backward (``sas.shared._ModulationTable``), the multi-task table, and the C++ op (``sas._C``'s
``cpu_hypernetwork``, which ``SaSShared`` runs on the C++ backend). The double-backward tests recompute the
MLP under autograd instead, so they never run these hand-written first-order formulas."""
import pytest
import torch

from sas import backends
from sas.config import ACTIVATION_CHOICES
from sas.shared import _ACTIVATIONS, _ModulationTable

LAYERS, EMBED_DIM, HIDDEN, RANK, TASKS = 4, 3, 5, 6, 3

needs_cpp = pytest.mark.skipif(backends.load("cpp") is None, reason="the C++ extension is not built")


def hypernetwork_sources(tasks=0, seed=0):
    """Embeddings (L, k), W1, b1, W2, b2 (then ``tasks`` task embeddings) in float64, requiring gradients."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(LAYERS, EMBED_DIM), (HIDDEN, EMBED_DIM), (HIDDEN,), (RANK, HIDDEN), (RANK,)] + [(EMBED_DIM,)] * tasks
    return tuple(torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes)


def modulation_table(activation):
    """h of every layer through SaSShared's own autograd node, the backward it runs outside a double backward."""
    def table(*sources):
        versions = tuple(t._version for t in sources)
        return _ModulationTable.apply(_ACTIVATIONS[activation], torch.float64, versions, *sources)
    return table


@pytest.mark.parametrize("tasks", [0, TASKS])
@pytest.mark.parametrize("activation", ACTIVATION_CHOICES)
def test_python_hypernetwork_gradients(activation, tasks):
    assert torch.autograd.gradcheck(modulation_table(activation), hypernetwork_sources(tasks))


@needs_cpp
@pytest.mark.parametrize("activation", ACTIVATION_CHOICES)
def test_cpp_hypernetwork_gradients(activation):
    def table(*sources):
        return backends.load("cpp").hypernetwork(_ACTIVATIONS[activation], sources)
    assert torch.autograd.gradcheck(table, hypernetwork_sources())

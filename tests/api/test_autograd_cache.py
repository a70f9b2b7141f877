"""The per-forward cache of h (``SaSShared.layer_tensors``) with inference tensors and with writes.

The cache stamps the tensors h comes from with their version counters. A model set up under
``torch.inference_mode()`` has inference tensors, which have none, and its first forward raised
"Inference tensors do not track version counter". Writes that bypass version counters (inference tensors
written under inference mode, ``.data``) are seen from the next forward that runs a layer again.
"""
import contextlib
import copy

import pytest
import torch

import sas
from sas.testing import forced_backend

from autograd_cases import WIDTH, make_model, plain_output, trainable

BACKENDS = sas.available_backends("cpu")
TASKS = torch.tensor([0, 2, 1, 1, 0, 2])


def _context(model, num_tasks):
    return sas.tasks(model, TASKS) if num_tasks > 1 else contextlib.nullcontext()


def _expected(model, x, num_tasks):
    with torch.no_grad():
        return plain_output(model, trainable(model) or dict(model.named_parameters()), x,
                            TASKS if num_tasks > 1 else None)


def _input():
    return torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_model_set_up_under_inference_mode_runs_there_and_under_no_grad(backend, num_tasks):
    x = _input()
    with torch.inference_mode():
        model = make_model(num_tasks)
        assert model.sas_shared.embeddings.is_inference()
    expected = _expected(model, x, num_tasks)
    with forced_backend(backend), _context(model, num_tasks):
        with torch.inference_mode():
            for _ in range(2):  # the second forward takes the cached h
                torch.testing.assert_close(model(x), expected)
        with torch.no_grad():  # outside inference mode PyTorch allows inference tensors without autograd
            torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_write_to_an_inference_tensor_is_seen_by_the_next_forward(backend, num_tasks):
    x = _input()
    with torch.inference_mode(), forced_backend(backend):
        model = make_model(num_tasks)
        with _context(model, num_tasks):
            model(x)
            model.sas_shared.hyper.output.weight.mul_(-2.0)  # no version counter records this
            torch.testing.assert_close(model(x), _expected(model, x, num_tasks))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_write_is_seen_by_a_forward_over_layers_not_run_since(backend, grad):
    """A forward over other layers than the last one's (``a``, then ``c``) reuses the cache entry unless a
    tensor h comes from changed: an in-place write (optimizer step, clamp_) bumps its version counter."""
    model = make_model()
    before = copy.deepcopy(model)
    x = _input()
    with forced_backend(backend), torch.set_grad_enabled(grad):
        model.a(x)
        with torch.no_grad():
            model.sas_shared.embeddings.mul_(-1.0)
        after_write = model.c(x)
        recomputed = model.c(x)  # c asks again: a fresh h, whatever the stamp says
        assert not torch.allclose(after_write, before.c(x))  # the write changes c's output
        assert torch.equal(after_write, recomputed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_write_is_seen_by_the_next_forward_that_reruns_a_layer(backend):
    """``.data`` bypasses the version counter, so only a layer running again shows that a new forward
    began; a forward over layers not run since such a write would still serve the h from before it."""
    model = make_model()
    x = _input()
    with forced_backend(backend):
        model(x)
        model.sas_shared.hyper.hidden.weight.data.mul_(-1.0)
        torch.testing.assert_close(model(x), _expected(model, x, 1))



def test_a_layer_on_another_cuda_stream_gets_tensors_made_on_that_stream(monkeypatch):
    """The cache is kept per stream: a layer running on a second CUDA stream must not read an h (or A/B
    cast) that the first stream made with no event between them. CPU stand-in: the stream query is
    faked, and counting the hypernetwork runs shows which layer calls computed a table of their own."""
    from sas.backends import runtime

    stream = {"now": 1}
    monkeypatch.setattr(runtime, "stream_of", lambda t: stream["now"])
    model = make_model(1)
    shared = model.sas_shared
    runs = []
    compute_table = shared._modulation_table
    monkeypatch.setattr(shared, "_modulation_table", lambda *a: runs.append(stream["now"]) or compute_table(*a))
    first, second = sas.adapted_layers(model)[:2]

    def tensors(layer):
        return shared.layer_tensors(layer.layer_index, layer.down_key, layer.up_key, shared.embeddings.dtype)

    h_first = tensors(first)[2]
    tensors(second)
    assert runs == [1]  # one table per forward on one stream
    stream["now"] = 2
    tensors(second)
    assert runs == [1, 2]  # a table made on the second stream, not the first stream's
    torch.testing.assert_close(tensors(first)[2], h_first)  # the same values; only where they were made differs
    assert runs == [1, 2]  # and the rest of that forward on the second stream reuses it

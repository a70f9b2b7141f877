"""Pickling an adapted model (``pickle``, ``torch.save(model)``, ``copy.deepcopy``) at any point of its life: before
and after a forward, a backward and an optimizer step, merged, in every ``saved_input`` mode and on every backend.
What a layer caches for the next call (its route, which may hold an op packet or the owner's cache of 8-bit
copies with its weak references) is never copied: the copy builds its own at its first call and computes what
the original computes, bit for bit."""
import copy
import io
import pickle

import pytest
import torch

import sas
import sas.testing
from sas.testing import forced_backend

from small_models import MLP_TARGETS, Mlp

BACKENDS = sas.available_backends("cpu")  # triton through the interpreter (tests/conftest.py)
SAVED_INPUTS = ("full", "int8", "fp8")


def pickled(model):
    return pickle.loads(pickle.dumps(model))


def torch_saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = [pickled, torch_saved, copy.deepcopy]
COPY_IDS = ["pickle", "torch.save", "deepcopy"]


def adapted(saved_input="full", dtype=torch.float32, **config):
    model = sas.inject(Mlp().to(dtype), sas.SaSConfig(rank=3, targets=MLP_TARGETS, saved_input=saved_input, **config))
    return sas.testing.randomize_adapter(model)


def output_and_gradients(model, x):
    """The output of one training step's forward and the gradient of the input and every trainable tensor."""
    model.zero_grad(set_to_none=True)
    inputs = x.clone().requires_grad_()
    output = model(inputs)
    output.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return output.detach(), inputs.grad, grads


def assert_same_step(clone, model, x, context="", expected=None):
    """``clone`` computes ``model``'s training step on ``x`` (``expected``: that step, when already run)."""
    expected_output, expected_dx, expected_grads = expected or output_and_gradients(model, x)
    output, dx, grads = output_and_gradients(clone, x)
    assert torch.equal(output, expected_output) and torch.equal(dx, expected_dx), context
    assert grads.keys() == expected_grads.keys(), context
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), (context, name)


# What happens to a model before it is copied: nothing, a forward, or a forward, backward and optimizer step.
STAGES = {"injection": lambda model, optimizer, x: None,
          "a forward": lambda model, optimizer, x: model(x),
          "a training step": lambda model, optimizer, x: (model(x).square().sum().backward(), optimizer.step())}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_copy_at_every_stage_of_training_computes_what_the_original_does(backend):
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    for saved_input in SAVED_INPUTS:
        model = adapted(saved_input)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with forced_backend(backend):
            for stage, run in STAGES.items():
                run(model, optimizer, x)
                clones = {name: make_copy(model) for make_copy, name in zip(COPIES, COPY_IDS)}
                expected = output_and_gradients(model, x)
                for name, clone in clones.items():
                    assert_same_step(clone, model, x, f"saved_input={saved_input}: {name} after {stage}", expected)


@pytest.mark.parametrize("make_copy", [pickled, torch_saved], ids=["pickle", "torch.save"])
def test_a_copy_of_a_trained_merged_model_serves_and_unmerges_on_its_own(make_copy):
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    for saved_input in SAVED_INPUTS:
        model = adapted(saved_input)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        model(x).square().sum().backward()  # the default backend: C++ where it is built
        with torch.no_grad():
            unmerged_output = model(x)
        sas.merge(model)
        with torch.no_grad():
            merged_output = model(x)
        clone = make_copy(model)
        assert all(layer.merged for layer in sas.adapted_layers(clone))
        with torch.no_grad():
            assert torch.equal(clone(x), merged_output), saved_input
        sas.unmerge(clone)
        assert all(torch.equal(p, frozen[n]) for n, p in clone.named_parameters() if "base_layer" in n)
        assert all(layer.merged for layer in sas.adapted_layers(model))  # the original stays merged
        with torch.no_grad():
            assert torch.equal(clone(x), unmerged_output), saved_input


def test_a_float64_model_with_an_8_bit_copy_pickles_after_training():
    model = adapted("int8", dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    model(x).square().sum().backward()
    assert_same_step(pickled(model), model, x)


def test_a_timm_vit_pickles_after_a_training_step():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    sas.inject(model, sas.SaSConfig(rank=2, saved_input="int8"))
    sas.testing.randomize_adapter(model)
    images = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    model(images).square().sum().backward()
    assert_same_step(torch_saved(model), model, images)


def test_a_transformers_llama_pickles_after_a_training_step():
    pytest.importorskip("transformers")
    from sas.recipes.causal_lm.model import tiny_llama

    model = tiny_llama(64)
    sas.inject(model, sas.SaSConfig(rank=2, targets=sas.LLAMA_TARGETS, saved_input="fp8"))
    sas.testing.randomize_adapter(model)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    clone = torch_saved(model)
    for candidate in (model, clone):
        candidate.zero_grad(set_to_none=True)
    losses = [candidate(input_ids=ids, labels=ids).loss for candidate in (model, clone)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), clone.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name

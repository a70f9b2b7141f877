"""sas.merge / sas.unmerge: merging is refused where it would serve the wrong task or lose the base weights
(an open context for another task, add_task on a merged model, another task while merged, tied weights), an
overflowing fold is refused, unmerge restores the frozen weights bit for bit, the merged flag travels with the
state_dict, and copies of a merged model unmerge exactly like the original."""
import copy
import io
import threading

import pytest
import torch
from torch import nn

import sas
import sas.testing
from sas import SaSConfig

from small_models import Mlp, TiedLM, adapted_mlp, frozen_weights, outputs_per_task, randomise_shared


def _samefrozen_weights(model, frozen):
    return all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "base_layer" in n)


# -- a context for another task --------------------------------------------------------------------

@pytest.mark.parametrize("context", [0, torch.tensor([1, 0, 1])], ids=["int", "mixed ids"])
def test_merge_inside_a_context_for_another_task_is_refused_and_changes_nothing(context):
    model = adapted_mlp(num_tasks=3)
    frozen = frozen_weights(model)
    with sas.tasks(model, context):
        with pytest.raises(ValueError, match=r"refusing to merge task 2: a sas.tasks context .* open for tasks \[0"):
            sas.merge(model, task=2)
    assert not any(layer.merged for layer in sas.adapted_layers(model)) and _samefrozen_weights(model, frozen)


def test_merge_inside_a_context_for_the_same_task_serves_it():
    model = adapted_mlp(num_tasks=3)
    x = torch.randn(3, 12)
    expected = outputs_per_task(model, x)[1]
    with sas.tasks(model, 1):
        sas.merge(model, task=1)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)
    sas.unmerge(model)


def test_merge_is_refused_while_another_thread_holds_a_context_for_another_task():
    model = adapted_mlp(num_tasks=3)
    entered, release = threading.Event(), threading.Event()

    def serve_task_0():
        with sas.tasks(model, 0):
            entered.set()
            release.wait(timeout=60)

    worker = threading.Thread(target=serve_task_0)
    worker.start()
    try:
        assert entered.wait(timeout=60)
        with pytest.raises(ValueError, match=r"in this or another thread\) is open for tasks \[0\]"):
            sas.merge(model, task=1)
    finally:
        release.set()
        worker.join()
    sas.merge(model, task=1)  # the context is closed: nothing expects task 0 any more
    assert all(layer.merged_task == 1 for layer in sas.adapted_layers(model))


def test_merging_another_task_while_merged_is_refused():
    model = adapted_mlp(num_tasks=3)
    sas.merge(model, task=0)
    merged = frozen_weights(model)
    with pytest.raises(ValueError, match=r"refusing to merge task 1: the model is merged for task 0; .*unmerge"):
        sas.merge(model, task=1)
    assert all(layer.merged_task == 0 for layer in sas.adapted_layers(model)) and _samefrozen_weights(model, merged)


# -- add_task on a merged model --------------------------------------------------------------------

@pytest.mark.parametrize("num_tasks, task", [(1, None), (2, 1)])
def test_add_task_on_a_merged_model_is_refused_and_unmerge_still_restores_the_base(num_tasks, task):
    model = adapted_mlp(num_tasks=num_tasks)
    frozen = frozen_weights(model)
    sas.merge(model, task=task)
    parameters = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="refusing to add a task to a merged model: .*sas.unmerge"):
        sas.add_task(model)
    assert model.sas_shared.num_tasks == num_tasks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == parameters
    sas.unmerge(model)
    assert _samefrozen_weights(model, frozen)
    assert sas.add_task(model) == num_tasks  # unmerged, the task is added


# -- an fp16 fold that overflows -------------------------------------------------------------------

def test_fp16_merge_that_would_overflow_is_refused_and_the_weights_untouched():
    model = adapted_mlp(dtype=torch.float16)
    with torch.no_grad():  # W0 near fp16's largest value, and an update pushing it past it
        model.enc[0].base_layer.weight[0, 0] = 65000.0
        model.sas_shared.down["enc_0"].fill_(1.0)
        model.sas_shared.up["enc_0"].fill_(1000.0)
    frozen = frozen_weights(model)
    assert torch.isfinite(model.enc[0].delta_weight()).all()  # the update alone is finite
    with pytest.raises(ValueError, match=r"refusing to merge: layer 0 .*overflows torch.float16.*beyond 65504\)"):
        sas.merge(model)
    with pytest.raises(ValueError, match=r"refusing to merge: the merged weight overflows torch.float16"):
        model.enc[0].merge()
    assert not any(layer.merged for layer in sas.adapted_layers(model)) and _samefrozen_weights(model, frozen)


# -- copies of a merged model ----------------------------------------------------------------------

def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_a_copy_of_a_merged_model_unmerges_exactly_and_on_its_own(make_copy):
    model = adapted_mlp(num_tasks=2)
    frozen = frozen_weights(model)
    x = torch.randn(4, 12)
    sas.merge(model, task=1)
    clone = make_copy(model)
    assert all(layer.merged_task == 1 for layer in sas.adapted_layers(clone))
    sas.unmerge(clone)
    assert _samefrozen_weights(clone, frozen)
    assert all(layer.merged for layer in sas.adapted_layers(model))  # the original is still merged
    sas.unmerge(model)
    assert _samefrozen_weights(model, frozen)
    torch.testing.assert_close(outputs_per_task(clone, x), outputs_per_task(model, x), rtol=0, atol=0)


def test_a_copy_of_a_merged_model_written_since_merge_refuses_unmerge_like_the_original():
    model = adapted_mlp()
    sas.merge(model)
    with torch.no_grad():
        model.out.base_layer.weight.add_(1.0)
    clone = copy.deepcopy(model)
    for candidate in (model, clone):
        with pytest.raises(ValueError, match="refusing to unmerge layer 2 .*weight before merge is not known"):
            sas.unmerge(candidate)


def test_loading_an_unmerged_state_into_a_task_merged_model_forgets_the_merged_task():
    model = adapted_mlp(num_tasks=2)
    unmerged_state = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 12)
    expected = outputs_per_task(model, x)
    sas.merge(model, task=0)
    model.load_state_dict(unmerged_state)
    assert all(layer.merged_task is None and not layer.merged for layer in sas.adapted_layers(model))
    torch.testing.assert_close(outputs_per_task(model, x), expected, rtol=0, atol=0)  # task 1 runs, unmerged
    sas.merge(model, task=1)
    torch.testing.assert_close(model(x), expected[1])


class TwinLinears(nn.Module):
    """Two distinct Linear modules holding one weight Parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class SlicedWeight(nn.Module):
    """A Linear whose weight is a view into another module's parameter (same storage)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bank = nn.Parameter(torch.randn(16, 8))
        self.proj = nn.Linear(8, 8)
        self.proj.weight = nn.Parameter(self.bank.data[:8])

    def forward(self, x):
        return self.proj(x) + self.bank.sum()


# -- merge and unmerge ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, targets, other", [
    (TiedLM, ["head"], "embed.weight"),
    (TwinLinears, ["first", "second"], "second.base_layer.weight"),
    (TwinLinears, ["first"], "second.weight"),
    (SlicedWeight, ["proj"], "bank"),
])
def test_merge_refuses_tied_weights_and_changes_nothing(make, targets, other):
    model = sas.inject(make(), SaSConfig(rank=2, targets=targets))
    randomise_shared(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"refusing to merge: .*shares its memory with .*{other}.*tied weights"):
        sas.merge(model)
    assert not any(layer.merged for layer in sas.adapted_layers(model))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_unmerge_refuses_non_finite_update_and_keeps_the_model_merged():
    model = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    randomise_shared(model)
    original = frozen_weights(model)
    sas.merge(model)
    merged = frozen_weights(model)
    with torch.no_grad():
        model.sas_shared.up["enc_2"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to unmerge layer 1 .*NaN or Inf"):
        sas.unmerge(model)
    # All-or-nothing: the finite layer 0 was not unmerged either, and no weight became non-finite.
    assert all(layer.merged for layer in sas.adapted_layers(model))
    assert all(torch.equal(p, merged[n]) for n, p in frozen_weights(model).items())
    with torch.no_grad():
        model.sas_shared.up["enc_2"][0, 0] = 0.0
    sas.unmerge(model)
    assert all(torch.equal(p, original[n]) for n, p in frozen_weights(model).items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_frozen_weights_bit_for_bit_after_training_while_merged(dtype):
    model = sas.inject(Mlp(dtype=dtype), SaSConfig(rank=3, targets=["enc.0", "enc.2", "out"]))
    randomise_shared(model)
    x = torch.randn(6, 12, dtype=dtype)
    original = frozen_weights(model)
    optimizer = torch.optim.SGD(model.sas_shared.parameters(), lr=0.5, momentum=0.9)
    model(x).square().mean().backward()
    optimizer.step()
    sas.merge(model)
    for _ in range(3):  # momentum keeps moving the adapter while it is folded in
        optimizer.step()
    sas.unmerge(model)
    assert all(torch.equal(p, original[n]) for n, p in frozen_weights(model).items())
    # Unmerged again, the model computes with the adapter as it is now.
    assert not any(layer.merged for layer in sas.adapted_layers(model))


def test_repeated_merge_unmerge_does_not_drift():
    model = sas.inject(Mlp(dtype=torch.bfloat16), SaSConfig(rank=3, targets=["enc.0", "enc.2"], scale=3.0))
    randomise_shared(model)
    original = frozen_weights(model)
    for _ in range(5):
        sas.merge(model)
        sas.unmerge(model)
    assert all(torch.equal(p, original[n]) for n, p in frozen_weights(model).items())


def test_merged_state_dict_into_unmerged_model_applies_the_update_once():
    source = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    randomise_shared(source)
    x = torch.randn(4, 12)
    expected = source(x)
    sas.merge(source)
    target = sas.inject(Mlp(seed=1), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    target.load_state_dict(source.state_dict())
    assert all(layer.merged for layer in sas.adapted_layers(target))
    torch.testing.assert_close(target(x), expected, rtol=1e-5, atol=1e-6)
    # The state holds the merged weights only: unmerging cannot restore the base exactly, so it refuses.
    with pytest.raises(ValueError, match="refusing to unmerge layer 0 .*weight before merge is not known"):
        sas.unmerge(target)
    torch.testing.assert_close(target(x), expected, rtol=1e-5, atol=1e-6)


def test_unmerged_state_dict_into_merged_model_clears_the_flag():
    source = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    randomise_shared(source)
    x = torch.randn(4, 12)
    expected = source(x)
    target = sas.inject(Mlp(seed=1), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    randomise_shared(target, seed=5)
    sas.merge(target)
    target.load_state_dict(source.state_dict())
    assert not any(layer.merged for layer in sas.adapted_layers(target))
    torch.testing.assert_close(target(x), expected, rtol=0, atol=0)


def test_state_dict_without_the_merged_flag_still_loads_strictly():
    """A full state saved before the flag existed is an unmerged one; a partial one keeps the state."""
    source = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    randomise_shared(source)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("sas_merged")}
    target = sas.inject(Mlp(seed=1), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    sas.merge(target)
    target.load_state_dict(state)
    assert not any(layer.merged for layer in sas.adapted_layers(target))
    sas.merge(target)
    target.load_state_dict({k: v for k, v in state.items() if k.startswith("sas_shared.")}, strict=False)
    assert all(layer.merged for layer in sas.adapted_layers(target))

"""Issue 17, merge state: merging is refused where it would serve the wrong task or lose the base
weights (an open context for another task, add_task on a merged model, another task while merged),
an overflowing fold is refused, and copies of a merged model unmerge exactly like the original."""
import copy
import io
import threading

import pytest
import torch

import sas
import sas.testing

from small_models import adapted_mlp, outputs_per_task


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def _same_frozen(model, frozen):
    return all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "base_layer" in n)


# -- a context for another task --------------------------------------------------------------------

@pytest.mark.parametrize("context", [0, torch.tensor([1, 0, 1])], ids=["int", "mixed ids"])
def test_merge_inside_a_context_for_another_task_is_refused_and_changes_nothing(context):
    model = adapted_mlp(num_tasks=3)
    frozen = _frozen(model)
    with sas.tasks(model, context):
        with pytest.raises(ValueError, match=r"refusing to merge task 2: a sas.tasks context .* open for tasks \[0"):
            sas.merge(model, task=2)
    assert not any(layer.merged for layer in sas.adapted_layers(model)) and _same_frozen(model, frozen)


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
    merged = _frozen(model)
    with pytest.raises(ValueError, match=r"refusing to merge task 1: the model is merged for task 0; .*unmerge"):
        sas.merge(model, task=1)
    assert all(layer.merged_task == 0 for layer in sas.adapted_layers(model)) and _same_frozen(model, merged)


# -- add_task on a merged model --------------------------------------------------------------------

@pytest.mark.parametrize("num_tasks, task", [(1, None), (2, 1)])
def test_add_task_on_a_merged_model_is_refused_and_unmerge_still_restores_the_base(num_tasks, task):
    model = adapted_mlp(num_tasks=num_tasks)
    frozen = _frozen(model)
    sas.merge(model, task=task)
    parameters = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="refusing to add a task to a merged model: .*sas.unmerge"):
        sas.add_task(model)
    assert model.sas_shared.num_tasks == num_tasks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == parameters
    sas.unmerge(model)
    assert _same_frozen(model, frozen)
    assert sas.add_task(model) == num_tasks  # unmerged, the task is added


# -- an fp16 fold that overflows -------------------------------------------------------------------

def test_fp16_merge_that_would_overflow_is_refused_and_the_weights_untouched():
    model = adapted_mlp(dtype=torch.float16)
    with torch.no_grad():  # W0 near fp16's largest value, and an update pushing it past it
        model.enc[0].base_layer.weight[0, 0] = 65000.0
        model.sas_shared.down["enc_0"].fill_(1.0)
        model.sas_shared.up["enc_0"].fill_(1000.0)
    frozen = _frozen(model)
    assert torch.isfinite(model.enc[0].delta_weight()).all()  # the update alone is finite
    with pytest.raises(ValueError, match=r"refusing to merge: layer 0 .*overflows torch.float16.*beyond 65504\)"):
        sas.merge(model)
    with pytest.raises(ValueError, match=r"refusing to merge: the merged weight overflows torch.float16"):
        model.enc[0].merge()
    assert not any(layer.merged for layer in sas.adapted_layers(model)) and _same_frozen(model, frozen)


# -- copies of a merged model ----------------------------------------------------------------------

def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_a_copy_of_a_merged_model_unmerges_exactly_and_on_its_own(make_copy):
    model = adapted_mlp(num_tasks=2)
    frozen = _frozen(model)
    x = torch.randn(4, 12)
    sas.merge(model, task=1)
    clone = make_copy(model)
    assert all(layer.merged_task == 1 for layer in sas.adapted_layers(clone))
    sas.unmerge(clone)
    assert _same_frozen(clone, frozen)
    assert all(layer.merged for layer in sas.adapted_layers(model))  # the original is still merged
    sas.unmerge(model)
    assert _same_frozen(model, frozen)
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

"""Many tasks on one model: sas.tasks, task embeddings, sas.add_task, per-task merge, save/load."""
import json
import runpy
import threading
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sas
import sas.testing
from sas import SaSConfig
from sas.io import CONFIG_NAME, DESCRIPTION_KEY, WEIGHTS_NAME

from small_models import outputs_per_task


def _multitask_vit(num_tasks=3, seed=0):
    """test_vit with a random adapter whose tasks really differ (task embeddings start equal, at zero)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False).eval()
    sas.inject(model, SaSConfig(rank=4, num_tasks=num_tasks))
    sas.testing.randomize_adapter(model)
    _randomize_tasks(model, seed=seed + 1)
    return model


@torch.no_grad()
def _randomize_tasks(model, seed):
    generator = torch.Generator().manual_seed(seed)
    for embedding in model.sas_shared.task_embeddings:
        embedding.copy_(torch.randn(embedding.shape, generator=generator))


def _images(model, batch, seed=1):
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the modulation

def test_task_embeddings_are_parameters_named_task_and_tasks_start_as_the_single_task_adapter():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    sas.inject(model, SaSConfig(rank=4, num_tasks=3))
    names = [n for n, p in model.named_parameters() if "task" in n]
    assert names == [f"sas_shared.task_embeddings.{t}" for t in range(3)]
    assert all(p.requires_grad for n, p in model.named_parameters() if n in names)
    shared = model.sas_shared
    table = shared.modulations()
    assert table.shape == (len(sas.adapted_layers(model)), 3, 4)
    # Zero task embeddings: every task's h is the layer's single-task h.
    single = shared.hyper(shared.embeddings)
    for task in range(3):
        torch.testing.assert_close(table[:, task], single)


def test_modulation_is_the_documented_form():
    """h_{t,l} = 1 + W2 act(W1 (e_l + tau_t) + b1) + b2, checked in float64."""
    model = _multitask_vit().double()
    shared, hyper = model.sas_shared, model.sas_shared.hyper
    table = shared.modulations()
    for task, tau in enumerate(shared.task_embeddings):
        expected = 1 + hyper.output(torch.tanh(hyper.hidden(shared.embeddings + tau)))
        torch.testing.assert_close(table[:, task], expected)
        torch.testing.assert_close(shared.modulation(1)[task], expected[1])


def test_a_tasks_modulation_does_not_depend_on_how_many_tasks_there_are():
    """What add_task's bit-identity rests on: h of tasks[:T] is, bit for bit, the first T columns of h of
    all tasks (a GEMM over the T task rows fails this for T < 12 on MKL)."""
    torch.manual_seed(0)
    hyper = sas.HyperNetwork(8, 32, 8)
    nn.init.normal_(hyper.output.weight, std=0.5)
    layers, tasks = torch.randn(7, 8), torch.randn(40, 8)
    every = hyper(layers, tasks)
    for count in range(1, 40):
        assert torch.equal(hyper(layers, tasks[:count]), every[:, :count]), count


# ---------------------------------------------------------------------------- mixed batches

def test_mixed_batch_equals_each_sample_alone_with_its_task():
    model = _multitask_vit()
    x = _images(model, 4)
    ids = torch.tensor([2, 0, 2, 1])
    with torch.no_grad(), sas.tasks(model, ids):
        mixed = model(x)
    alone = []
    with torch.no_grad():
        for i, task in enumerate(ids.tolist()):
            with sas.tasks(model, task):
                alone.append(model(x[i:i + 1]))
    # Not bitwise: the frozen GEMMs round differently for a batch of 1 and of 4.
    torch.testing.assert_close(mixed, torch.cat(alone))
    per_task = outputs_per_task(model, x[:1])
    assert not torch.allclose(per_task[0], per_task[2]), "the tasks must differ for this to mean anything"


def test_mixed_batch_trains_every_task_present_and_no_other():
    model = _multitask_vit(num_tasks=4)
    x = _images(model, 3)
    ids = torch.tensor([0, 2, 0])
    with sas.tasks(model, ids):
        model(x).square().sum().backward()
    grads = [tau.grad for tau in model.sas_shared.task_embeddings]
    for task in (1, 3):  # absent: nothing flows to them
        assert torch.equal(grads[task], torch.zeros_like(grads[task]))
    # Present: each gets exactly what its own samples give it.
    for task in (0, 2):
        model.zero_grad()
        with sas.tasks(model, task):
            model(x[ids == task]).square().sum().backward()
        assert grads[task].abs().max() > 0
        torch.testing.assert_close(grads[task], model.sas_shared.task_embeddings[task].grad)


def test_two_dimensional_inputs_take_one_id_per_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 24), nn.Tanh(), nn.Linear(24, 5))
    sas.inject(model, SaSConfig(rank=3, targets=["0", "2"], num_tasks=2))
    sas.testing.randomize_adapter(model)
    _randomize_tasks(model, seed=3)
    x = torch.randn(6, 13)
    ids = torch.tensor([1, 0, 0, 1, 1, 0])
    with torch.no_grad(), sas.tasks(model, ids):
        mixed = model(x)
    with torch.no_grad():
        for task in (0, 1):
            with sas.tasks(model, task):
                torch.testing.assert_close(mixed[ids == task], model(x[ids == task]))


def test_fused_layer_op_runs_mixed_batches_on_the_adapter_path():
    torch.manual_seed(0)
    x, ids = torch.randn(5, 3, 16), torch.tensor([1, 0, 1, 1, 0])
    results = {}
    for layer_op in ("adapter", "fused"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 20))
        sas.inject(model, SaSConfig(rank=3, targets=["0"], num_tasks=2, layer_op=layer_op))
        sas.testing.randomize_adapter(model)
        _randomize_tasks(model, seed=3)
        with torch.no_grad():
            with sas.tasks(model, ids):
                mixed = model(x)
            with sas.tasks(model, 1):  # one task: the fused design folds its h
                single = model(x)
        results[layer_op] = (mixed, single)
    assert torch.equal(results["fused"][0], results["adapter"][0])
    torch.testing.assert_close(results["fused"][1], results["adapter"][1])


# ---------------------------------------------------------------------------- the context

def test_context_restores_the_previous_setting_on_exit_and_on_exceptions_and_nests():
    model = _multitask_vit()
    x = _images(model, 2)
    per_task = outputs_per_task(model, x)
    with torch.no_grad(), sas.tasks(model, 1):
        with sas.tasks(model, torch.tensor([2, 0])):
            inner = model(x)
        torch.testing.assert_close(model(x), per_task[1])  # the outer setting is back
        with pytest.raises(RuntimeError, match="boom"):
            with sas.tasks(model, 0):
                raise RuntimeError("boom")
        torch.testing.assert_close(model(x), per_task[1])
    torch.testing.assert_close(inner, torch.stack([per_task[2][0], per_task[0][1]]))
    with pytest.raises(ValueError, match=r"num_tasks=3: run it inside `with sas.tasks"):
        model(x)


def test_settings_are_per_thread():
    model = _multitask_vit()
    x = _images(model, 2)
    per_task = outputs_per_task(model, x)
    seen = {}

    def serve(task):
        with torch.no_grad(), sas.tasks(model, task):
            barrier.wait()  # both contexts are open at once
            seen[task] = model(x)

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=serve, args=(task,)) for task in (0, 2)]
    with sas.tasks(model, 1):  # this thread's setting is not inherited by the others
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    torch.testing.assert_close(seen[0], per_task[0])
    torch.testing.assert_close(seen[2], per_task[2])


# ---------------------------------------------------------------------------- add_task

def _train(model, x, ids, steps, seed):
    """A few AdamW steps with weight decay on whatever requires grad (momentum and decay included)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    target = torch.randn(x.shape[0], model.num_classes, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        with sas.tasks(model, ids):
            loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_add_task_trains_only_the_new_embedding_and_keeps_other_tasks_bit_identical():
    model = _multitask_vit(num_tasks=2)
    model.head.requires_grad_(True)
    x = _images(model, 3)
    _train(model, x, torch.tensor([0, 1, 0]), steps=2, seed=4)
    before = outputs_per_task(model, x)
    table_before = model.sas_shared.modulations().detach()
    with torch.no_grad():
        expected_start = (model.sas_shared.task_embeddings[0] + model.sas_shared.task_embeddings[1]) / 2

    new = sas.add_task(model)

    assert new == 2 and model.sas_shared.num_tasks == 3 and model.sas_shared.config.num_tasks == 3
    torch.testing.assert_close(model.sas_shared.task_embeddings[2].detach(), expected_start)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["sas_shared.task_embeddings.2"]
    _train(model, x, torch.tensor([2, 0, 2]), steps=3, seed=5)  # a mixed batch: old tasks run too
    after = outputs_per_task(model, x)
    assert torch.equal(model.sas_shared.modulations().detach()[:, :2], table_before)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.allclose(after[2], before[0]) and not torch.allclose(after[2], before[1])


def test_add_task_to_a_single_task_model():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    sas.inject(model, SaSConfig(rank=4))
    sas.testing.randomize_adapter(model)
    x = _images(model, 2)
    with torch.no_grad():
        before = model(x)
    assert sas.add_task(model) == 1
    assert [n for n, _ in model.named_parameters() if "task" in n] == ["sas_shared.task_embeddings.0",
                                                                       "sas_shared.task_embeddings.1"]
    # Task 0 moves from the single-task hypernetwork path to the per-task one: equal up to rounding.
    with torch.no_grad(), sas.tasks(model, 0):
        torch.testing.assert_close(model(x), before)


# ---------------------------------------------------------------------------- save / load

def test_save_and_load_round_trip_every_task(tmp_path):
    model = _multitask_vit(num_tasks=2)
    sas.add_task(model)
    _randomize_tasks(model, seed=7)
    x = _images(model, 2)
    expected = outputs_per_task(model, x)
    sas.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["num_tasks"] == 3
    torch.manual_seed(0)
    fresh = sas.load_adapter(timm.create_model("test_vit", pretrained=False).eval(), tmp_path)
    loaded = outputs_per_task(fresh, x)
    assert len(loaded) == 3
    for got, want in zip(loaded, expected):
        assert torch.equal(got, want)


def test_adapters_saved_before_num_tasks_existed_still_load(tmp_path):
    torch.manual_seed(0)
    model = sas.testing.randomize_adapter(sas.inject(timm.create_model("test_vit", pretrained=False).eval(),
                                                     SaSConfig(rank=4)))
    x = _images(model, 2)
    with torch.no_grad():
        expected = model(x)
    sas.save_adapter(model, tmp_path)
    # What an older version wrote: no num_tasks in the description (the loader reads the weights file's copy).
    weights = tmp_path / WEIGHTS_NAME
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    del meta["config"]["num_tasks"]
    save_file(load_file(str(weights)), str(weights), metadata={DESCRIPTION_KEY: json.dumps(meta)})
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    torch.manual_seed(0)
    fresh = sas.load_adapter(timm.create_model("test_vit", pretrained=False).eval(), tmp_path)
    assert fresh.sas_shared.num_tasks == 1 and not list(fresh.sas_shared.task_embeddings)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


# ---------------------------------------------------------------------------- merge

def test_per_task_merge_matches_the_unmerged_outputs_and_unmerge_restores():
    model = _multitask_vit()
    x = _images(model, 2)
    unmerged = outputs_per_task(model, x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for task in range(3):
        sas.merge(model, task=task)
        assert all(layer.merged_task == task for layer in sas.adapted_layers(model))
        with torch.no_grad():
            torch.testing.assert_close(model(x), unmerged[task])  # no context needed once merged
            with sas.tasks(model, task):
                torch.testing.assert_close(model(x), unmerged[task])
        other = (task + 1) % 3
        with pytest.raises(ValueError, match=rf"merged for task {task}.*tasks \[{other}\] need sas.unmerge"):
            with sas.tasks(model, torch.tensor([task, other])):
                pass
        sas.unmerge(model)
        for name, p in model.named_parameters():
            if "base_layer" in name:
                assert torch.equal(p, weights[name])


def test_merge_needs_a_task_when_there_are_several():
    model = _multitask_vit()
    with pytest.raises(ValueError, match=r"num_tasks=3: name the task \(task=t, t in 0..2\)"):
        sas.merge(model)
    with pytest.raises(ValueError, match=r"task ids \[3\] are out of range"):
        sas.merge(model, task=3)
    assert not any(layer.merged for layer in sas.adapted_layers(model))


# ---------------------------------------------------------------------------- bad input

def test_bad_task_ids_are_refused_naming_the_values():
    model = _multitask_vit()
    x = _images(model, 2)
    with pytest.raises(ValueError, match=r"task ids \[3, 7\] are out of range: this model has num_tasks=3"):
        with sas.tasks(model, torch.tensor([0, 7, 3, 3])):
            pass
    with pytest.raises(ValueError, match=r"task ids \[-1\] are out of range"):
        with sas.tasks(model, -1):
            pass
    with pytest.raises(ValueError, match=r"task_ids holds 3 ids but an adapted layer got a batch of 2"):
        with sas.tasks(model, torch.tensor([0, 1, 2])):
            model(x)
    with pytest.raises(ValueError, match=r"must be 1-D.*got shape \(2, 1\)"):
        with sas.tasks(model, torch.tensor([[0], [1]])):
            pass
    with pytest.raises(TypeError, match="task_ids must be an int or an int64/int32 tensor"):
        with sas.tasks(model, torch.tensor([0.0, 1.0])):
            pass


def test_task_ids_on_the_meta_device_are_refused_clearly():
    model = _multitask_vit()
    with pytest.raises(ValueError, match="task_ids is on the meta device, which holds no values"):
        with sas.tasks(model, torch.tensor([0, 1], device="meta")):
            pass


def test_single_task_models_refuse_ids_other_than_zero():
    torch.manual_seed(0)
    model = sas.inject(timm.create_model("test_vit", pretrained=False).eval(), SaSConfig(rank=4))
    x = _images(model, 2)
    with pytest.raises(ValueError, match=r"task ids \[1, 2\] on a model with num_tasks=1"):
        with sas.tasks(model, torch.tensor([0, 2, 1])):
            pass
    with pytest.raises(ValueError, match=r"task_ids holds 1 ids but an adapted layer got a batch of 2"):
        with sas.tasks(model, torch.tensor([0])):
            model(x)
    with torch.no_grad():
        expected = model(x)
        with sas.tasks(model, torch.tensor([0, 0])):
            assert torch.equal(model(x), expected)


def test_num_tasks_must_be_a_positive_int():
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        SaSConfig(num_tasks=0)


def test_the_multitask_example_runs(capsys):
    example = Path(__file__).resolve().parents[2] / "examples" / "multitask.py"
    runpy.run_path(str(example))["main"](steps=1)
    printed = capsys.readouterr().out
    claims = ("task 0 unchanged bit for bit: True", "merged for task 0 matches: True", "loaded, task 0 equal: True")
    for claim in claims:
        assert claim in printed

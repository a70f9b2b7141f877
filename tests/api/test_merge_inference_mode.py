"""Serving under ``torch.inference_mode()``: a model injected or loaded there (its weights are
inference tensors, which have no version counter) runs, merges to the same outputs and unmerges to the
same weights bit for bit; a write to a merged inference weight is still noticed by unmerge."""
import contextlib

import pytest
import torch
from torch import nn

import sas
import sas.testing

from small_models import Mlp, adapted_mlp


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def _same_frozen(model, frozen):
    return all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "base_layer" in n)


def _saved_adapter(folder):
    with torch.no_grad():
        model = adapted_mlp(seed=3)
    sas.save_adapter(model, folder)
    return folder


def _task_context(model, task):
    return sas.tasks(model, task) if task is not None else contextlib.nullcontext()


@pytest.mark.parametrize("setup, num_tasks, task", [("inject", 1, None), ("inject", 3, 2), ("load_adapter", 1, None)],
                         ids=["inject", "inject, task 2 of 3", "load_adapter"])
@pytest.mark.parametrize("merge_mode", ["inside", "outside"], ids=["merge in inference mode", "merge outside it"])
def test_model_set_up_under_inference_mode_runs_merges_and_unmerges_exactly(tmp_path, setup, num_tasks, task,
                                                                            merge_mode):
    x = torch.randn(6, 12)
    with torch.inference_mode():
        if setup == "inject":
            model = adapted_mlp(num_tasks, seed=3)
        else:
            model = sas.load_adapter(Mlp(), _saved_adapter(tmp_path / "adapter"))
        assert model.enc[0].base_layer.weight.is_inference() and model.sas_shared.up["enc_0"].is_inference()
        frozen = _frozen(model)
        with _task_context(model, task):
            unmerged = model(x)
    with torch.inference_mode() if merge_mode == "inside" else contextlib.nullcontext():
        sas.merge(model, task=task)
    with torch.inference_mode():
        assert not _same_frozen(model, frozen)  # the update is folded in
        torch.testing.assert_close(model(x), unmerged)  # merged: one GEMM per layer, rounded otherwise
    with torch.inference_mode() if merge_mode == "inside" else contextlib.nullcontext():
        sas.unmerge(model)
    with torch.inference_mode():
        assert _same_frozen(model, frozen)
        with _task_context(model, task):
            assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("write", ["add_", "load_state_dict"])
def test_a_write_to_a_merged_inference_weight_makes_unmerge_refuse(write):
    with torch.inference_mode():
        model = adapted_mlp(seed=3)
        sas.merge(model)
        weight = model.out.base_layer.weight
        if write == "add_":
            weight[0, 0] += 1.0
        else:  # the same values the merged model holds would be harmless: load another model's
            model.out.base_layer.load_state_dict(nn.Linear(12, 5).state_dict())
        written = _frozen(model)
        with pytest.raises(ValueError, match="refusing to unmerge layer 2 .*weight before merge is not known"):
            sas.unmerge(model)
        assert _same_frozen(model, written) and all(layer.merged for layer in sas.adapted_layers(model))

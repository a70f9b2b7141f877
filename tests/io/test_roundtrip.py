"""save_adapter / load_adapter preserve everything: every config field (each away from its default, and all at
once with 17 tasks) comes back equal, and the loaded model gives the saved one's outputs bit for bit, for
every task, for SaS and SSL/SSB adapters."""
import dataclasses

import pytest
import torch

import sas
from sas.model import find_adapter
from sas.testing import ConfigCase, ProbeModel

D_IN, D_OUT = 12, 20
TARGETS = list(ProbeModel.LAYERS)

# Each SaSConfig field away from its default (one per case), and every one of them at once with 17 tasks:
# more than 10, so task embeddings keyed "10".."16" sort between "1" and "2" by name.
SAS_CONFIGS = [sas.SaSConfig(targets=TARGETS, **fields) for fields in (
    dict(rank=5), dict(embed_dim=3), dict(hyper_hidden=7), dict(hyper_activation="relu"),
    dict(hyper_activation="gelu"), dict(scale=-0.75), dict(sharing="shape"), dict(sharing="layer"),
    dict(share_down_by_input_dim=True), dict(layer_op="fold"), dict(saved_input="full"), dict(saved_input="int8"),
    dict(saved_input="fp8"),
    dict(train_down=False), dict(num_tasks=17), dict(base_model_name="ProbeModel"),
)] + [
    sas.SaSConfig(targets=["first", "second"], trainable_modules=["third"]),
    sas.SaSConfig(targets=r"(first|third)"),
    sas.SaSConfig(rank=3, targets=r"(first|second|third)", embed_dim=5, hyper_hidden=6, hyper_activation="gelu",
                  scale=0.3, sharing="shape", share_down_by_input_dim=True, layer_op="fold", saved_input="fp8",
                  train_down=False, num_tasks=17, base_model_name="ProbeModel"),
]
SCALING_CONFIGS = [
    sas.ScalingConfig(kind="ssl", targets=TARGETS), sas.ScalingConfig(kind="ssb", targets=TARGETS),
    sas.ScalingConfig(kind="ssb", targets=r"(first|second)", trainable_modules=["third"],
                      base_model_name="ProbeModel"),
]


def non_default(config):
    """The fields of ``config`` that differ from the defaults of its class (the case's id)."""
    default = type(config)(**({"kind": config.kind} if isinstance(config, sas.ScalingConfig) else {}))
    return "-".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
                    if getattr(config, f.name) != getattr(default, f.name) and f.name != "targets") or "defaults"


def outputs_for_every_task(model, x):
    shared = find_adapter(model)
    tasks = range(getattr(shared, "num_tasks", 1))
    with torch.no_grad():
        if len(tasks) == 1:
            return [model(x)]
        return [model(x, torch.full((x.shape[0],), task)) for task in tasks]


def assert_round_trip_preserves_everything(config, tmp_path):
    case = ConfigCase("round trip", config, D_IN, D_OUT, (6,), torch.float32)
    model = case.make_model(seed=3)
    sas.save_adapter(model, tmp_path)
    torch.manual_seed(3)  # the base model make_model built
    loaded = sas.load_adapter(ProbeModel(D_IN, D_OUT), tmp_path)
    assert find_adapter(loaded).config == find_adapter(model).config
    x = case.make_inputs(seed=4)[0]
    expected, got = outputs_for_every_task(model, x), outputs_for_every_task(loaded, x)
    for task, (want, have) in enumerate(zip(expected, got)):
        torch.testing.assert_close(have, want, rtol=0, atol=0, msg=f"task {task}")
    if len(expected) > 1:  # the tasks really differ, so a task loaded into another's place shows
        assert not torch.equal(expected[0], expected[-1])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name for name, p in loaded.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("config", SAS_CONFIGS, ids=non_default)
def test_sas_round_trip_preserves_every_field(config, tmp_path):
    assert_round_trip_preserves_everything(config, tmp_path)


@pytest.mark.parametrize("config", SCALING_CONFIGS, ids=non_default)
def test_scaling_round_trip_preserves_every_field(config, tmp_path):
    assert_round_trip_preserves_everything(config, tmp_path)

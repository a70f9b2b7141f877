"""Adapter kinds behind hooks (``sas.model.AdapterKind``): inject, merge, unload and the parameter summary find
each adapter's kind from its config, owner or layer and call its hooks."""
import pytest
import torch
from torch import nn

import sas
from sas import model as sas_model


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


@pytest.mark.parametrize("config, kind", [(sas.SaSConfig(targets=["0", "2"], rank=2), sas_model.SAS),
                                          (sas.ScalingConfig(kind="ssb", targets=["0", "2"]), sas_model.SCALING)])
def test_each_object_of_an_adapter_names_its_kind(config, kind):
    model = sas.inject(_mlp(), config)
    assert sas_model.kind_of(config, "config_class") is kind
    assert sas_model.kind_of(sas_model.find_adapter(model), "owner_class") is kind
    assert {sas_model.kind_of(m, "layer_class") for m in (model[0], model[2])} == {kind}
    assert sas_model.kind_of(model[1], "layer_class") is None
    assert set(kind.modules) >= {kind.owner_class, kind.layer_class}
    assert set(sas_model.ADAPTER_MODULES) == {m for k in sas_model.ADAPTER_KINDS for m in k.modules}


def test_inject_refuses_a_config_of_no_kind_naming_every_kind():
    with pytest.raises(TypeError, match="inject takes a SaSConfig or a ScalingConfig, got dict"):
        sas.inject(_mlp(), {"rank": 2})


def test_refusals_name_the_layer_through_its_kind():
    model = sas.inject(_mlp(), sas.ScalingConfig(kind="ssl", targets=["0", "2"]))
    with torch.no_grad():
        model.sas_shared.input_scale[1].fill_(float("nan"))
    with pytest.raises(ValueError, match=r"layer 1 \(2\): the scales contain NaN"):
        sas.merge(model)
    with pytest.raises(ValueError, match="a ssl adapter has no tasks; call merge_and_unload with task=None"):
        sas.merge_and_unload(model, task=0)
    model = sas.inject(_mlp(), sas.SaSConfig(targets=["0", "2"], rank=2, sharing="layer"))
    with torch.no_grad():
        model.sas_shared.up["2"].fill_(float("inf"))
    with pytest.raises(ValueError, match=r"layer 1 \(2/2\): the SaS update contains NaN or Inf"):
        sas.merge(model)

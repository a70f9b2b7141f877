"""Issue 17, inject on a model that already holds SaS modules: refused with a ValueError that says what
to do instead, and the model left exactly as it was (same modules, same state, same trainable flags)."""
import pytest
import torch
from torch import nn

import sas
import sas.testing
from sas import SaSConfig

from small_models import Mlp


def _adapted_mlp():
    return sas.testing.randomize_adapter(sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"])))


def _with_adapted_submodule():
    """A base model whose first block is an adapted Mlp (its sas_shared lives inside that block)."""
    return nn.Sequential(_adapted_mlp(), nn.Tanh(), nn.Linear(5, 4))


def _with_standalone_layer():
    torch.manual_seed(0)
    return nn.Sequential(sas.SaSLinear.from_linear(nn.Linear(6, 6), rank=2), nn.Linear(6, 3))


def _snapshot(model):
    modules = [(name, type(module), id(module)) for name, module in model.named_modules(remove_duplicate=False)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return modules, state, flags


def _unchanged(model, snapshot):
    modules, state, flags = _snapshot(model)
    return (modules == snapshot[0] and flags == snapshot[2] and state.keys() == snapshot[1].keys()
            and all(torch.equal(state[k], snapshot[1][k]) for k in state))


@pytest.mark.parametrize("make, inputs, found", [
    (_with_adapted_submodule, (3, 12), r"SaSLinear at '0\.enc\.0'"),
    (_adapted_mlp, (3, 12), r"SaSLinear at 'enc\.0'"),
    (_with_standalone_layer, (3, 6), r"SaSLinear at '0'.*HyperNetwork at '0\.shared\.hyper'"),
], ids=["adapted submodule", "adapted model", "standalone SaSLinear"])
@pytest.mark.parametrize("targets", [".*", ["base_layer", "hidden", "output"]], ids=["regex all", "internal names"])
def test_inject_refuses_a_model_holding_sas_modules_and_leaves_it_untouched(make, inputs, found, targets):
    model = make()
    x = torch.randn(*inputs)
    expected = model(x)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=rf"model already has SaS injected \({found}.*\); inject adapts a base model "
                                         rf"once and cannot add layers .*: inject into the base model"):
        sas.inject(model, SaSConfig(rank=2, targets=targets))
    assert _unchanged(model, snapshot)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_inject_refuses_the_adapters_own_modules():
    model = _adapted_mlp()
    snapshot = _snapshot(model)
    for part in (model.sas_shared, model.sas_shared.hyper):
        with pytest.raises(ValueError, match=r"already has SaS injected \(\w+ at '\(the model itself\)'"):
            sas.inject(part, SaSConfig(rank=2, targets=".*"))
    assert _unchanged(model, snapshot)

"""sas.inject: a model that already holds SaS modules is refused with a ValueError that says what to do
instead, and left exactly as it was (same modules, same state, same trainable flags); a Linear reachable under
two names is adapted under both; a Linear whose parent reads its weight directly is refused; every targets
entry must match."""
import pytest
import torch
from torch import nn

import sas
import sas.testing
from sas import SaSConfig

from small_models import Mlp, randomise_shared, untouched


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


# -- injection -------------------------------------------------------------------------------------

class Aliased(nn.Module):
    """One Linear instance reachable as ``first`` and ``again`` (applied twice)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8)
        self.again = self.first
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.again(torch.tanh(self.first(x))))


@pytest.mark.parametrize("targets", [["first"], ["again"], r"(first|again)", ["first", "again"]])
def test_linear_reachable_under_two_names_is_adapted_under_both(targets, tmp_path):
    model = sas.inject(Aliased(), SaSConfig(rank=2, targets=targets))
    assert isinstance(model.first, sas.SaSLinear) and model.again is model.first
    assert len(sas.adapted_layers(model)) == 1 and model.sas_shared.embeddings.shape[0] == 1
    randomise_shared(model)
    x = torch.randn(5, 8)
    layer = model.first
    delta = layer.delta_weight()
    adapted = nn.Linear(8, 8)
    with torch.no_grad():
        adapted.weight.copy_(layer.base_layer.weight + delta)
        adapted.bias.copy_(layer.base_layer.bias)
    torch.testing.assert_close(model(x), model.out(adapted(torch.tanh(adapted(x)))), rtol=1e-5, atol=1e-6)
    sas.save_adapter(model, tmp_path)
    loaded = sas.load_adapter(Aliased(), tmp_path)
    assert loaded.again is loaded.first
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ffn = nn.Linear(8, 8)

    def forward(self, x):
        return self.ffn(self.attn(x, x, x)[0])


@pytest.mark.parametrize("make, targets, name", [
    (Attention, ["out_proj"], "attn.out_proj"),
    (Attention, r".*", "attn.out_proj"),
    (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
                                   enable_nested_tensor=False), ["linear1"], "layers.0.linear1"),
])
def test_linear_whose_parent_reads_its_weight_is_refused_at_inject(make, targets, name):
    model = make()
    with pytest.raises(ValueError, match=rf"cannot adapt '{name}': its parent .* reads .*weight itself"):
        sas.inject(model, SaSConfig(rank=2, targets=targets))
    assert untouched(model)


def test_attention_model_still_adapts_its_other_layers():
    model = Attention()
    sas.inject(model, SaSConfig(rank=2, targets=["ffn"]))
    assert model(torch.randn(2, 3, 8)).shape == (2, 3, 8)


@pytest.mark.parametrize("targets", [["enc.0", "decoder"], ["decoder", "enc.0"], ["out", "enc.3"]])
def test_every_targets_entry_must_match(targets):
    model = Mlp()
    bad = next(t for t in targets if t in ("decoder", "enc.3"))
    refusal = rf"targets entry '{bad}' matches no nn.Linear .*its Linear layers are: enc\.0, enc\.2, out"
    with pytest.raises(ValueError, match=refusal):
        sas.inject(model, SaSConfig(targets=targets))
    assert untouched(model)

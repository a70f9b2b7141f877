"""Injection, sharing groups, gradients, parameter budgets, merge/unmerge."""
import pytest
import timm
import torch
from torch import nn

import sas
from sas import SaSConfig


def _test_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False).eval()


def _images(model, batch=2, seed=1):
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(seed))


def _randomise_adapter(model, seed=2):
    """B starts at zero; give every adapter tensor random values so tests exercise the update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.sas_shared.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(37, 101), nn.Tanh(), nn.Linear(101, 37))
        self.out = nn.Linear(37, 3)

    def forward(self, x):
        return self.out(self.enc(x))


def test_injected_model_equals_base_model_at_init():
    model = _test_vit()
    x = _images(model)
    expected = model(x)
    sas.inject(model, SaSConfig(rank=4))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_targets_replace_every_vit_linear_role_and_keep_base_layer():
    model = _test_vit()
    original = model.blocks[0].attn.qkv
    sas.inject(model, SaSConfig(rank=4))
    layers = sas.adapted_layers(model)
    assert len(layers) == 4 * len(model.blocks)
    assert model.blocks[0].attn.qkv.base_layer is original
    assert sorted(model.sas_shared.up.keys()) == ["attn_proj", "attn_qkv", "mlp_fc1", "mlp_fc2"]
    # Shared tensors are the same objects in every layer of a group and appear once in the state_dict.
    assert model.blocks[0].attn.qkv.A is model.blocks[1].attn.qkv.A
    assert sum(k.startswith("sas_shared.up.attn_qkv") for k in model.state_dict()) == 1
    assert not any(".shared." in k for k in model.state_dict())


def test_regex_targets_full_match_and_group_by_role():
    model = _test_vit()
    sas.inject(model, SaSConfig(rank=2, targets=r"blocks\.\d+\.mlp\.fc[12]"))
    names = [n for n, m in model.named_modules() if isinstance(m, sas.SaSLinear)]
    assert names and all(".mlp.fc" in n for n in names)
    assert sorted(model.sas_shared.up.keys()) == ["blocks_N_mlp_fc1", "blocks_N_mlp_fc2"]


def test_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        sas.inject(_test_vit(), SaSConfig(targets=r"attn\.qkv"))


def test_unmatched_targets_list_the_models_linear_names():
    with pytest.raises(ValueError, match=r"its Linear layers are: enc\.0, enc\.2, out"):
        sas.inject(TwoLayer(), SaSConfig(targets=["decoder"]))


def test_sequential_model_keeps_working():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 101), nn.Tanh(), nn.Linear(101, 3))
    x = torch.randn(4, 37)
    expected = model(x)
    sas.inject(model, SaSConfig(rank=2, targets=["0", "2"]))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    _randomise_adapter(model)
    assert not torch.allclose(model(x), expected)


def test_injecting_twice_is_refused():
    model = sas.inject(_test_vit(), SaSConfig(rank=2))
    with pytest.raises(ValueError, match="already has SaS injected"):
        sas.inject(model, SaSConfig(rank=2))


@pytest.mark.parametrize("sharing, expected_up, expected_down", [
    ("role", 2, 2), ("shape", 2, 2), ("layer", 2, 2)])
def test_sharing_modes_on_plain_module(sharing, expected_up, expected_down):
    model = sas.inject(TwoLayer(), SaSConfig(rank=3, targets=["enc.0", "enc.2"], sharing=sharing))
    assert len(model.sas_shared.up) == expected_up and len(model.sas_shared.down) == expected_down


def test_shape_sharing_joins_layers_of_equal_shape():
    model = _test_vit()
    sas.inject(model, SaSConfig(rank=2, sharing="shape"))
    # test_vit: qkv 64->192, proj 64->64, fc1 64->192, fc2 192->64: qkv and fc1 share.
    assert sorted(model.sas_shared.up.keys()) == ["192x64", "64x192", "64x64"]


def test_down_projection_shared_by_input_dim():
    model = _test_vit()
    sas.inject(model, SaSConfig(rank=2, share_down_by_input_dim=True))
    assert sorted(model.sas_shared.down.keys()) == ["in192", "in64"]
    assert model.blocks[0].attn.qkv.A is model.blocks[0].mlp.fc1.A


def test_only_adapter_and_chosen_modules_get_gradients():
    model = _test_vit()
    sas.inject(model, SaSConfig(rank=4, trainable_modules=["head"]))
    _randomise_adapter(model)
    model(_images(model)).square().mean().backward()
    for name, p in model.named_parameters():
        trainable = name.startswith("sas_shared.") or name.startswith("head.")
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
        if trainable:
            assert torch.count_nonzero(p.grad) > 0, name


def test_unknown_trainable_module_rejected():
    model = _test_vit()
    with pytest.raises(ValueError, match="trainable_modules entry 'classifier' matches no module"):
        sas.inject(model, SaSConfig(trainable_modules=["classifier"]))
    # Refused before any change (load_adapter promises an untouched model on error).
    assert not sas.adapted_layers(model) and not hasattr(model, "sas_shared")
    assert all(p.requires_grad for p in model.parameters())


def test_gradcheck_through_layer_and_hypernetwork():
    torch.manual_seed(0)
    model = TwoLayer().double()
    sas.inject(model, SaSConfig(rank=3, targets=["enc.0", "enc.2"], embed_dim=4, hyper_hidden=5))
    _randomise_adapter(model)
    named = dict(model.sas_shared.named_parameters())
    x = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)

    def run(x, *values):
        replaced = {f"sas_shared.{name}": value for name, value in zip(named, values)}
        return torch.func.functional_call(model, replaced, (x,))

    assert torch.autograd.gradcheck(run, (x, *named.values()))


def test_standalone_layer_owns_its_tensors():
    layer = sas.SaSLinear.from_linear(nn.Linear(37, 101), rank=3)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "shared.down.layer", "shared.up.layer", "shared.embeddings", "shared.hyper.hidden.weight",
        "shared.hyper.hidden.bias", "shared.hyper.output.weight", "shared.hyper.output.bias"}
    x = torch.randn(2, 5, 37)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_hypernetwork_starts_near_one():
    model = sas.inject(_test_vit(), SaSConfig(rank=8))
    h = model.sas_shared.modulations()
    assert h.shape == (4 * len(model.blocks), 8)
    assert (h - 1).abs().max() < 0.1


def _base_size_without_head(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))


def test_vit_b16_parameter_budgets():
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    base = _base_size_without_head(model)
    assert 85.7e6 < base < 85.9e6  # ViT-B/16 backbone: 85.8M, its published parameter count
    sas.inject(model, SaSConfig(rank=8))
    trainable, total = sas.count_parameters(model)
    # A: 8 * (768 * 3 + 3072), B: 8 * (2304 + 768 + 3072 + 768), 48 embeddings of 8, H: 8->32->8.
    assert trainable == 8 * 5376 + 8 * 6912 + 48 * 8 + (8 * 32 + 32 + 32 * 8 + 8)
    assert 0.10 < 100 * trainable / base < 0.13
    budget = sas.inject(timm.create_model("vit_base_patch16_224", pretrained=False), SaSConfig.vit_budget())
    trainable, _ = sas.count_parameters(budget)
    assert 100 * trainable / base < 0.05


def test_print_trainable_parameters(capsys):
    model = sas.inject(_test_vit(), SaSConfig(rank=4))
    sas.print_trainable_parameters(model)
    out = capsys.readouterr().out
    trainable, total = sas.count_parameters(model)
    assert f"trainable: {trainable:,} || total: {total:,}" in out
    assert "sas_shared.up.attn_qkv" in out


def test_merge_unmerge_round_trip():
    model = sas.inject(_test_vit(), SaSConfig(rank=4, scale=0.5))
    _randomise_adapter(model)
    x = _images(model)
    original = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    expected = model(x)
    sas.merge(model)
    assert all(layer.merged for layer in sas.adapted_layers(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    sas.unmerge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if name in original:
            torch.testing.assert_close(p, original[name], rtol=0, atol=1e-6)


def test_merge_twice_warns_and_does_nothing():
    model = sas.inject(_test_vit(), SaSConfig(rank=4))
    _randomise_adapter(model)
    sas.merge(model)
    weight = model.blocks[0].attn.qkv.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        sas.merge(model)
    torch.testing.assert_close(model.blocks[0].attn.qkv.base_layer.weight, weight, rtol=0, atol=0)


def test_non_finite_merge_refused_and_model_untouched():
    model = sas.inject(_test_vit(), SaSConfig(rank=4))
    _randomise_adapter(model)
    with torch.no_grad():
        model.sas_shared.up["mlp_fc2"][0, 0] = float("nan")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="refusing to merge: .* contains NaN or Inf"):
        sas.merge(model)
    assert not any(layer.merged for layer in sas.adapted_layers(model))
    frozen = [n for n in before if "base_layer" in n]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)


def test_merge_needs_an_adapted_model():
    with pytest.raises(ValueError, match="call sas.inject first"):
        sas.merge(TwoLayer())


def test_bf16_model_runs_adapter_in_bf16():
    model = sas.inject(_test_vit(), SaSConfig(rank=4)).to(torch.bfloat16)
    _randomise_adapter(model)
    out = model(_images(model).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_hypernetwork_runs_once_per_model_forward_and_matches_per_layer_path(monkeypatch, backend):
    if backend not in sas.available_backends("cpu"):
        pytest.skip(f"{backend} backend not built")
    sas.set_backend(backend)
    try:
        model = sas.inject(_test_vit(), SaSConfig(rank=4))
        _randomise_adapter(model)
        shared = model.sas_shared
        tables = []
        compute = type(shared)._modulation_table
        monkeypatch.setattr(type(shared), "_modulation_table",
                            lambda self, *args: tables.append(1) or compute(self, *args))
        x = _images(model)
        model(x).sum().backward()
        assert len(tables) == 1  # once for all 16 layers
        model(x)
        assert len(tables) == 2  # a new forward computes h afresh
        for layer in sas.adapted_layers(model):
            _, _, cached = shared.layer_tensors(layer.layer_index, layer.down_key, layer.up_key, torch.float32)
            # H over all embeddings at once is a GEMM, per layer a GEMV: same math, fp32 rounding apart.
            torch.testing.assert_close(cached, layer.modulation(), rtol=1e-5, atol=1e-6)
    finally:
        sas.set_backend(None)


def test_cached_modulations_follow_optimizer_steps():
    model = sas.inject(_test_vit(), SaSConfig(rank=4))
    _randomise_adapter(model)
    shared = model.sas_shared
    layer = sas.adapted_layers(model)[0]
    for optimizer in (torch.optim.AdamW(shared.parameters(), lr=0.1),
                      torch.optim.AdamW(shared.parameters(), lr=0.1, foreach=False),
                      torch.optim.SGD(shared.parameters(), lr=0.1, momentum=0.9)):
        model(_images(model)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        # The same layer asking again within one forward would refresh anyway: ask for another layer,
        # which this entry has not served, so only the version counters can tell h changed.
        other = sas.adapted_layers(model)[1]
        _, _, h = shared.layer_tensors(other.layer_index, other.down_key, other.up_key, torch.float32)
        torch.testing.assert_close(h, other.modulation(), rtol=1e-5, atol=1e-6)
        assert layer.layer_index != other.layer_index


def test_fused_layer_op_matches_the_adapter_path():
    adapter = sas.inject(_test_vit(), SaSConfig(rank=4, scale=0.5))
    _randomise_adapter(adapter)
    fused = sas.inject(_test_vit(), SaSConfig(rank=4, scale=0.5, layer_op="fused"))
    fused.load_state_dict(adapter.state_dict())
    assert all(layer.layer_op == "fold" for layer in sas.adapted_layers(fused))
    x = _images(adapter)
    expected, got = adapter(x), fused(x)
    # fp32 both ways; the fused op folds s B diag(h) A into the weight first, so the products are
    # grouped differently: agreement to fp32 rounding accumulated through 12 blocks, not bitwise.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    expected.square().mean().backward()
    got.square().mean().backward()
    grads = {n: p.grad for n, p in adapter.named_parameters() if p.requires_grad}
    for name, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        sas.merge(fused)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)

"""The SSL and SSB scaling adapters (sas/scaling.py) through their whole life cycle: config,
inject, forward and every gradient against the float64 oracle on every backend (fp32/fp16/bf16 and
autocast, by the tolerance rule of docs/design.md), merge/unmerge, save/load, and the usual input checks."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas
import sas.testing
from sas import scaling
from sas.testing import check_tensor, compare_model, forced_backend, randomize_adapter

from small_models import MLP_TARGETS, Mlp

KINDS = ["ssl", "ssb"]


def scaled_mlp(kind, dtype=torch.float32, seed=0, **config):
    """:class:`Mlp` with every Linear scaled and the scales drawn away from 1."""
    model = sas.inject(Mlp(seed).to(dtype), sas.ScalingConfig(kind=kind, targets=MLP_TARGETS, **config))
    return randomize_adapter(model, seed=seed)


def by_hand(model, x):
    """The Mlp's output from the method's formulas, the scales read from the owner by layer name."""
    shared = model.sas_shared
    out = x
    for index, (name, activation) in enumerate([("enc.0", torch.tanh), ("enc.2", None), ("out", None)]):
        linear = model.get_submodule(name).base_layer
        a = shared.input_scale[index]
        y = (a * out) @ linear.weight.T
        if shared.kind == "ssb":
            y = shared.output_scale[index] * y
        out = y + linear.bias
        out = activation(out) if activation else out
    return out


# -- config ----------------------------------------------------------------------------------------

def test_every_config_field_has_help_and_json_round_trips(tmp_path):
    config = sas.ScalingConfig(kind="ssb", targets=r".*\.fc\d", trainable_modules=("head",), base_model_name="vit")
    assert all(f.metadata.get("help") for f in dataclasses.fields(sas.ScalingConfig))
    assert sas.ScalingConfig.from_json(config.to_json()) == config
    config.to_json(tmp_path / "c.json")
    assert sas.ScalingConfig.from_json(tmp_path / "c.json") == config
    assert config.trainable_modules == ["head"]


@pytest.mark.parametrize("fields, message", [
    (dict(), r"kind must be one of \('ssl', 'ssb'\), got None"),
    (dict(kind="ia3"), "kind must be one of"),
    (dict(kind=["ssl"]), "kind must be one of"),
    (dict(kind="ssl", targets=""), "targets must not be an empty string"),
    (dict(kind="ssl", targets=["a", ""]), "targets must be a regex str or a non-empty list"),
    (dict(kind="ssl", targets="(unclosed"), "targets is not a valid regex"),
    (dict(kind="ssl", trainable_modules="head"), "trainable_modules must be a list of non-empty str"),
    (dict(kind="ssl", base_model_name=3), "base_model_name must be a str or None"),
])
def test_bad_config_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        sas.ScalingConfig(**fields)


def test_from_dict_refuses_unknown_fields_and_non_objects():
    with pytest.raises(ValueError, match=r"unknown ScalingConfig fields \['rank'\]"):
        sas.ScalingConfig.from_dict({"kind": "ssl", "rank": 4})
    with pytest.raises(ValueError, match="a ScalingConfig must be given as a JSON object"):
        sas.ScalingConfig.from_dict([1])


# -- inject ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_inject_starts_at_the_base_model_and_trains_only_the_scales(kind):
    base = Mlp()
    model = sas.inject(copy.deepcopy(base), sas.ScalingConfig(kind=kind, targets=MLP_TARGETS,
                                                              trainable_modules=["out"]))
    x = torch.randn(4, 12)
    assert torch.equal(model(x), base(x))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    widths = [(12, 24), (24, 12), (12, 5)]  # (d_in, d_out) of enc.0, enc.2, out
    expected = {f"sas_shared.input_scale.{i}": d_in for i, (d_in, _) in enumerate(widths)}
    if kind == "ssb":
        expected.update({f"sas_shared.output_scale.{i}": d_out for i, (_, d_out) in enumerate(widths)})
    expected.update({"out.base_layer.weight": 60, "out.base_layer.bias": 5})  # trainable_modules
    assert trainable == expected


def test_print_trainable_parameters_names_the_kind_and_its_count(capsys):
    sas.print_trainable_parameters(scaled_mlp("ssb"))
    last = capsys.readouterr().out.splitlines()[-1]
    assert "SSB extra: 89 " in last  # (12 + 24) + (24 + 12) + (12 + 5)


def test_a_model_is_adapted_once_whatever_the_adapter():
    with pytest.raises(ValueError, match="already has SaS injected .*ScalingLinear"):
        sas.inject(scaled_mlp("ssl"), sas.SaSConfig(targets=r".*\d"))
    with pytest.raises(ValueError, match="already has SaS injected .*SaSLinear"):
        sas.inject(sas.inject(Mlp(), sas.SaSConfig(targets=MLP_TARGETS)), sas.ScalingConfig(kind="ssl"))
    with pytest.raises(TypeError, match="inject takes a SaSConfig or a ScalingConfig, got dict"):
        sas.inject(Mlp(), {"kind": "ssl"})


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_the_methods_formula(kind):
    model = scaled_mlp(kind, torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), by_hand(model, x), rtol=1e-12, atol=1e-12)


# -- against the float64 oracle ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_backend_matches_float64_output_and_every_gradient(kind, dtype):
    model = scaled_mlp(kind, dtype, trainable_modules=["enc.2"])  # a trainable frozen weight, too
    x = torch.randn(7, 12).to(dtype)
    report = compare_model(model, x)
    assert report.passed, report.table()
    checked = {c.tensor for c in report.checks}
    assert {"grad input 0", "grad sas_shared.input_scale.0", "layer out", "grad enc.2.base_layer.weight"} <= checked
    assert ("grad sas_shared.output_scale.2" in checked) == (kind == "ssb")
    assert {c.ran for c in report.checks} == {"reference", "aten (scaling layers)"}


def test_the_check_catches_a_fast_path_that_drops_the_output_scale(monkeypatch):
    def without_output_scale(x, weight, bias, input_scale, output_scale=None):
        return F.linear(x * input_scale, weight, bias)

    monkeypatch.setattr(scaling, "scaled_linear", without_output_scale)
    report = compare_model(scaled_mlp("ssb"), torch.randn(5, 12))
    assert not report.passed and any(c.status == "FAIL" for c in report.checks)


def test_randomize_adapter_moves_every_scale_away_from_one():
    model = scaled_mlp("ssb", seed=3)
    scales = torch.cat([p.detach() for p in model.sas_shared.parameters()])
    assert scales.numel() == 89 and (scales != 1).all() and 0.3 < scales.std() < 0.7


def test_a_scale_gradients_rounding_unit_is_taken_at_the_size_of_the_terms_it_sums():
    model = randomize_adapter(sas.inject(nn.Sequential(nn.Linear(5, 4)), sas.ScalingConfig(kind="ssb", targets=["0"])))
    x, grad_output = torch.randn(3, 5), torch.randn(3, 4, dtype=torch.float64)
    report = compare_model(model, x, backends=["reference"], grad_output=grad_output)
    a, b = (s.detach().double() for s in model[0].scales())
    weight = model[0].base_layer.weight.detach().double()
    # |da_j| <= sum_{n,i} |x_nj g_ni b_i W_ij|, |db_i| <= sum_{n,j} |g_ni a_j x_nj W_ij|
    terms = {"input_scale": torch.einsum("nj,ni,i,ij->j", x.double().abs(), grad_output.abs(), b.abs(), weight.abs()),
             "output_scale": torch.einsum("ni,j,nj,ij->i", grad_output.abs(), a.abs(), x.double().abs(), weight.abs())}
    eps = torch.finfo(torch.float32).eps
    for name, size in terms.items():
        check = next(c for c in report.checks if c.tensor == f"grad sas_shared.{name}.0")
        assert size.max().item() > 1.0  # the terms (never below |grad|), not the floor of 1, set it
        assert check.bound == pytest.approx(2 * check.torch_error + eps * size.max().item(), rel=1e-12)


def test_the_fast_path_runs_and_is_checked_where_only_the_reference_backend_is_built(monkeypatch):
    model = scaled_mlp("ssl")
    monkeypatch.setattr(sas.backends, "available_backends", lambda device: ["reference"])
    report = compare_model(model, torch.randn(3, 12))
    assert report.passed and {(c.backend, c.ran) for c in report.checks} == \
           {("reference", "reference"), ("auto", "aten (scaling layers)")}
    model(torch.randn(3, 12))
    assert model.out._route is scaling.scaled_linear  # training never runs the oracle unless it is forced
    with forced_backend("reference"):
        model(torch.randn(3, 12))
        assert model.out._route is scaling.scaled_linear_reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_matches_float64_within_the_tolerance_rule(kind, dtype):
    model = scaled_mlp(kind)
    x = torch.randn(6, 12)
    grad_output = 32 * torch.randn(6, 5, dtype=torch.float64)  # loss-scaled, as in tests/api/test_autocast.py

    def run(net, inputs, backend, autocast):
        params = [p for p in net.parameters() if p.requires_grad]
        with forced_backend(backend), torch.autocast("cpu", dtype=dtype, enabled=autocast):
            output = net(inputs)
        grads = torch.autograd.grad(output, params, grad_output.to(output.dtype))
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        return {"output": output.detach(), **dict(zip(names, grads))}

    exact = run(copy.deepcopy(model).double(), x.double(), "reference", False)
    pytorch = run(model, x, "reference", True)
    got = run(model, x, "cpp", True)
    assert got["output"].dtype == dtype  # as an nn.Linear's under autocast
    for name, value in exact.items():
        check = check_tensor(kind, "cpp", ("aten", False), name, got[name], value, pytorch[name], compute_dtype=dtype)
        assert check.status == "pass", (name, check)


# -- inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("x, error, message", [
    ("not a tensor", TypeError, "takes x as a torch.Tensor, got str"),
    (torch.randn(4, 11), ValueError, r"x of shape \(\.\.\., in_features=12\), got \(4, 11\)"),
    (torch.randn(()), ValueError, r"in_features=12\), got \(\)"),
    (torch.ones(4, 12, dtype=torch.int64), TypeError, "floating-point x, got torch.int64"),
    (torch.randn(4, 12, dtype=torch.float64), TypeError, "x is torch.float64 but the frozen weight is torch.float32"),
    (torch.randn(4, 12, device="meta"), ValueError, "device mismatch: x is on meta"),
])
def test_bad_inputs_are_refused_by_name(x, error, message):
    with pytest.raises(error, match=message):
        scaled_mlp("ssb")(x)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_strided_inference_mode_and_in_place_outputs(kind):
    model = scaled_mlp(kind)
    assert model(torch.randn(0, 12)).shape == (0, 5)
    wide = torch.randn(4, 20)[:, 3:15]  # a column slice: rows strided
    torch.testing.assert_close(model(wide), model(wide.contiguous()), rtol=0, atol=0)
    with torch.inference_mode():
        expected = model(wide.contiguous())
    torch.testing.assert_close(expected, model(wide).detach(), rtol=0, atol=0)
    x = torch.randn(3, 12, requires_grad=True)
    y = model.enc[0](x)
    y.mul_(2).relu_()  # in place on the layer's output, then a backward through it
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_grad_through_substituted_scales_equals_autograd(kind):
    model = scaled_mlp(kind, torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(3, 12, dtype=torch.float64)

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-12)


# -- merge -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_merge_folds_the_scales_and_unmerge_restores_the_weights_bit_for_bit(kind):
    model = scaled_mlp(kind, torch.float64)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = model(x).detach()
    sas.merge(model)
    layer = model.enc[0]
    a, b = layer.scales()
    folded = frozen["enc.0.base_layer.weight"] * a.detach()
    if kind == "ssb":
        folded = b.detach()[:, None] * folded
    assert torch.equal(layer.base_layer.weight, folded)  # float64: the product is the reference's exactly
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert all(bool(m.sas_merged) for m in scaling.scaling_layers(model))
    with torch.no_grad():  # the adapter changes while merged: unmerge still restores the weights exactly
        a.mul_(3)
    sas.unmerge(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "base_layer" in n)


def test_merged_inference_runs_the_frozen_linear_alone():
    from bench.counting import count_device_ops

    model, base = scaled_mlp("ssb"), Mlp()
    x = torch.randn(4, 12)
    sas.merge(model)
    with torch.no_grad():
        merged, unadapted = count_device_ops(lambda: model(x)), count_device_ops(lambda: base(x))
    assert merged.names == unadapted.names


def test_merge_is_all_or_nothing():
    model = scaled_mlp("ssb", torch.float16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        model.sas_shared.input_scale[2].fill_(100.0)  # the last layer's fold overflows float16
        model.sas_shared.output_scale[2].fill_(60000.0)
    with pytest.raises(ValueError, match=r"refusing to merge: layer 2 \(out\): the merged weight overflows"):
        sas.merge(model)
    with torch.no_grad():
        model.sas_shared.output_scale[2].fill_(1.0)
        model.sas_shared.input_scale[1][0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1 \(enc.2\): the scales contain NaN or Inf"):
        sas.merge(model)
    assert not any(m.merged for m in scaling.scaling_layers(model))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "base_layer" in n)
    with pytest.raises(ValueError, match="a ssb adapter has no tasks"):
        sas.merge(model, task=0)


def test_tied_weights_are_refused():
    model = Mlp()
    model.add_module("tied", nn.Linear(24, 12))
    model.tied.weight = model.enc[2].weight
    sas.inject(model, sas.ScalingConfig(kind="ssl", targets=["enc.2"]))
    with pytest.raises(ValueError, match=r"refusing to merge: .*shares its memory with \['tied.weight'\]"):
        sas.merge(model)


def test_the_merged_flag_travels_in_the_state_dict_and_a_copy_unmerges_exactly():
    model = scaled_mlp("ssb")
    frozen = model.enc[0].base_layer.weight.detach().clone()
    sas.merge(model)
    fresh = sas.inject(Mlp(), sas.ScalingConfig(kind="ssb", targets=MLP_TARGETS))
    fresh.load_state_dict(model.state_dict())
    assert all(m.merged for m in scaling.scaling_layers(fresh))  # the scales are not applied twice
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="refusing to unmerge layer 0 .*weight before merge is not known"):
        sas.unmerge(fresh)
    clone = copy.deepcopy(model)
    sas.unmerge(clone)
    assert torch.equal(clone.enc[0].base_layer.weight, frozen)


# -- save and load ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_names_the_adapter_kind(kind, tmp_path):
    model = scaled_mlp(kind, trainable_modules=["out"])
    sas.save_adapter(model, tmp_path)
    description = json.loads((tmp_path / "adapter_config.json").read_text())
    assert description["adapter_kind"] == "scaling" and description["config"]["kind"] == kind
    loaded = sas.load_adapter(Mlp(), tmp_path)
    x = torch.randn(4, 12)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
           {n for n, p in model.named_parameters() if p.requires_grad}


def _rewrite(path, edit):
    """Rewrite the weights file at ``path`` with ``edit(tensors, description)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    description = json.loads(metadata["sas_adapter"])
    edit(tensors, description)
    metadata["sas_adapter"] = json.dumps(description)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("edit, message", [
    (lambda t, d: d.__setitem__("adapter_kind", "lora"), r"field 'adapter_kind' must be one of \('sas', 'scaling'\)"),
    (lambda t, d: d.pop("adapter_kind"), "unknown SaSConfig fields"),  # read as SaS: its config does not fit
    (lambda t, d: d["config"].__setitem__("kind", "ssl"), "unexpected tensor 'sas_shared.output_scale.0'"),
    (lambda t, d: t.__setitem__("sas_shared.input_scale.1", torch.ones(23)), r"has shape \(23,\) .* expects \(24,\)"),
    (lambda t, d: t["sas_shared.output_scale.2"].__setitem__(0, float("inf")), "holds NaN or Inf"),
])
def test_a_tampered_scaling_adapter_is_refused_and_the_model_left_alone(tmp_path, edit, message):
    sas.save_adapter(scaled_mlp("ssb"), tmp_path)
    _rewrite(tmp_path / "adapter_model.safetensors", edit)
    model = Mlp()
    with pytest.raises(ValueError, match=message):
        sas.load_adapter(model, tmp_path)
    assert not scaling.scaling_layers(model) and not hasattr(model, "sas_shared")

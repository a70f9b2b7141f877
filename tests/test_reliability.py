"""Issue 11 (reliability): merge/unmerge, injection, save/load of untrusted files, and sas.check usage.

Each test is a case that went wrong before: a silent change, a hang, a file the library wrote but
could not read, or an error found only after a long run.
"""
import errno
import itertools
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sas
import sas.io
import sas.model
import sas.testing
from sas import SaSConfig, check
from sas.io import CONFIG_NAME, WEIGHTS_NAME


def _randomise(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.sas_shared.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def _untouched(model):
    return not sas.adapted_layers(model) and not hasattr(model, "sas_shared")


class Mlp(nn.Module):
    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 12))
        self.out = nn.Linear(12, 5)
        self.to(dtype)

    def forward(self, x):
        return self.out(self.enc(x))


class TiedLM(nn.Module):
    """A language-model head tied to the input embedding (GPT-2 style)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.mix(self.embed(tokens)))


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
    _randomise(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"refusing to merge: .*shares its memory with .*{other}.*tied weights"):
        sas.merge(model)
    assert not any(layer.merged for layer in sas.adapted_layers(model))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_unmerge_refuses_non_finite_update_and_keeps_the_model_merged():
    model = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    _randomise(model)
    original = _frozen(model)
    sas.merge(model)
    merged = _frozen(model)
    with torch.no_grad():
        model.sas_shared.up["enc_2"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to unmerge layer 1 .*NaN or Inf"):
        sas.unmerge(model)
    # All-or-nothing: the finite layer 0 was not unmerged either, and no weight became non-finite.
    assert all(layer.merged for layer in sas.adapted_layers(model))
    assert all(torch.equal(p, merged[n]) for n, p in _frozen(model).items())
    with torch.no_grad():
        model.sas_shared.up["enc_2"][0, 0] = 0.0
    sas.unmerge(model)
    assert all(torch.equal(p, original[n]) for n, p in _frozen(model).items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_frozen_weights_bit_for_bit_after_training_while_merged(dtype):
    model = sas.inject(Mlp(dtype=dtype), SaSConfig(rank=3, targets=["enc.0", "enc.2", "out"]))
    _randomise(model)
    x = torch.randn(6, 12, dtype=dtype)
    original = _frozen(model)
    optimizer = torch.optim.SGD(model.sas_shared.parameters(), lr=0.5, momentum=0.9)
    model(x).square().mean().backward()
    optimizer.step()
    sas.merge(model)
    for _ in range(3):  # momentum keeps moving the adapter while it is folded in
        optimizer.step()
    sas.unmerge(model)
    assert all(torch.equal(p, original[n]) for n, p in _frozen(model).items())
    # Unmerged again, the model computes with the adapter as it is now.
    assert not any(layer.merged for layer in sas.adapted_layers(model))


def test_repeated_merge_unmerge_does_not_drift():
    model = sas.inject(Mlp(dtype=torch.bfloat16), SaSConfig(rank=3, targets=["enc.0", "enc.2"], scale=3.0))
    _randomise(model)
    original = _frozen(model)
    for _ in range(5):
        sas.merge(model)
        sas.unmerge(model)
    assert all(torch.equal(p, original[n]) for n, p in _frozen(model).items())


def test_merged_state_dict_into_unmerged_model_applies_the_update_once():
    source = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    _randomise(source)
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
    _randomise(source)
    x = torch.randn(4, 12)
    expected = source(x)
    target = sas.inject(Mlp(seed=1), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    _randomise(target, seed=5)
    sas.merge(target)
    target.load_state_dict(source.state_dict())
    assert not any(layer.merged for layer in sas.adapted_layers(target))
    torch.testing.assert_close(target(x), expected, rtol=0, atol=0)


def test_state_dict_without_the_merged_flag_still_loads_strictly():
    """A full state saved before the flag existed is an unmerged one; a partial one keeps the state."""
    source = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    _randomise(source)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("sas_merged")}
    target = sas.inject(Mlp(seed=1), SaSConfig(rank=3, targets=["enc.0", "enc.2"]))
    sas.merge(target)
    target.load_state_dict(state)
    assert not any(layer.merged for layer in sas.adapted_layers(target))
    sas.merge(target)
    target.load_state_dict({k: v for k, v in state.items() if k.startswith("sas_shared.")}, strict=False)
    assert all(layer.merged for layer in sas.adapted_layers(target))


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
    _randomise(model)
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
    assert _untouched(model)


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
    assert _untouched(model)


# -- save and load ---------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """An adapter saved once (the 'previous' one), plus the model, changed since then."""
    model = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"], trainable_modules=["out"]))
    _randomise(model)
    x = torch.randn(4, 12)
    directory = tmp_path / "adapter"
    sas.save_adapter(model, directory)
    files = {name: (directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    expected = model(x)
    _randomise(model, seed=9)
    model.sas_shared.config.rank = 99  # a different config would be written first by a non-atomic save
    return model, directory, files, x, expected


def _assert_previous_intact(directory, files, x, expected):
    assert {p.name for p in directory.iterdir()} == set(files)  # no temporary left behind
    assert all((directory / name).read_bytes() == data for name, data in files.items())
    loaded = sas.load_adapter(Mlp(), directory)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_save_that_runs_out_of_disk_leaves_the_previous_adapter(saved, monkeypatch):
    model, directory, files, x, expected = saved

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sas.io, "_write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        sas.save_adapter(model, directory)
    _assert_previous_intact(directory, files, x, expected)


def test_save_of_a_refused_tensor_leaves_the_previous_adapter(saved):
    model, directory, files, x, expected = saved
    model.out.weight = nn.Parameter(model.out.weight.detach().to_sparse(), requires_grad=True)
    with pytest.raises(RuntimeError, match="COO"):  # torch refuses to make a sparse tensor contiguous
        sas.save_adapter(model, directory)
    _assert_previous_intact(directory, files, x, expected)


def test_save_interrupted_between_the_two_renames_loads_as_the_new_adapter(saved, monkeypatch):
    model, directory, files, x, _ = saved
    model.sas_shared.config.rank = 3  # back to the adapter's real rank: this save must complete its commit
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stops after the weights were renamed into place
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        sas.save_adapter(model, directory)
    monkeypatch.undo()
    assert (directory / CONFIG_NAME).read_bytes() == files[CONFIG_NAME]  # the copy for readers is still the old one
    # The weights file carries its own description: its rename was the commit point.
    torch.testing.assert_close(sas.load_adapter(Mlp(), directory)(x), model(x), rtol=0, atol=0)


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.norm(self.proj(x)))


def test_trainable_module_buffers_round_trip(tmp_path):
    model = sas.inject(WithNorm(), SaSConfig(rank=2, targets=["proj"], trainable_modules=["norm"]))
    _randomise(model)
    for _ in range(3):  # updates running statistics and the int64 num_batches_tracked
        model(torch.randn(8, 6))
    sas.save_adapter(model, tmp_path)
    loaded = sas.load_adapter(WithNorm(), tmp_path)
    assert loaded.norm.num_batches_tracked.item() == 3
    for key in ("running_mean", "running_var", "num_batches_tracked", "weight"):
        assert torch.equal(getattr(loaded.norm, key), getattr(model.norm, key)), key
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_trainable_module_holding_an_adapted_layer_round_trips(tmp_path):
    model = sas.inject(Mlp(), SaSConfig(rank=2, targets=["enc.0", "out"], trainable_modules=["enc"]))
    _randomise(model)
    with torch.no_grad():
        model.enc[0].base_layer.weight.add_(1.0)
    sas.save_adapter(model, tmp_path)
    loaded = sas.load_adapter(Mlp(), tmp_path)
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_tied_trainable_modules_save_and_load(tmp_path):
    model = sas.inject(TiedLM(), SaSConfig(rank=2, targets=["mix"], trainable_modules=["embed", "head"]))
    _randomise(model)
    sas.save_adapter(model, tmp_path)
    loaded = sas.load_adapter(TiedLM(), tmp_path)
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def _write_description(directory, text):
    """Put ``text`` where the loader reads the adapter's description: the weights file's metadata (and
    its copy, the config file)."""
    tensors = load_file(str(directory / WEIGHTS_NAME))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={sas.io.DESCRIPTION_KEY: text})
    (directory / CONFIG_NAME).write_text(text)


def _write_meta(directory, change):
    meta = json.loads((directory / CONFIG_NAME).read_text())
    change(meta)
    _write_description(directory, json.dumps(meta))


class LongNames(nn.Module):
    """Module names long enough (30+ characters) for a backtracking regex to run for ages."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projection_into_the_hidden_space = nn.Linear(6, 6)
        self.projection_onto_the_class_scores = nn.Linear(6, 2)

    def forward(self, x):
        return self.projection_onto_the_class_scores(self.projection_into_the_hidden_space(x))


def test_catastrophic_regex_in_a_config_file_fails_in_bounded_time(tmp_path, monkeypatch):
    model = sas.inject(LongNames(), SaSConfig(rank=2, targets=r"projection_\w+"))
    sas.save_adapter(model, tmp_path)
    _write_meta(tmp_path, lambda meta: meta["config"].__setitem__("targets", "(.*.*.*.*)*Z"))
    monkeypatch.setattr(sas.targets, "REGEX_TIME_LIMIT_S", 1.0)
    fresh = LongNames()
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"targets regex .* did not finish matching 2 module names within 1 s"):
        sas.load_adapter(fresh, tmp_path)
    assert time.monotonic() - start < 10
    assert _untouched(fresh)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.__setitem__("config", ["rank", 3]), "field 'config' must be a JSON object"),
    (lambda m: m.__setitem__("layers", "enc.0"), "field 'layers' must be a list of module names"),
    (lambda m: m.__setitem__("layers", [0, 2]), "field 'layers' must be a list of module names"),
    (lambda m: m.__setitem__("architecture", {"a": 1}), "field 'architecture' must be a str"),
    (lambda m: m["config"].__setitem__("share_down_by_input_dim", "false"), "share_down_by_input_dim must be a bool"),
    (lambda m: m["config"].__setitem__("rank", "3"), "rank must be a positive int"),
    (lambda m: m["config"].__setitem__("targets", [["enc.0"]]), "targets must be a regex str or a non-empty list"),
    (lambda m: m["config"].__setitem__("targets", "enc.(0"), "targets is not a valid regex"),
    (lambda m: m["config"].__setitem__("sharing", ["role"]), "sharing must be one of"),
    (lambda m: m["config"].__setitem__("base_model_name", 7), "base_model_name must be a str or None"),
])
def test_wrong_json_types_in_the_config_file_name_the_field(saved, change, message):
    _, directory, _, _, _ = saved
    _write_meta(directory, change)
    fresh = Mlp()
    with pytest.raises(ValueError, match=message):
        sas.load_adapter(fresh, directory)
    assert _untouched(fresh)


def test_deeply_nested_config_file_is_a_value_error(saved):
    _, directory, _, _, _ = saved
    _write_description(directory, '{"config": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} \(metadata 'sas_adapter'\) is nested too deeply"):
        sas.load_adapter(Mlp(), directory)


@pytest.mark.parametrize("victim", [WEIGHTS_NAME])  # the config file's case: tests/test_io_untrusted.py
def test_file_that_is_a_folder_is_a_value_error_naming_it(saved, victim):
    _, directory, _, _, _ = saved
    (directory / victim).unlink()
    (directory / victim).mkdir()
    fresh = Mlp()
    with pytest.raises(ValueError, match=rf"{victim} is a folder, not a file"):
        sas.load_adapter(fresh, directory)
    assert _untouched(fresh)


def test_adapter_path_that_is_a_file_is_a_value_error(tmp_path):
    (tmp_path / "adapter").write_text("")
    with pytest.raises(ValueError, match="adapter is not a folder"):
        sas.load_adapter(Mlp(), tmp_path / "adapter")


def test_refused_integer_tensor_names_expected_dtype(tmp_path):
    model = sas.inject(WithNorm(), SaSConfig(rank=2, targets=["proj"], trainable_modules=["norm"]))
    sas.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    tensors["norm.num_batches_tracked"] = tensors["norm.num_batches_tracked"].float()
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    fresh = WithNorm()
    with pytest.raises(ValueError, match=r"'norm.num_batches_tracked' has dtype torch.float32; expected torch.int64"):
        sas.load_adapter(fresh, tmp_path)
    assert _untouched(fresh)


# -- python -m sas.check usage -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--json", "/nonexistent-folder/report.json"], "--json '/nonexistent-folder/report.json': cannot write it"),
    (["--device", "gpu0"], "--device 'gpu0'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", f"cuda:{torch.cuda.device_count()}"],
     "--device 'cuda:"),
    (["--model", "no_such_model"], "--model 'no_such_model': not a timm model name"),
    (["--model", "test_vit", "--targets", "attn.qkv,decoder"],
     "--targets: targets entry 'decoder' matches no nn.Linear"),
    (["--model", "test_vit", "--targets", "attn.qkv,,mlp.fc1"], "--targets 'attn.qkv,,mlp.fc1': targets must be"),
    (["--targets", "attn.qkv"], "--targets only applies with --model"),
    (["--dtype", "fp8"], "--dtype: unknown ['fp8']"),
])
def test_check_rejects_bad_usage_before_running(argv, message, monkeypatch, capsys, tmp_path):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the check ran despite bad usage")

    monkeypatch.setattr(check, "check_grid", must_not_run)
    monkeypatch.setattr(check, "check_model", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        check.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_check_json_path_that_is_a_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--quick", "--json", str(tmp_path)])
    assert exit_info.value.code == 2 and "is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", sas.available_backends("cpu"))
@pytest.mark.parametrize("x, error, message", [
    (torch.tensor(1.0), ValueError, r"x of shape \(\.\.\., in_features=12\), got \(\)"),
    (torch.zeros(3, 12, device="meta"), ValueError, "x on the meta device"),
    (torch.zeros(12, device="meta"), ValueError, "x on the meta device"),
    ([[0.0] * 12], TypeError, "x as a torch.Tensor, got list"),
], ids=["0-dim", "meta", "meta 1-D", "list"])
def test_bad_input_to_an_adapted_layer_is_named(backend, x, error, message):
    """Issue 17: a 0-dim x gave an IndexError and a meta x an autocast error from deep inside."""
    layer = sas.SaSLinear.from_linear(nn.Linear(12, 5))
    with sas.testing.forced_backend(backend), pytest.raises(error, match=message):
        layer(x)


# -- the 8-bit saved inputs: empty batches, autocast ------------------------------------------------

def _saved_input_model(saved_input, dtype=torch.float32):
    model = sas.inject(Mlp(dtype=dtype), SaSConfig(rank=3, targets=["enc.0", "enc.2", "out"], saved_input=saved_input))
    return sas.testing.randomize_adapter(model)


def _step_gradients(model, x, backend, autocast_dtype=None):
    """The gradient of the input and of every trainable tensor of one training step on ``x``."""
    inputs = x.clone().requires_grad_()
    with sas.testing.forced_backend(backend), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                                              enabled=autocast_dtype is not None):
        model(inputs).float().square().sum().backward()
    return {"x": inputs.grad, **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("backend", sas.available_backends("cpu"))
def test_an_empty_batch_trains_in_the_8_bit_modes_with_zero_gradients(backend):
    """The reference's backward (every backend's route in float64) reshaped the 0-row gradient to (0, -1)."""
    for dtype, shape in itertools.product((torch.float32, torch.float64), ((0, 12), (3, 0, 12))):
        x = torch.zeros(shape, dtype=dtype)
        expected = _step_gradients(_saved_input_model("full", dtype), x, backend)
        for kind in ("int8", "fp8"):
            grads = _step_gradients(_saved_input_model(kind, dtype), x, backend)
            assert grads.keys() == expected.keys()
            for name, grad in grads.items():
                assert grad.shape == expected[name].shape and not grad.any(), (kind, dtype, shape, name)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_reference_under_autocast_changes_only_dA_in_the_8_bit_modes(autocast_dtype):
    """As on the kernel backends: dx, B, the embeddings and the hypernetwork get the full mode's gradients bit
    for bit, and dA alone reads the 8-bit copy."""
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(3))
    full = _step_gradients(_saved_input_model("full"), x, "reference", autocast_dtype)
    for kind in ("int8", "fp8"):
        grads = _step_gradients(_saved_input_model(kind), x, "reference", autocast_dtype)
        assert grads.keys() == full.keys()
        for name, grad in grads.items():
            if ".down." in name:
                assert not torch.equal(grad, full[name]) and torch.nn.functional.cosine_similarity(
                    grad.flatten(), full[name].flatten(), dim=0) > 0.99, (kind, name)
            else:
                assert torch.equal(grad, full[name]), (kind, name)


@pytest.mark.parametrize("argument, message", [
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    (dict(rank=0), "rank must be a positive int, got 0"),
    (dict(embed_dim=2.5), "embed_dim must be a positive int, got 2.5"),
    (dict(saved_input=None), r"saved_input must be one of \('full', 'int8', 'fp8'\), got None"),
    (dict(train_down="false"), "train_down must be a bool"),
], ids=["nan scale", "inf scale", "rank 0", "float embed_dim", "saved_input None", "train_down str"])
def test_a_standalone_layer_checks_its_arguments_as_the_config_does(argument, message):
    """SaSLinear.from_linear took scale=nan (NaN outputs from step 0), rank=0 (failing at the first forward) and
    saved_input=None."""
    with pytest.raises(ValueError, match=message):
        sas.SaSLinear.from_linear(nn.Linear(4, 4), **argument)

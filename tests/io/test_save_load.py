"""save_adapter / load_adapter: round trip and every bad-file case, with nothing partially loaded; a save that
fails or is interrupted leaves a loadable adapter; trainable modules' buffers and tied tensors round trip."""
import errno
import json
import os
import time

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import sas
import sas.testing
from sas import SaSConfig
from sas.io import CONFIG_NAME, DESCRIPTION_KEY, WEIGHTS_NAME

from small_models import Mlp, TiedLM, randomise_shared, untouched


def _vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, **kwargs).eval()


@pytest.fixture
def saved(tmp_path):
    model = sas.inject(_vit(), SaSConfig(rank=4, trainable_modules=["head"]))
    with torch.no_grad():
        for p in model.sas_shared.parameters():
            p.normal_(0, 0.1)
        model.head.weight.normal_()
    sas.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _assert_refused(directory, error, match):
    """Loading ``directory`` into a fresh model raises ``error`` and leaves the model as it was."""
    fresh = _vit()
    with pytest.raises(error, match=match):
        sas.load_adapter(fresh, directory)
    assert untouched(fresh)


def test_files_hold_only_adapter_tensors_each_once(saved):
    model, directory = saved
    tensors = load_file(str(directory / WEIGHTS_NAME))
    shared_keys = {f"sas_shared.{k}" for k in model.sas_shared.state_dict()}
    assert set(tensors) == shared_keys | {"head.weight", "head.bias"}
    meta = json.loads((directory / CONFIG_NAME).read_text())
    assert meta["config"]["rank"] == 4 and len(meta["layers"]) == 4 * len(model.blocks)


def test_round_trip_reproduces_outputs_exactly(saved):
    model, directory = saved
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    loaded = sas.load_adapter(_vit(), directory)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert sas.count_parameters(loaded) == sas.count_parameters(model)


def test_other_architecture_refused(saved):
    _, directory = saved
    other = _vit(depth=2)
    with pytest.raises(ValueError, match="was made for .* with layers"):
        sas.load_adapter(other, directory)
    assert untouched(other)


def test_base_model_name_checked(tmp_path):
    model = sas.inject(_vit(), SaSConfig(rank=2, base_model_name="vit_base_patch16_224"))
    sas.save_adapter(model, tmp_path)
    _assert_refused(tmp_path, ValueError, "was made for 'vit_base_patch16_224', not for this 'test_vit'")


def _as_saved_before_the_description(directory):
    """Rewrite the weights file as versions before the description in its metadata wrote it."""
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(directory / WEIGHTS_NAME))
    del metadata[DESCRIPTION_KEY]
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)


def test_missing_weights_file(saved):
    _, directory = saved
    (directory / WEIGHTS_NAME).unlink()
    _assert_refused(directory, FileNotFoundError, f"no {WEIGHTS_NAME}")


def test_weights_file_alone_loads(saved):
    model, directory = saved
    (directory / CONFIG_NAME).unlink()
    loaded = sas.load_adapter(_vit(), directory)
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_config_file_is_read_for_weights_without_description(saved):
    model, directory = saved
    _as_saved_before_the_description(directory)
    loaded = sas.load_adapter(_vit(), directory)
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    (directory / CONFIG_NAME).unlink()
    _assert_refused(directory, FileNotFoundError, f"no {CONFIG_NAME}")


def test_corrupt_config(saved):
    _, directory = saved
    _as_saved_before_the_description(directory)
    (directory / CONFIG_NAME).write_text("{not json")
    _assert_refused(directory, ValueError, "is not valid JSON")


def test_corrupt_description(saved):
    _, directory = saved
    tensors = load_file(str(directory / WEIGHTS_NAME))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={DESCRIPTION_KEY: "{not json"})
    _assert_refused(directory, ValueError, rf"{WEIGHTS_NAME} \(metadata '{DESCRIPTION_KEY}'\) is not valid JSON")


def test_corrupt_weights(saved):
    _, directory = saved
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    _assert_refused(directory, ValueError, "is not a readable safetensors file")


def _rewrite(directory, change):
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(directory / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)


def test_shape_mismatch_names_the_tensor(saved):
    _, directory = saved
    _rewrite(directory, lambda t: t.__setitem__("sas_shared.up.attn_qkv", torch.zeros(192, 5)))
    _assert_refused(directory, ValueError, r"tensor 'sas_shared.up.attn_qkv' has shape \(192, 5\)")


def test_missing_tensor_named(saved):
    _, directory = saved
    _rewrite(directory, lambda t: t.pop("sas_shared.embeddings"))
    _assert_refused(directory, ValueError, "lacks tensor 'sas_shared.embeddings'")


def test_unexpected_tensor_named(saved):
    _, directory = saved
    _rewrite(directory, lambda t: t.__setitem__("sas_shared.up.extra", torch.zeros(2)))
    _assert_refused(directory, ValueError, "unexpected tensor 'sas_shared.up.extra'")


def test_save_needs_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="call sas.inject first"):
        sas.save_adapter(_vit(), tmp_path)


# -- save and load ---------------------------------------------------------------------------------

@pytest.fixture
def saved_mlp(tmp_path):
    """An adapter saved once (the 'previous' one), plus the model, changed since then."""
    model = sas.inject(Mlp(), SaSConfig(rank=3, targets=["enc.0", "enc.2"], trainable_modules=["out"]))
    randomise_shared(model)
    x = torch.randn(4, 12)
    directory = tmp_path / "adapter"
    sas.save_adapter(model, directory)
    files = {name: (directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    expected = model(x)
    randomise_shared(model, seed=9)
    model.sas_shared.config.rank = 99  # a different config would be written first by a non-atomic save
    return model, directory, files, x, expected


def _assert_previous_intact(directory, files, x, expected):
    assert {p.name for p in directory.iterdir()} == set(files)  # no temporary left behind
    assert all((directory / name).read_bytes() == data for name, data in files.items())
    loaded = sas.load_adapter(Mlp(), directory)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_save_that_runs_out_of_disk_leaves_the_previous_adapter(saved_mlp, monkeypatch):
    model, directory, files, x, expected = saved_mlp

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sas.io, "_write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        sas.save_adapter(model, directory)
    _assert_previous_intact(directory, files, x, expected)


def test_save_of_a_refused_tensor_leaves_the_previous_adapter(saved_mlp):
    model, directory, files, x, expected = saved_mlp
    model.out.weight = nn.Parameter(model.out.weight.detach().to_sparse(), requires_grad=True)
    with pytest.raises(RuntimeError, match="COO"):  # torch refuses to make a sparse tensor contiguous
        sas.save_adapter(model, directory)
    _assert_previous_intact(directory, files, x, expected)


def test_save_interrupted_between_the_two_renames_loads_as_the_new_adapter(saved_mlp, monkeypatch):
    model, directory, files, x, _ = saved_mlp
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
    randomise_shared(model)
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
    randomise_shared(model)
    with torch.no_grad():
        model.enc[0].base_layer.weight.add_(1.0)
    sas.save_adapter(model, tmp_path)
    loaded = sas.load_adapter(Mlp(), tmp_path)
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_tied_trainable_modules_save_and_load(tmp_path):
    model = sas.inject(TiedLM(), SaSConfig(rank=2, targets=["mix"], trainable_modules=["embed", "head"]))
    randomise_shared(model)
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
    assert untouched(fresh)


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
def test_wrong_json_types_in_the_config_file_name_the_field(saved_mlp, change, message):
    _, directory, _, _, _ = saved_mlp
    _write_meta(directory, change)
    fresh = Mlp()
    with pytest.raises(ValueError, match=message):
        sas.load_adapter(fresh, directory)
    assert untouched(fresh)


def test_deeply_nested_config_file_is_a_value_error(saved_mlp):
    _, directory, _, _, _ = saved_mlp
    _write_description(directory, '{"config": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} \(metadata 'sas_adapter'\) is nested too deeply"):
        sas.load_adapter(Mlp(), directory)


@pytest.mark.parametrize("victim", [WEIGHTS_NAME])  # the config file's case: tests/io/test_untrusted.py
def test_file_that_is_a_folder_is_a_value_error_naming_it(saved_mlp, victim):
    _, directory, _, _, _ = saved_mlp
    (directory / victim).unlink()
    (directory / victim).mkdir()
    fresh = Mlp()
    with pytest.raises(ValueError, match=rf"{victim} is a folder, not a file"):
        sas.load_adapter(fresh, directory)
    assert untouched(fresh)


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
    assert untouched(fresh)

"""load_adapter on untrusted folders: sizes bounded and checked against the saved tensors before anything
is built, the regex time limit covering compilation, special files, non-finite tensors; and adapters saved
by earlier versions."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import sas
import sas.model
from sas import SaSConfig
from sas.io import CONFIG_NAME, DESCRIPTION_KEY, WEIGHTS_NAME, adapter_state_dict

# Saved by save_adapter before the weights file carried its description (commit 42051b9), from Tiny
# below with SaSConfig(rank=2, embed_dim=3, hyper_hidden=4, targets=["enc"], trainable_modules=["out"],
# num_tasks=2) and random values.
SAVED_BY_VERSION_1 = Path(__file__).resolve().parents[1] / "data" / "adapter_saved_by_v1"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.enc(x)))


@pytest.fixture
def saved(tmp_path):
    model = sas.inject(Tiny(), SaSConfig(rank=2, embed_dim=3, hyper_hidden=4, targets=["enc"],
                                         trainable_modules=["out"], num_tasks=2))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    sas.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _metadata(directory):
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        return handle.metadata()


def _rewrite(directory, change_meta=None, change_tensors=None):
    """Change the description (in the weights file, where the loader reads it, and in its copy) or the tensors."""
    metadata, tensors = _metadata(directory), load_file(str(directory / WEIGHTS_NAME))
    if change_meta is not None:
        meta = json.loads(metadata[DESCRIPTION_KEY])
        change_meta(meta)
        metadata[DESCRIPTION_KEY] = json.dumps(meta)
        (directory / CONFIG_NAME).write_text(metadata[DESCRIPTION_KEY])
    if change_tensors is not None:
        change_tensors(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)


def _assert_refused(directory, match):
    fresh = Tiny()
    with pytest.raises(ValueError, match=match):
        sas.load_adapter(fresh, directory)
    assert not sas.adapted_layers(fresh) and not hasattr(fresh, "sas_shared")


def _assert_loads_as(directory, model):
    loaded = adapter_state_dict(sas.load_adapter(Tiny(), directory))
    expected = adapter_state_dict(model)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in expected.items())


@pytest.mark.parametrize("field, value", [
    ("num_tasks", 10**9),  # built one Parameter per task before any check: hung
    ("rank", 10**30),  # a TypeError from torch.empty
    ("embed_dim", 2**16 + 1),
    ("hyper_hidden", 10**12),
])
def test_sizes_out_of_range_are_refused_naming_the_field(saved, field, value):
    _, directory = saved
    _rewrite(directory, lambda meta: meta["config"].__setitem__(field, value))
    _assert_refused(directory, rf"{field} must be at most 65,536, got {value}")


@pytest.mark.parametrize("field, value, found", [
    ("rank", 3, 2),
    ("embed_dim", 5, 3),
    ("hyper_hidden", 7, 4),
    ("num_tasks", 60_000, 2),  # within range, but the file holds two task embeddings
    ("num_tasks", 3, 2),
    ("num_tasks", 1, 2),
])
def test_sizes_must_be_those_of_the_saved_tensors(saved, field, value, found):
    _, directory = saved
    _rewrite(directory, lambda meta: meta["config"].__setitem__(field, value))
    _assert_refused(directory, rf"field '{field}' is {value:,} but .* {found:,}")


def test_layer_count_must_be_that_of_the_saved_embeddings(saved):
    _, directory = saved
    _rewrite(directory, lambda meta: meta["layers"].append("out"))
    _assert_refused(directory, r"field 'layers' is 2 but the tensors .* have 1 \('sas_shared.embeddings'")


def test_task_embeddings_beyond_the_config_are_refused(saved):
    _, directory = saved
    _rewrite(directory, change_tensors=lambda t: t.__setitem__("sas_shared.task_embeddings.2", torch.zeros(3)))
    _assert_refused(directory, r"field 'num_tasks' is 2 but .* holds 3 task embeddings")


def test_regex_compilation_is_under_the_time_limit(saved, monkeypatch):
    _, directory = saved
    # Each case-insensitive range over most of Unicode costs Python's re compiler about 10 ms: 10 kB of
    # them took 24 s to compile in the loading process.
    slow_to_compile = "(?i)" + "[\u0100-\U0010ffff]" * 2000
    _rewrite(directory, lambda meta: meta["config"].__setitem__("targets", slow_to_compile))
    monkeypatch.setattr(sas.targets, "REGEX_TIME_LIMIT_S", 0.5)
    _assert_refused(directory, r"targets regex .*\(10,004 characters\) did not finish compiling within 0.5 s")


def _as_saved_by_version_1(directory):
    metadata, tensors = _metadata(directory), load_file(str(directory / WEIGHTS_NAME))
    del metadata[DESCRIPTION_KEY]
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)


def _make_special(path, kind):
    path.unlink()
    if kind == "folder":
        path.mkdir()
    elif kind == "FIFO":
        os.mkfifo(path)  # opening it to read would wait for a writer for ever
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind, message", [("folder", "is a folder, not a file"), ("FIFO", "is a FIFO"),
                                           ("device", "is a character device")])
@pytest.mark.parametrize("victim", [WEIGHTS_NAME, CONFIG_NAME])
def test_special_file_in_place_of_a_file_is_a_value_error(saved, victim, kind, message):
    _, directory = saved
    if victim == CONFIG_NAME:
        _as_saved_by_version_1(directory)  # the config file is read only beside such a weights file
    _make_special(directory / victim, kind)
    _assert_refused(directory, rf"{victim} {message}")


@pytest.mark.parametrize("key, value, message", [
    ("sas_shared.up.enc", float("nan"), "holds NaN or Inf"),
    ("sas_shared.hyper.output.weight", float("-inf"), "holds NaN or Inf"),
    ("sas_shared.task_embeddings.1", float("inf"), "holds NaN or Inf"),
    ("out.weight", float("nan"), "holds NaN"),
])
def test_non_finite_tensors_are_refused_naming_them(saved, key, value, message):
    _, directory = saved
    _rewrite(directory, change_tensors=lambda tensors: tensors[key].view(-1).__setitem__(0, value))
    _assert_refused(directory, rf"tensor '{key}' in {WEIGHTS_NAME} {message}; refusing to load it")


def test_inf_in_a_trainable_module_loads(saved):
    model, directory = saved
    with torch.no_grad():
        model.out.bias[0] = float("-inf")  # e.g. a mask a module keeps in a buffer
    sas.save_adapter(model, directory)
    _assert_loads_as(directory, model)


def test_save_refuses_nan_and_keeps_the_previous_adapter(saved):
    model, directory = saved
    before = {name: (directory / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
    with torch.no_grad():
        model.sas_shared.hyper.hidden.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save: tensor 'sas_shared.hyper.hidden.bias' holds NaN"):
        sas.save_adapter(model, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_config_file_of_another_save_is_ignored(saved, tmp_path):
    model, directory = saved
    other = sas.inject(Tiny(), SaSConfig(rank=5, targets=["enc", "out"]))
    sas.save_adapter(other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / CONFIG_NAME, directory / CONFIG_NAME)  # as a crash or a concurrent save leaves it
    _assert_loads_as(directory, model)


def test_adapter_saved_by_version_1_still_loads(tmp_path):
    assert DESCRIPTION_KEY not in _metadata(SAVED_BY_VERSION_1)  # the fixture is of the old format
    loaded = sas.load_adapter(Tiny(), SAVED_BY_VERSION_1)
    assert loaded.sas_shared.num_tasks == 2
    # Saved before saved_input and train_down existed: they load as today's defaults. The default saved_input,
    # "recompute", computes the gradients of the full mode the adapter was trained with, bit for bit.
    assert "saved_input" not in json.loads((SAVED_BY_VERSION_1 / CONFIG_NAME).read_text())["config"]
    config = loaded.sas_shared.config
    assert (config.saved_input, config.train_down) == ("recompute", True)
    state = adapter_state_dict(loaded)
    saved = load_file(str(SAVED_BY_VERSION_1 / WEIGHTS_NAME))
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[key], tensor) for key, tensor in saved.items())
    # Saving it again writes the new format, which loads to the same tensors.
    sas.save_adapter(loaded, tmp_path)
    assert DESCRIPTION_KEY in _metadata(tmp_path)
    _assert_loads_as(tmp_path, loaded)

"""save_adapter / load_adapter: round trip and every bad-file case, with nothing partially loaded."""
import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sas
from sas import SaSConfig
from sas.io import CONFIG_NAME, DESCRIPTION_KEY, WEIGHTS_NAME


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


def _untouched(model):
    return not sas.adapted_layers(model) and not hasattr(model, "sas_shared")


def _assert_refused(directory, error, match):
    """Loading ``directory`` into a fresh model raises ``error`` and leaves the model as it was."""
    fresh = _vit()
    with pytest.raises(error, match=match):
        sas.load_adapter(fresh, directory)
    assert _untouched(fresh)


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
    assert _untouched(other)


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

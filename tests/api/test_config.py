"""SaSConfig validation and JSON round trip."""
import dataclasses
import json

import pytest
import torch

import sas
from sas import SaSConfig


def test_every_field_has_help_text():
    assert all(f.metadata.get("help") for f in dataclasses.fields(SaSConfig))


def test_json_round_trip(tmp_path):
    config = SaSConfig(rank=5, targets=r"blocks\.\d+\.attn\.qkv", scale=0.5, sharing="shape",
                       trainable_modules=["head"], base_model_name="vit_base_patch16_224")
    assert SaSConfig.from_json(config.to_json()) == config
    config.to_json(tmp_path / "c.json")
    assert SaSConfig.from_json(tmp_path / "c.json") == config


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive int, got 0"),
    (dict(rank=2.0), "rank must be a positive int, got 2.0"),
    (dict(rank=True), "rank must be a positive int, got True"),
    (dict(targets=""), "targets must not be an empty string"),
    (dict(targets=[]), "targets must be a regex str or a non-empty list"),
    (dict(targets=["attn.qkv", ""]), "targets must be a regex str or a non-empty list"),
    (dict(targets=3), "targets must be a regex str or a list of str, got int"),
    (dict(embed_dim=0), "embed_dim must be a positive int, got 0"),
    (dict(hyper_hidden=-1), "hyper_hidden must be a positive int, got -1"),
    # Bounded, so a config from an untrusted file cannot ask for 10**9 task Parameters or a 10**30-row A.
    (dict(rank=10**30), "rank must be at most 65,536, got 1000000000000000000000000000000"),
    (dict(embed_dim=2**16 + 1), "embed_dim must be at most 65,536, got 65537"),
    (dict(hyper_hidden=2**20), "hyper_hidden must be at most 65,536, got 1048576"),
    (dict(num_tasks=10**9), "num_tasks must be at most 65,536, got 1000000000"),
    (dict(hyper_activation="swish"), "hyper_activation must be one of"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(scale=float("inf")), "scale must be a finite number"),
    (dict(scale="1"), "scale must be a finite number"),
    (dict(sharing="global"), "sharing must be one of"),
    (dict(sharing="layer", share_down_by_input_dim=True), "contradicts sharing='layer'"),
    (dict(layer_op="gemm"), "layer_op must be one of"),
    (dict(trainable_modules="head"), "trainable_modules must be a list of non-empty str"),
    # Types are checked, not coerced: the string "false" is truthy and used to turn sharing on.
    (dict(share_down_by_input_dim="false"), "share_down_by_input_dim must be a bool (true or false), got str 'false'"),
    (dict(share_down_by_input_dim=0), "share_down_by_input_dim must be a bool (true or false), got int 0"),
    (dict(hyper_activation=["tanh"]), "hyper_activation must be one of"),
    (dict(sharing=None), "sharing must be one of"),
    (dict(layer_op=1), "layer_op must be one of"),
    (dict(base_model_name=3), "base_model_name must be a str or None, got int 3"),
    (dict(targets=r"blocks\.(\d+\.attn"), "targets is not a valid regex"),
    (dict(targets="*qkv"), "targets is not a valid regex"),
])
def test_bad_values_rejected_with_exact_message(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        SaSConfig(**kwargs)


def test_unknown_json_field_rejected():
    with pytest.raises(ValueError, match=r"unknown SaSConfig fields \['rnak'\]"):
        SaSConfig.from_dict({"rnak": 4})


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "a SaSConfig must be given as a JSON object"),
    ('{"rank": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"rank": 4', "is not valid JSON"),
    ('{"rank": ' + "9" * 5000 + "}", "is not valid JSON"),  # over Python's 4,300-digit int limit
])
def test_bad_json_file_is_a_value_error(text, message, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        SaSConfig.from_json(path)


@pytest.mark.parametrize("old, new", [("adapter", "kernels"), ("fused", "fold")])
def test_old_layer_op_names_still_load(old, new, tmp_path):
    # Configs saved before the names said what they are keep loading, mapped to the new names.
    assert SaSConfig(layer_op=old).layer_op == new
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**SaSConfig().to_dict(), "layer_op": old}))
    assert SaSConfig.from_json(str(path)).layer_op == new
    assert sas.SaSLinear.from_linear(torch.nn.Linear(4, 3), rank=2, layer_op=old).layer_op == new
    with pytest.raises(ValueError, match="layer_op"):
        SaSConfig(layer_op="fast")

"""What PEFT users expect of an adapter library: disable_adapter, load_adapter(is_trainable=False), loading
another saved adapter in place, a warning for a frozen task head, float32 adapter tensors on a half base,
compare_model on a ModelOutput, the base model recorded in the save; and sas.check's triton-on-cpu usage error."""
import json
import warnings

import pytest
import torch

import sas
import sas.testing
from sas import check

transformers = pytest.importorskip("transformers")


def _bert(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).to(dtype).eval()


def _config(**overrides):
    return sas.SaSConfig(**{"rank": 4, "targets": sas.BERT_LINEAR_TARGETS, "trainable_modules": ["classifier"],
                            **overrides})


def _ids():
    return torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapted(seed=0, **overrides):
    model = sas.inject(_bert(), _config(**overrides))
    return sas.testing.randomize_adapter(model, seed=seed)


def test_disable_adapter_gives_the_base_outputs_exactly_and_the_adapter_back_on_exit():
    ids = _ids()
    base = _logits(_bert(), ids)
    model = _adapted(num_tasks=2)  # no sas.tasks context needed while disabled
    with sas.tasks(model, 1):
        adapted = _logits(model, ids)
    assert (adapted - base).abs().max() > 1e-4  # the head's logits are small (init std 0.02)
    keys = list(model.state_dict())
    with sas.disable_adapter(model):
        with sas.disable_adapter(model):
            torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)
        torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)
        assert list(model.state_dict()) == keys
    with pytest.raises(RuntimeError, match="inside"):
        with sas.disable_adapter(model):
            raise RuntimeError("inside")
    with sas.tasks(model, 1):
        torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=0)
    sas.merge(model, task=1)
    with pytest.raises(ValueError, match="model is merged.*sas.unmerge"):
        with sas.disable_adapter(model):
            pass


def test_load_adapter_for_inference_leaves_nothing_requiring_grad(tmp_path):
    sas.save_adapter(_adapted(), tmp_path)
    frozen = sas.load_adapter(_bert().train(), tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    trainable = sas.load_adapter(_bert(), tmp_path)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in _adapted().named_parameters() if p.requires_grad}
    with pytest.raises(TypeError, match="is_trainable must be a bool, got str 'no'"):
        sas.load_adapter(_bert(), tmp_path, is_trainable="no")


def test_load_adapter_weights_swaps_in_an_adapter_saved_with_other_compute_fields(tmp_path):
    ids = _ids()
    other = _adapted(seed=5, saved_input="int8", train_down=False, layer_op="fold")
    want = _logits(other, ids)
    sas.save_adapter(other, tmp_path)
    model = _adapted(seed=0)
    assert (_logits(model, ids) - want).abs().max() > 1e-4
    sas.load_adapter_weights(model, tmp_path)
    # The same tensors; layer_op "kernels" here and "fold" there order the fp32 sums differently.
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-7)
    # The model keeps how it computes (its default), not the saved adapter's int8, frozen A and fold.
    config = model.sas_shared.config
    assert (config.saved_input, config.train_down, config.layer_op) == ("recompute", True, "kernels")


@pytest.mark.parametrize("saved, message", [
    (dict(rank=2), "field 'rank' is 2 in the saved adapter but 4 in this model"),
    (dict(scale=2.0), "field 'scale' is 2.0 in the saved adapter but 1.0 in this model"),
    (dict(targets=r".*\.layer\.\d+\.attention\.self\.(query|key|value)"), "field 'targets' is"),
])
def test_load_adapter_weights_names_the_field_that_differs_and_both_values(tmp_path, saved, message):
    sas.save_adapter(_adapted(**saved), tmp_path)
    model = _adapted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        sas.load_adapter_weights(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_frozen_hugging_face_task_head_warns_and_a_trainable_one_does_not():
    with pytest.warns(UserWarning, match="task head 'classifier' stays frozen.*trainable_modules=\\['classifier'\\]"):
        sas.inject(_bert(), _config(trainable_modules=[]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sas.inject(_bert(), _config())


def test_sas_adapter_on_a_bfloat16_base_is_float32_and_computes_in_bfloat16():
    model = sas.inject(_bert(dtype=torch.bfloat16), _config())
    assert {p.dtype for p in model.sas_shared.parameters()} == {torch.float32}
    assert model.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
    sas.testing.randomize_adapter(model)
    ids = _ids()
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.sas_shared.up.values())


def test_compare_model_takes_a_model_output():
    model = _adapted()
    assert isinstance(model(input_ids=_ids()), transformers.modeling_outputs.ModelOutput)
    report = sas.testing.compare_model(model, _ids(), backends=["reference"])
    assert report.passed, report.table()


def test_the_save_records_the_base_and_a_load_into_other_base_weights_warns(tmp_path):
    model = _adapted()
    model.name_or_path = "tiny/bert-a"
    sas.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == "tiny/bert-a"
    fingerprint = meta["base_model_fingerprint"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sas.load_adapter(_bert(seed=0), tmp_path)
        sas.load_adapter(_bert(seed=0, dtype=torch.bfloat16), tmp_path)  # the same weights in another dtype
    other = _bert(seed=1)
    with pytest.warns(UserWarning, match=f"saved on base 'tiny/bert-a' \\(weights fingerprint {fingerprint}\\).*"
                                         f"has fingerprint [0-9a-f]{{16}}"):
        sas.load_adapter(other, tmp_path)


def test_sas_check_names_triton_interpret_for_triton_on_cpu(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        check.parse_args(["--device", "cpu", "--backend", "triton"])
    assert exit_info.value.code == 2 and "--triton-interpret" in capsys.readouterr().err
    assert check.parse_args(["--device", "cpu", "--backend", "triton", "--triton-interpret"]).triton_interpret

"""Leaving SaS: sas.merge_and_unload / sas.unload give the plain base architecture, and sas.export_lora a PEFT
LoRA folder; checked with the real transformers, PEFT and timm packages on tiny random models."""
import json

import pytest
import torch
from torch import nn

import sas
import sas.testing

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NUM_LABELS = 3


def _bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=NUM_LABELS,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).eval()


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (4, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask, torch.tensor([0, 1, 2, 1])


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _trained_bert(**config):
    """A tiny BERT classifier with SaS and its head trained a few AdamW steps (so B != 0 and the head moved)."""
    model = sas.inject(_bert(), sas.SaSConfig(rank=4, targets=sas.BERT_LINEAR_TARGETS,
                                              trainable_modules=["classifier"], **config))
    ids, mask, labels = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        if config.get("num_tasks", 1) > 1:
            with sas.tasks(model, torch.tensor([0, 1, 0, 1])):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert all(b.abs().max() > 0 for b in model.sas_shared.up.values())
    return model


def test_merge_and_unload_saves_a_plain_bert_that_from_pretrained_loads_with_the_adapted_logits(tmp_path):
    ids, mask, _ = _batch()
    model = _trained_bert()
    adapted = _logits(model, ids, mask)
    plain = sas.merge_and_unload(model)
    assert not any(isinstance(m, (sas.SaSLinear, sas.SaSShared)) for m in plain.modules())
    assert not hasattr(plain, "sas_shared")
    assert not any("base_layer" in k or "sas_merged" in k for k in plain.state_dict())
    plain.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    # Merging reorders fp32 sums only.
    torch.testing.assert_close(_logits(reloaded, ids, mask), adapted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(_bert(), ids, mask), adapted, atol=1e-3)


def test_unload_gives_the_base_weights_back_bit_for_bit_also_after_merge():
    base = _bert().state_dict()
    model = _trained_bert()
    sas.merge(model)
    plain = sas.unload(model)
    state = plain.state_dict()
    changed = {k for k in base if not torch.equal(state[k], base[k])}
    assert changed == {"classifier.weight", "classifier.bias"}  # the trained head stays trained
    assert set(state) == set(base)


def test_merge_and_unload_of_a_multitask_model_needs_the_task_and_keeps_that_task(tmp_path):
    ids, mask, _ = _batch()
    model = _trained_bert(num_tasks=2)
    with sas.tasks(model, 1):
        task_1 = _logits(model, ids, mask)
    with pytest.raises(ValueError, match="num_tasks=2: name the task"):
        sas.merge_and_unload(model)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, sas.SaSLinear)  # refused: untouched
    plain = sas.merge_and_unload(model, task=1)
    torch.testing.assert_close(_logits(plain, ids, mask), task_1, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_and_unload_take_out_scaling_adapters():
    ids, mask, _ = _batch()
    model = sas.inject(_bert(), sas.ScalingConfig(kind="ssb", targets=sas.BERT_LINEAR_TARGETS,
                                                trainable_modules=["classifier"]))
    sas.testing.randomize_adapter(model)
    adapted = _logits(model, ids, mask)
    plain = sas.merge_and_unload(model)
    assert not any(isinstance(m, (sas.ScalingLinear, sas.ScalingShared)) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids, mask), adapted, rtol=1e-4, atol=1e-5)

    model = sas.inject(_bert(), sas.ScalingConfig(kind="ssl", targets=sas.BERT_LINEAR_TARGETS,
                                                trainable_modules=["classifier"]))
    sas.testing.randomize_adapter(model)
    base = _bert().state_dict()
    assert all(torch.equal(v, base[k]) for k, v in sas.unload(model).state_dict().items())


def test_timm_state_dict_after_merge_and_unload_loads_into_the_unadapted_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    fresh = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    sas.inject(model, sas.SaSConfig(rank=4, trainable_modules=["head"]))
    sas.testing.randomize_adapter(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model(images)
        fresh.load_state_dict(sas.merge_and_unload(model).state_dict())  # strict: the same keys
        torch.testing.assert_close(fresh(images), adapted, rtol=1e-4, atol=1e-5)


def test_export_lora_loads_in_peft_with_the_sas_logits_and_peft_merges_to_sas_merge_and_unload(tmp_path):
    ids, mask, _ = _batch()
    model = _trained_bert()
    adapted = _logits(model, ids, mask)
    sas.export_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert sorted(config["target_modules"]) == sorted(model.sas_shared.layer_names)
    assert config["modules_to_save"] == ["classifier"]

    lora = peft.PeftModel.from_pretrained(_bert(), tmp_path).eval()
    torch.testing.assert_close(_logits(lora, ids, mask), adapted, rtol=0, atol=1e-5)
    peft_plain = lora.merge_and_unload()
    sas_plain = sas.merge_and_unload(model)
    peft_state, sas_state = peft_plain.state_dict(), sas_plain.state_dict()
    assert set(peft_state) == set(sas_state)
    for key, value in sas_state.items():
        torch.testing.assert_close(peft_state[key], value, rtol=0, atol=1e-6, msg=key)


def test_export_lora_exports_the_task_asked_for(tmp_path):
    ids, mask, _ = _batch()
    model = _trained_bert(num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks=2: name the task"):
        sas.export_lora(model, tmp_path / "none")
    for task in (0, 1):
        with sas.tasks(model, task):
            want = _logits(model, ids, mask)
        sas.export_lora(model, tmp_path / str(task), task=task)
        lora = peft.PeftModel.from_pretrained(_bert(), tmp_path / str(task)).eval()
        torch.testing.assert_close(_logits(lora, ids, mask), want, rtol=0, atol=1e-5)


def test_export_lora_refuses_a_scaling_adapter_and_a_model_without_adapter(tmp_path):
    model = sas.inject(_bert(), sas.ScalingConfig(kind="ssl", targets=sas.BERT_LINEAR_TARGETS,
                                                trainable_modules=["classifier"]))
    with pytest.raises(ValueError, match="cannot export a ssl scaling adapter as LoRA.*sas.merge_and_unload"):
        sas.export_lora(model, tmp_path)
    with pytest.raises(ValueError, match="model has no adapter to export"):
        sas.export_lora(_bert(), tmp_path)
    assert not any(tmp_path.iterdir())


def test_export_lora_names_layers_exactly_where_a_suffix_would_catch_another_linear(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)))
    base = [p.detach().clone() for p in model.parameters()]
    sas.inject(model, sas.SaSConfig(rank=2, targets="0"))  # a regex: "0" only, though "1.0" ends in ".0"
    sas.testing.randomize_adapter(model)
    x = torch.randn(5, 6)
    sas.export_lora(model, tmp_path)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)))
    with torch.no_grad():
        for parameter, value in zip(fresh.parameters(), base):
            parameter.copy_(value)
    lora = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert [n for n, m in lora.named_modules() if hasattr(m, "lora_A") and n.endswith(".0")] == \
        ["base_model.model.0"]
    with torch.no_grad():
        torch.testing.assert_close(lora(x), model(x), rtol=0, atol=1e-5)

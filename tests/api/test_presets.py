"""Presets at the SaS paper's budget (<= 0.05% of the backbone): exact parameter counts on MiniLM and ViT-B/16."""
import pytest
import torch

import sas

timm = pytest.importorskip("timm")


def test_bert_budget_on_minilm_is_9876_parameters():
    transformers = pytest.importorskip("transformers")
    try:
        from sas.recipes.bbc_news.model import model_dir
        config = transformers.BertConfig.from_json_file(str(model_dir() / "config.json"))
    except ImportError as exc:
        pytest.skip(str(exc))
    with torch.device("meta"):  # shapes only: the count needs no weights
        encoder = transformers.BertModel(config, add_pooling_layer=False)
    base = sum(p.numel() for p in encoder.parameters())
    sas.inject(encoder, sas.SaSConfig.bert_budget())
    trainable, _ = sas.count_parameters(encoder)
    assert base == 22_565_376
    assert len(sas.adapted_layers(encoder)) == 30  # 5 of the 6 Linears of each of the 6 layers
    # One A (4, 384); B (384, 4) for the hidden-wide outputs and (1536, 4) for the FFN's; 30 embeddings
    # of 8; the hypernetwork 8 -> 32 -> 4.
    assert trainable == 4 * 384 + (384 + 1536) * 4 + 30 * 8 + (8 * 32 + 32 + 32 * 4 + 4) == 9_876
    assert 100 * trainable / base < 0.05


def test_vit_budget_on_vit_b16_is_28356_parameters():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    sas.inject(model, sas.SaSConfig.vit_budget())
    trainable, _ = sas.count_parameters(model)
    assert base == 85_798_656
    # One A (4, 768); B per role: qkv (2304, 4), proj (768, 4), fc1 (3072, 4); 36 embeddings; H 8 -> 32 -> 4.
    assert trainable == 4 * 768 + (2304 + 768 + 3072) * 4 + 36 * 8 + (8 * 32 + 32 + 32 * 4 + 4) == 28_356
    assert 100 * trainable / base < 0.05

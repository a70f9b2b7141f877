"""SaS on a Hugging Face transformers ``BertModel``: injection by HF names, save/load, merge; the packaged MiniLM."""

import pytest
import torch

import sas
import sas.testing
from sas.recipes.bbc_news import model as minilm_model

transformers = pytest.importorskip("transformers")

ROLES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense"]


def _tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_bert_targets_give_every_hf_role_its_own_group():
    model = _tiny_bert()
    sas.inject(model, sas.SaSConfig(rank=4, targets=sas.BERT_LINEAR_TARGETS))
    layers = dict(zip(model.sas_shared.layer_names, sas.adapted_layers(model)))
    assert len(layers) == 2 * len(ROLES)  # every nn.Linear of both blocks
    for block in range(2):
        keys = {role: layers[f"encoder.layer.{block}.{role}"].up_key for role in ROLES}
        # The FFN output ("<i>.output.dense") must not share with the attention output ("attention.output.dense").
        assert len(set(keys.values())) == len(ROLES), keys
    assert len(model.sas_shared.up) == len(ROLES)  # one B per role, shared by the two blocks


def test_inject_save_load_merge_on_a_tiny_bert(tmp_path):
    ids, mask = _inputs()
    base = _hidden(_tiny_bert(), ids, mask)
    model = _tiny_bert()
    sas.inject(model, sas.SaSConfig(rank=4, targets=sas.BERT_LINEAR_TARGETS))
    torch.testing.assert_close(_hidden(model, ids, mask), base)  # B = 0: the base model at init
    sas.testing.randomize_adapter(model)
    adapted = _hidden(model, ids, mask)
    assert (adapted - base).abs().max() > 1e-2

    sas.save_adapter(model, tmp_path)
    fresh = sas.load_adapter(_tiny_bert(), tmp_path)
    torch.testing.assert_close(_hidden(fresh, ids, mask), adapted, rtol=0, atol=0)
    sas.merge(fresh)
    # Merging reorders fp32 sums only (W0 x + s B diag(h) A x vs (W0 + s B diag(h) A) x).
    torch.testing.assert_close(_hidden(fresh, ids, mask), adapted, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def minilm():
    try:
        minilm_model.model_dir()
    except ImportError as exc:
        pytest.skip(str(exc))
    return minilm_model.load_encoder(), minilm_model.load_tokenizer(32)


def _embed(encoder, tokenizer, sentences):
    encoded = tokenizer.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    with torch.no_grad():
        return minilm_model.mean_pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def test_packaged_minilm_embeds_a_paraphrase_closer_than_an_unrelated_sentence(minilm):
    encoder, tokenizer = minilm
    anchor, paraphrase, unrelated = _embed(encoder, tokenizer, [
        "The central bank raised interest rates to fight inflation.",
        "Interest rates were increased by the central bank to curb rising prices.",
        "The striker scored twice in the second half of the match.",
    ])
    cos = torch.nn.functional.cosine_similarity
    close, far = cos(anchor, paraphrase, dim=0).item(), cos(anchor, unrelated, dim=0).item()
    # A working sentence encoder puts the paraphrase far closer; random weights put both near each other.
    assert close > 0.7 and far < 0.3, (close, far)


def test_sas_on_the_packaged_minilm_starts_as_the_base_model(minilm):
    encoder, tokenizer = minilm
    sentences = ["Shares fell sharply in early trading.", "A new phone was unveiled at the show."]
    base = _embed(encoder, tokenizer, sentences)
    model = minilm_model.load_encoder()
    sas.inject(model, sas.SaSConfig(rank=8, targets=sas.BERT_LINEAR_TARGETS))
    assert len(sas.adapted_layers(model)) == 36
    torch.testing.assert_close(_embed(model, tokenizer, sentences), base)

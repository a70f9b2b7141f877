"""A tiny causal LM fine-tuned on BBC News text with SaS and the ``transformers`` Trainer (``train.py``), and the
tiny random LLaMA and byte-level tokenizer it is built from (``model.py``); everything offline."""

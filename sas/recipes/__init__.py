"""Complete jobs built on ``sas``, installed with it.

* ``sas.recipes.bbc_news``: the pretrained all-MiniLM-L6-v2 fine-tuned on BBC News, offline
  (``python -m sas.recipes.bbc_news.finetune``; ``python -m sas.recipes.bbc_news.compare`` sets SaS
  against PEFT LoRA/VeRA, a linear probe and full fine-tuning).
"""

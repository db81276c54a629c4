"""Superposed decoding ("Superposed Decoding: Multiple Generations from a Single
Autoregressive Inference Pass", Shen et al., NeurIPS 2024) with the generation CLI:

  python -m decoding.generate --config=configs/superposed.py --prompt="Once upon a time,"

k drafts per prompt from one forward pass per token (see decoding/superposed.py). The
defaults live in `Superposed`: the reference code's `params/p15_d3_mixed.json` (k = 3,
alpha = 0.54, T = 0.06, m = 9, n-gram weights for contexts 1..5), penalty 200 (the
reference's default), every draft returned best first. The n-gram tables come from
`ngram_corpus` (Jane Austen's novels, models/datasets/text_corpus.py) tokenized with the
model's tokenizer (built once, cached under ~/.cache/decodax/ngram/).
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "superposed"
  return c

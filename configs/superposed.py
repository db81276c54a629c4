"""Superposed decoding ("Superposed Decoding: Multiple Generations from a Single
Autoregressive Inference Pass", Shen et al., NeurIPS 2024) with the generation CLI:

  python -m decoding.generate --config=configs/superposed.py --prompt="Once upon a time,"

k drafts per prompt from one forward pass per token (see decoding/superposed.py). The
defaults are the reference code's `params/p15_d3_mixed.json` (k = 3, alpha = 0.54,
T = 0.06, m = 9, n-gram weights for contexts 1..5), penalty 200 (the reference's
default). `temperature` is the shared Hugging Face field: this file sets it to the
method's 0.06, whereas configs/generate.py's 1.0 would be used as given with
`--config.strategy=superposed`. The n-gram tables come from `ngram_corpus` tokenized
with the model's tokenizer (built once, cached under ~/.cache/decodax/ngram/).
"""
from configs import generate


def get_config():
  c = generate.get_config()
  c.strategy = "superposed"
  c.num_drafts = 3  # k
  c.num_return_sequences = 3  # drafts returned per prompt (<= num_drafts), best first
  c.temperature = 0.06  # T in p = softmax(z / T)
  c.num_token_sample = 9  # m: tokens kept from p (renormalized)
  c.ngram_alpha = 0.54  # log p~ = (1 - alpha) log p + alpha log p_ng
  c.ngram_weights = [0.01, 0.04, 0.15, 0.18, 0.12]  # w_c for context lengths 1..5
  c.ngram_penalty = 200.0  # subtracted when no kept token of a draft has n-gram support
  c.ngram_corpus = "text_corpus/train"  # Jane Austen's novels (models/datasets/text_corpus.py)
  return c

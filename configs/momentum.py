"""Momentum decoding (card 19; "Momentum Decoding: Open-ended Text Generation As Graph
Exploration", Lan et al., 2022) for `python -m decoding.generate --config=configs/momentum.py`.

Defaults from the reference code (github.com/gmftbyGMFTBY/MomentumDecoding): alpha = 0.2
(`inference.py`), loop lengths up to 5-grams (`max_length=5`), the repo's default
resistance "ours" (n-gram blocking: 4-gram repeats cost 5.0, 5-gram repeats are blocked)
and k = 5 candidates (its `test.py` example; the benchmark script uses 2000).
See decoding/momentum.py for the algorithm and the other resistance functions.
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "momentum"
  c.momentum_alpha = 0.2
  c.momentum_top_k = 5
  c.momentum_max_ngram = 5
  c.momentum_resistance = "ours"  # or "block", "linear", "constant", "log", "exp"
  return c

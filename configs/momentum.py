"""Momentum decoding ("Momentum Decoding: Open-ended Text Generation As Graph Exploration",
Lan et al., 2022) for `python -m decoding.generate --config=configs/momentum.py`.

The defaults live in `Momentum` (decoding/momentum.py), from the reference code
(github.com/gmftbyGMFTBY/MomentumDecoding): alpha = 0.2, loop lengths up to 5-grams, the
repo's default resistance "ours" and k = 5 candidates. See decoding/momentum.py for the
algorithm and the other resistance functions.
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "momentum"
  return c

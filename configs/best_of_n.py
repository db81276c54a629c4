"""Best-of-N: sample N responses per prompt and keep one (decoding/best_of_n.py).

  python -m decoding.generate --config=configs/best_of_n.py \
      --prompt="Tom has 3 apples and buys 5 more. How many apples does he have?"

The defaults live in `BestOfN`: N = 8 samples at temperature 0.7 of up to 128 tokens, chosen
by self-certainty (or likelihood, mean_likelihood, borda with power 0.5, majority; answers
extracted with `answer_extractor`, default the last number).
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "best_of_n"
  return c

"""Best-of-N: sample N responses per prompt and keep one (decoding/selection.py).

  python -m decoding.generate --config=configs/best_of_n.py \
      --prompt="Tom has 3 apples and buys 5 more. How many apples does he have?"
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "best_of_n"
  c.num_samples = 8  # N
  # self_certainty | likelihood | mean_likelihood | borda | majority
  c.selection = "self_certainty"
  c.borda_power = 0.5  # p in (N - r + 1)^p; 0 = majority vote (card 17's script default 0.5)
  c.answer_extractor = "last_number"  # decoding.selection.ANSWER_EXTRACTORS
  c.temperature = 0.7
  c.top_p = 1.0
  c.max_new_tokens = 128
  return c

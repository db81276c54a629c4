"""Self-agreement: sample m reasoning paths, then ask the model which answer most agree on.

  python -m decoding.generate --config=configs/self_agreement.py \
      --prompt="Tom has 3 apples and buys 5 more. How many apples does he have?"
"""
from configs import generate as base
from decoding import selection


def get_config():
  c = base.get_config()
  c.strategy = "self_agreement"
  c.num_paths = 8  # m
  c.temperature = 0.7  # stage 1 sampling
  c.max_new_tokens = 128  # per reasoning path
  c.agreement_max_new_tokens = 64  # the final greedy answer
  c.agreement_template = selection.DEFAULT_AGREEMENT_TEMPLATE  # {question} {num_paths} {paths}
  c.agreement_path_template = selection.DEFAULT_PATH_TEMPLATE  # {i} {path}
  c.answer_extractor = "last_number"  # only to report answers in the output
  return c

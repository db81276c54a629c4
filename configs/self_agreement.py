"""Self-agreement: sample m reasoning paths, then ask the model which answer most agree on.

  python -m decoding.generate --config=configs/self_agreement.py \
      --prompt="Tom has 3 apples and buys 5 more. How many apples does he have?"

The defaults live in `SelfAgreement` (decoding/self_agreement.py): m = 8 paths at temperature
0.7 of up to 128 tokens, a greedy answer of up to 64 tokens, and the agreement prompt
templates `DEFAULT_AGREEMENT_TEMPLATE` / `DEFAULT_PATH_TEMPLATE` (override them with
`agreement_template` / `agreement_path_template`).
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "self_agreement"
  return c

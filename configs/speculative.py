"""Lossless speculative decoding for `python -m decoding.generate --config=configs/speculative.py`.

Pick the drafter with `--config.drafter=NAME`: `self` (the target's first `draft_layers`
layers + head, the default), `model` (a separate `draft_model`), `prompt_lookup` (drafts
copied from the prompt, IAD), `dyspec` (a DySpec token tree from the self-draft or
`draft_model`), `gad` and `eagle` (trained drafters); each drafter's fields and defaults are
its settings type (decoding/speculative/). Greedy by default: the output is token for token
that of `--config.strategy=greedy`; `--config.do_sample=True` samples from the same
distribution as `--config.strategy=sample`.
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "speculative"
  return c

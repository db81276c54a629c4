"""Greedy decoding: the argmax of the processed next-token distribution at every step.

Each output carries its G-NLL, the uncertainty score of "Rethinking Uncertainty Estimation
in Natural Language Generation" (Aichberger, Schweighofer, Hochreiter): the negative
log-likelihood of the greedy output under the raw model, -sum_t log max_v p(v | x, y_<t).
"""
from __future__ import annotations

from decoding import token_loop
from decoding.settings import Penalties, settings
from decoding.strategy import Strategy


@settings
class Greedy(Penalties):
  """Greedy decoding (Hugging Face's `do_sample=False`, `num_beams=1`)."""


def prepare(s: Greedy, target, resources):
  return token_loop.make_run(target, s.penalty_processors(target.eos_ids),
                           token_loop.greedy_select, s.max_new_tokens)


STRATEGY = Strategy("greedy", Greedy, "argmax of the processed distribution; each output "
                    "carries its G-NLL", prepare=prepare, greedy_equivalent=lambda s: True,
                    shares_prefix=True, speech=True)

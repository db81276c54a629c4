"""Ancestral sampling after Hugging Face's processors and warpers.

Each step draws one token per row from softmax(processed logits) with the row's own key
folded with the step. `num_return_sequences = R` samples per prompt come from one prefill
(the prompt's cache is copied to its R rows); sample r of a row uses the row's key folded
with r (r >= 1), so sample 0 is what R = 1 gives.
"""
from __future__ import annotations

from typing import ClassVar

from decoding import processors, token_loop
from decoding.settings import Penalties, Warpers, check_int, settings
from decoding.strategy import Strategy


@settings
class Sample(Penalties, Warpers):
  """Ancestral sampling (Hugging Face's `do_sample=True`, `num_beams=1`)."""
  num_return_sequences: int = 1
  sampling: ClassVar[bool] = True

  def validate(self) -> None:
    super().validate()
    check_int("num_return_sequences", self.num_return_sequences, 1)

  def logits_processor(self, eos_ids) -> processors.Chain:
    return processors.chain(self.penalty_processors(eos_ids), self.warper_processors())


def prepare(s: Sample, target, resources):
  return token_loop.make_run(target, s.logits_processor(target.eos_ids),
                           token_loop.sample_select, s.max_new_tokens)


STRATEGY = Strategy("sample", Sample, "ancestral sampling after the Hugging Face warpers; "
                    "num_return_sequences samples per prompt", prepare=prepare,
                    rows_per_prompt=lambda s: s.num_return_sequences, shares_prefix=True,
                    speech=True)

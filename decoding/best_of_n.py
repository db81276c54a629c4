"""Best-of-N: sample N responses per prompt, then keep one.

The N responses come from one batched decode (`decoding.sampling`: the prompt is
prefilled once and sample r uses the row's key folded with r, so the first N samples do not
depend on N); one is then picked by

* `self_certainty`: the response with the largest self-certainty, from "Scalable Best-of-N
  Selection for Large Language Models via Self-Certainty" (Kang, Zhao, Song):
  SC(y) = (1/n) sum_t KL(U || p_t), computed from the full fp32 distributions seen while
  decoding (the same numbers teacher-forced re-scoring gives, see decoding/scoring.py);
* `likelihood` / `mean_likelihood`: the largest sum / mean of log p(y_t), the G-NLL-style
  sequence likelihood of "Rethinking Uncertainty Estimation in Natural Language Generation";
* `borda`: Borda voting over extracted answers (same self-certainty paper): responses are
  ranked by SC (r = 1 best) and each gives (N - r + 1)^p votes to its extracted answer;
  responses without an answer give none; the answer with most votes wins (ties: the one
  whose best response ranks higher), and the highest-SC response with that answer is
  returned. p = 0 is majority vote (`majority`), which is self-consistency.

Answers are extracted from the decoded text by an extractor of `decoding.answers`.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Optional, Sequence

import numpy as np

from decoding import answers as answers_lib
from decoding.answers import AnswerExtractor
from decoding.errors import GenerationError
from decoding.results import Generation
from decoding.sampling import Sample
from decoding.settings import (Penalties, Warpers, check_choice, check_int, check_real, convert,
                               settings)
from decoding.strategy import Strategy

SELECTIONS = ("self_certainty", "likelihood", "mean_likelihood", "borda", "majority")
ANSWER_BASED = ("borda", "majority")


def rank_by(values: Sequence[float]) -> np.ndarray:
  """Order of responses by decreasing value (ties: lower index first; nan last)."""
  v = np.asarray(values, np.float64)
  v = np.where(np.isnan(v), -np.inf, v)
  return np.argsort(-v, kind="stable")


def borda_votes(answers: Sequence[Optional[str]], certainty: Sequence[float],
                power: float) -> dict[str, float]:
  """Votes per distinct answer: the response of rank r (1 = most certain) gives (N-r+1)^p."""
  n = len(answers)
  votes: dict[str, float] = {}
  for r, i in enumerate(rank_by(certainty), start=1):
    if answers[i] is not None:
      votes[answers[i]] = votes.get(answers[i], 0.0) + float((n - r + 1) ** power)
  return votes


def select(candidates: Sequence[Generation], selection: str, answers=None,
           borda_power: float = 0.5) -> tuple[int, dict]:
  """Index of the chosen candidate, and a JSON-able record of how it was chosen."""
  check_choice("selection", selection, SELECTIONS)
  sc = [c.self_certainty if c.self_certainty is not None else math.nan for c in candidates]
  info: dict = {"selection": selection}
  if selection == "self_certainty":
    return int(rank_by(sc)[0]), info
  if selection in ("likelihood", "mean_likelihood"):
    ll = [-c.nll / (max(len(c.output_ids), 1) if selection == "mean_likelihood" else 1)
          for c in candidates]
    return int(rank_by(ll)[0]), info
  if answers is None:
    raise GenerationError(f"selection {selection!r} needs extracted answers")
  power = 0.0 if selection == "majority" else borda_power
  votes = borda_votes(answers, sc, power)
  info["votes"] = votes
  order = rank_by(sc)
  if not votes:  # no response has an answer: fall back to the most certain one
    return int(order[0]), info
  best_rank = {}
  for r, i in enumerate(order):
    if answers[i] is not None:
      best_rank.setdefault(answers[i], (r, int(i)))
  winner = max(votes, key=lambda a: (votes[a], -best_rank[a][0]))
  return best_rank[winner][1], info


def decode_text(tokenizer, ids: Sequence[int]) -> str:
  return tokenizer.decode(list(ids), skip_special_tokens=True)


def choose(groups: list[list[Generation]], selection: str, extract: Optional[AnswerExtractor],
           tokenizer, borda_power: float) -> list[Generation]:
  """Applies the selection rule to each prompt's candidates; records the choice in extras."""
  out = []
  for cands in groups:
    answers = None
    if extract is not None and tokenizer is not None:
      answers = [extract(decode_text(tokenizer, c.output_ids)) for c in cands]
    idx, info = select(cands, selection, answers, borda_power)
    g = cands[idx]
    g.extras = dict(info, selected=idx, num_samples=len(cands),
                    candidate_self_certainty=[c.self_certainty for c in cands],
                    candidate_nll=[c.nll for c in cands])
    if answers is not None:
      g.extras["answer"] = answers[idx]
      g.extras["candidate_answers"] = answers
    g.rank = 0
    out.append(g)
  return out


def group_by_prompt(gens: list[Generation], num_prompts: int) -> list[list[Generation]]:
  groups: list[list[Generation]] = [[] for _ in range(num_prompts)]
  for g in gens:
    groups[g.index].append(g)
  return groups


@settings
class BestOfN(Penalties, Warpers):
  """Best-of-N selection. Temperature 0.7 and 128 new tokens are our defaults for sampled
  reasoning (the paper's settings are not confirmed)."""
  max_new_tokens: int = 128
  temperature: float = 0.7
  num_samples: int = 8  # N
  selection: str = "self_certainty"  # SELECTIONS
  borda_power: float = 0.5  # p in (N - r + 1)^p (the paper's script default); 0 = majority
  answer_extractor: str = "last_number"  # decoding.answers.ANSWER_EXTRACTORS
  sampling: ClassVar[bool] = True

  def validate(self) -> None:
    super().validate()
    check_int("num_samples", self.num_samples, 1)
    check_choice("selection", self.selection, SELECTIONS)
    check_real("borda_power", self.borda_power, 0.0)
    answers_lib.get_extractor(self.answer_extractor)

  def sample_settings(self) -> Sample:
    """The sampling stage: this request's processors, num_samples sequences per prompt."""
    return convert(self, Sample, num_return_sequences=self.num_samples)


def best_of_n(s: BestOfN, target, prompts, generate: Callable,
              extract: Optional[AnswerExtractor] = None) -> list[Generation]:
  """Samples `num_samples` responses per prompt (`generate(prompts, settings)` runs the
  sampling stage) and returns the selected one per prompt. `extract` overrides
  `s.answer_extractor`. Answer-based selections need the target's tokenizer."""
  if s.selection in ANSWER_BASED and target.tokenizer is None:
    raise GenerationError(f"selection {s.selection!r} extracts answers from text: the model "
                          "needs a tokenizer")
  groups = group_by_prompt(generate(prompts, s.sample_settings()), len(prompts))
  return choose(groups, s.selection, extract or answers_lib.get_extractor(s.answer_extractor),
                target.tokenizer, float(s.borda_power))


STRATEGY = Strategy("best_of_n", BestOfN, "N samples, one selected by self-certainty, "
                    "likelihood, Borda or majority vote", pipeline=best_of_n)

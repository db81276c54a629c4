"""What a request returns: one `Generation` per output sequence, and its JSON form."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence

import numpy as np

SCORE_KINDS = {
    "log_likelihood": "sum of token_logprobs (the raw model's log-likelihood of the output)",
    "beam_score": "the beam search score: sum of processed_logprobs / length ** length_penalty "
                  "(Hugging Face's sequences_scores)",
    "draft_score": "superposed decoding's draft score: sum of processed_logprobs (the n-gram "
                   "smoothed increments)",
}


def self_certainty(mean_logp: np.ndarray, vocab_size: int) -> float:
  """SC = (1/n) sum_t KL(U || p_t) = -(1/n) sum_t mean_logp_t - log V, in float64 on the host
  ("Scalable Best-of-N Selection for Large Language Models via Self-Certainty")."""
  mean_logp = np.asarray(mean_logp, np.float64)
  if mean_logp.size == 0:
    return float("nan")
  return float(-mean_logp.mean() - math.log(vocab_size))


@dataclasses.dataclass
class Generation:
  """One generated sequence. With num_return_sequences = R > 1 a prompt has R of them,
  consecutive and best first (as Hugging Face returns them); `index` is the prompt's
  position in the request and `rank` the sequence's rank for that prompt."""
  prompt_ids: list[int]
  output_ids: list[int]
  token_logprobs: list[float]  # log p_model(token) under the raw model, fp32
  processed_logprobs: list[float]  # under the processed distribution (beam: score increments)
  score: float  # what `score_kind` says (`SCORE_KINDS`)
  finished: bool  # ended with EOS
  index: int = 0
  rank: int = 0
  score_kind: str = "log_likelihood"
  token_entropy: Optional[list[float]] = None  # entropy of p_model at each position
  self_certainty: Optional[float] = None  # mean_t KL(U || p_t) over the output
  gnll: Optional[float] = None  # -sum log p of the output, when it is the greedy output
  extras: dict = dataclasses.field(default_factory=dict)  # strategy-specific results

  @property
  def nll(self) -> float:
    """Negative log-likelihood of the output under the raw model."""
    return -float(sum(self.token_logprobs))

  def to_json(self, **fields) -> dict:
    """Every field as JSON-able values, the extras merged in (those JSON can hold), plus
    `fields` (e.g. the decoded text); a strategy's extra never replaces a field."""
    row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extras"}
    row.update(fields)
    for k, v in self.extras.items():
      if k not in row and _jsonable(v):
        row[k] = v
    return row

  @classmethod
  def from_json(cls, row: dict) -> "Generation":
    """The Generation a `to_json` row describes: its fields by name, every other key (the
    strategy's extras and added fields such as `text`) in `extras`. JSON keeps floats
    exactly, so a row read back gives the same scores, log-probs and self-certainty."""
    names = {f.name for f in dataclasses.fields(cls) if f.name != "extras"}
    return cls(**{k: v for k, v in row.items() if k in names},
               extras={k: v for k, v in row.items() if k not in names})


def _jsonable(v) -> bool:
  try:
    json.dumps(v)
    return True
  except (TypeError, ValueError):
    return False


def to_generations(res, prompts: Sequence[Sequence[int]], indices: Sequence[int],
                   vocab_size: int, score_kind: str, greedy: bool) -> list[Generation]:
  """Host-side conversion of a (device_get) `DecodeResult` with rows [B, ...] or [B, R, ...]
  (the first len(prompts) rows are real; the rest is bucket padding)."""
  out = []
  multi = np.ndim(res.lengths) == 2
  for i, p in enumerate(prompts):
    for r in (range(res.lengths.shape[1]) if multi else [None]):
      at = (i, r) if multi else (i,)
      L = int(res.lengths[at])
      rec = res.record
      tlp = [float(x) for x in rec.token_logprobs[at][:L]]
      g = Generation(prompt_ids=[int(t) for t in p],
                     output_ids=[int(t) for t in rec.tokens[at][:L]], token_logprobs=tlp,
                     processed_logprobs=[float(x) for x in rec.processed_logprobs[at][:L]],
                     score=float(res.scores[at]), finished=bool(res.finished[at]),
                     index=int(indices[i]), rank=0 if r is None else r, score_kind=score_kind,
                     token_entropy=[float(x) for x in rec.token_entropy[at][:L]])
      if L:
        g.self_certainty = self_certainty(rec.token_mean_logp[at][:L], vocab_size)
      for k, val in (res.extras or {}).items():
        g.extras[k] = np.asarray(val[at]).item()
      if greedy:
        g.gnll = -float(np.sum(np.asarray(tlp, np.float64)))
      out.append(g)
  return out

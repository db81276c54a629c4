"""Teacher-forced scoring of given continuations, and the sequence-level scores built on it.

`score_continuations(lm, params, prompts, continuations)` runs each prompt followed by
its continuation through the model in one cache-free, causal pass and returns, for
every continuation token y_t, fp32 statistics of the full next-token distribution
p_t = p(. | x, y_<t):

* log p_t(y_t)                      (`token_logprobs`)
* H(p_t) = -sum_v p_t(v) log p_t(v) (`entropy`)
* (1/V) sum_v log p_t(v)            (`mean_logp`, for self-certainty)
* log max_v p_t(v)                  (`max_logp`; y_t is the greedy token iff they are equal)
* rank of y_t among the V logits    (`rank`, 0 = argmax)

and from them:

* NLL(y|x) = -sum_t log p_t(y_t). For the greedy output this is G-NLL, the uncertainty
  score of "Rethinking Uncertainty Estimation in Natural Language Generation"
  (Aichberger, Schweighofer, Hochreiter): G-NLL(x) = -sum_t log max_v p(v | x, y_<t).
  It is defined at temperature 1; at T != 1 the distribution, hence the score, changes
  (a greedy *sequence* is temperature-invariant, its likelihood is not).
* Self-certainty, from "Scalable Best-of-N Selection for Large Language Models via
  Self-Certainty" (Kang, Zhao, Song): SC(y) = (1/n) sum_t KL(U || p_t)
  = -(1/n) sum_t (1/V) sum_v log p_t(v) - log V  (>= 0, 0 for uniform p_t).

Everything is computed from fp32 log-softmax: one underflowed probability would make
the mean log-prob -inf. Batches are ragged (right-padded, positions from 0 per row), and
shapes are bucketed like generation's, so new requests do not recompile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decoding.errors import GenerationError
from decoding.records import distribution_stats
from decoding.results import self_certainty
from decoding.runner import bucket, validate_prompts

Array = jax.Array


@flax.struct.dataclass
class TokenStats:
  """Per-position statistics of teacher-forced scoring; arrays [B, C], 0 beyond length."""
  token_logprobs: Array
  entropy: Array
  mean_logp: Array
  max_logp: Array
  rank: Array  # int32


@dataclasses.dataclass
class ContinuationScore:
  """Scores of one continuation (numpy arrays of its length n)."""
  token_logprobs: np.ndarray
  entropy: np.ndarray
  mean_logp: np.ndarray
  max_logp: np.ndarray
  rank: np.ndarray
  vocab_size: int

  @property
  def nll(self) -> float:
    """-sum_t log p(y_t | x, y_<t); equals G-NLL when the continuation is the greedy one."""
    return -float(np.sum(self.token_logprobs, dtype=np.float64))

  @property
  def mean_nll(self) -> float:
    return self.nll / max(len(self.token_logprobs), 1)

  @property
  def self_certainty(self) -> float:
    """(1/n) sum_t KL(U || p_t); nan for an empty continuation."""
    return self_certainty(self.mean_logp, self.vocab_size)

  @property
  def is_greedy(self) -> bool:
    """Whether every token is its step's argmax (so `nll` is the G-NLL of the prompt)."""
    return bool(np.all(self.rank == 0))


def stats_from_logits(logits: Array, tokens: Array, temperature: float = 1.0) -> TokenStats:
  """Statistics of softmax(logits / T) at each position. logits [B, C, V], tokens [B, C]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  tok_lp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  entropy, mean_logp = distribution_stats(logp)
  rank = jnp.sum(logp > tok_lp[..., None], axis=-1).astype(jnp.int32)
  return TokenStats(token_logprobs=tok_lp, entropy=entropy, mean_logp=mean_logp,
                    max_logp=logp.max(axis=-1), rank=rank)


@functools.partial(jax.jit, static_argnames=("lm", "num_positions", "temperature"))
def score_tokens(lm, params, tokens: Array, prompt_len: Array, cont_len: Array, *,
                 num_positions: int, temperature: float = 1.0) -> TokenStats:
  """Teacher-forced statistics of tokens[b, prompt_len[b] : prompt_len[b] + cont_len[b]].

  tokens: [B, T] int32, prompt then continuation, right-padded; prompt_len >= 1.
  num_positions: C >= max(cont_len), the (static) number of scored slots per row.
  Returns TokenStats with arrays [B, C].
  """
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
  # The logits at position prompt_len - 1 + t predict continuation token t.
  at = prompt_len[:, None] - 1 + jnp.arange(num_positions)[None]
  at = jnp.clip(at, 0, T - 1)
  logits = lm(params, tokens, positions, None, logits_at=at).logits  # [B, C, V]
  targets = jnp.take_along_axis(tokens, jnp.clip(at + 1, 0, T - 1), axis=1)
  stats = stats_from_logits(logits, targets, temperature)
  valid = jnp.arange(num_positions)[None] < cont_len[:, None]
  return jax.tree.map(lambda x: jnp.where(valid, x, jnp.zeros_like(x)), stats)


def score_continuations(lm, params, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], batch_size: int = 8,
                        temperature: float = 1.0, pad_id: int = 0) -> list[ContinuationScore]:
  """Scores continuations[i] after prompts[i] (token ids) under the model; see the module doc.

  Raises GenerationError (before compiling) for empty prompts, ids outside the vocabulary,
  mismatched lengths, or sequences longer than the model's context.
  """
  if len(prompts) != len(continuations):
    raise GenerationError(f"{len(prompts)} prompts but {len(continuations)} continuations")
  validate_prompts(prompts, lm.vocab_size)
  for i, c in enumerate(continuations):
    arr = np.asarray(c, np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= lm.vocab_size):
      raise GenerationError(f"continuation {i} has token ids outside [0, {lm.vocab_size})")
  if not temperature > 0:
    raise GenerationError(f"temperature must be > 0, got {temperature}")
  total = max(len(p) + len(c) for p, c in zip(prompts, continuations))
  if total > lm.max_positions:
    raise GenerationError(
        f"prompt + continuation of {total} tokens exceeds the model's context of "
        f"{lm.max_positions} positions")
  T = bucket(total)
  C = bucket(max(max(len(c) for c in continuations), 1))
  out: list[ContinuationScore] = []
  for start in range(0, len(prompts), batch_size):
    ps, cs = prompts[start:start + batch_size], continuations[start:start + batch_size]
    B = min(batch_size, bucket(len(ps), minimum=1))
    tokens = np.full((B, T), pad_id, np.int32)
    plen, clen = np.ones((B,), np.int32), np.zeros((B,), np.int32)
    for b, (p, c) in enumerate(zip(ps, cs)):
      tokens[b, :len(p)] = p
      tokens[b, len(p):len(p) + len(c)] = c
      plen[b], clen[b] = len(p), len(c)
    stats = jax.device_get(score_tokens(lm, params, jnp.asarray(tokens), jnp.asarray(plen),
                                        jnp.asarray(clen), num_positions=C,
                                        temperature=float(temperature)))
    for b in range(len(ps)):
      n = int(clen[b])
      out.append(ContinuationScore(
          token_logprobs=np.asarray(stats.token_logprobs[b, :n]),
          entropy=np.asarray(stats.entropy[b, :n]), mean_logp=np.asarray(stats.mean_logp[b, :n]),
          max_logp=np.asarray(stats.max_logp[b, :n]), rank=np.asarray(stats.rank[b, :n]),
          vocab_size=lm.vocab_size))
  return out


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
  """Area under the ROC curve of `scores` as a predictor of `labels` (higher = positive).

  The Mann-Whitney statistic with ties counted as 1/2: the probability that a random
  positive outscores a random negative. nan when either class is empty.
  """
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels, bool)
  pos, neg = s[y], s[~y]
  if pos.size == 0 or neg.size == 0:
    return float("nan")
  greater = (pos[:, None] > neg[None, :]).sum()
  ties = (pos[:, None] == neg[None, :]).sum()
  return float((greater + 0.5 * ties) / (pos.size * neg.size))

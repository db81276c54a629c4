"""Momentum decoding ("Momentum Decoding: Open-ended Text Generation As Graph Exploration",
Lan, Su, Liu, Huang and Mao, 2022; reference code github.com/gmftbyGMFTBY/MomentumDecoding,
`models/utlis_ngram.py`).

Decoding walks a directed graph whose nodes are the token ids seen so far (the prompt
included, as the reference builds its graph from the whole prefix) and whose edges are the
observed transitions. Going back to a node closes a loop; the longer the loop repeats
recent text, the more "resistance" it meets. At each step, over the top-k candidates v of
p(v | context) (by logit),

    l(v) = 0                      if v is not yet a node (not in the row's context),
           max {n in 2..N : the n-gram (last n-1 tokens, v) already occurred in the context}
           1                      if v is a node but no such n-gram exists,
    s(v) = p(v | context) - alpha * R(l(v))        (probability space, not log),

and the emitted token is argmax_v s(v); tokens outside the top k are never chosen. N is
`momentum_max_ngram` (the reference's `max_length=5`). Ties in s go to the candidate with
the higher logit (the reference's `max` over the rank-ordered top-k list); if every
candidate has infinite resistance, every score is -inf and the top-1 candidate is emitted
(as `torch.max` over all -inf picks index 0), so decoding never stalls.

Resistance functions R (`momentum_resistance`, all from the reference code):
  "ours" (alias "block", the repo default, "for N-gram blocking"): R = 0 for l <= 3,
      5.0 for l = 4 and inf for l >= 5; with alpha = 0.2 a 4-gram repeat costs 1.0 (more
      than any probability) and a 5-gram repeat is never emitted while some candidate can be.
  "linear": the mapping commented "for GPT2-XL": R(l) = l for l <= 5, inf beyond.
  "constant": R = 0 for l = 0, else 2.
  "log": R = 0 for l = 0, else log_6(1 + l) / 0.2.
  "exp": R = 0 for l = 0, else 1.5**l / 2.
The penalty alpha * R(l) is formed in float64 on the host with 0 * inf = 0, so alpha = 0
is exactly greedy decoding (the reference's literal arithmetic would give NaN there).

Jit layout: the token graph is the sequence buffer of the core loop itself (row b's
context is `sequences[b, :seq_len[b]]`; its edges are consecutive pairs). Per step, each
position j gets the length m_j of the common suffix of the context before j and the whole
context (at most N - 1, from N - 1 shifted comparisons, [B, S, N-1]); candidate v's loop
length is then max_{j : token_j = v} m_j + 1, a scatter-max into a [B, V] table. The cost is
O(S * N + V) per row, independent of k. Momentum is a logits processor composed after the
user's processors (repetition penalty, n-gram bans, ...): p is the softmax of those
processed logits, candidates they ban (-inf) are never chosen, and the core loop's greedy
selector emits the argmax. The processed log-probs recorded by the loop are the
log-softmax of the momentum scores (a ranking, not a model distribution).

Top-k [UNCONFIRMED in the paper]: the default k = 5 is the repo's usage example
(`test.py`, `show_greedy_md.py`, with "ours" and alpha = 0.2); its benchmark script uses
k = 2000 "for 4-gram block". k larger than the vocabulary means the whole vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from decoding import processors, token_loop
from decoding.processors import ProcessorContext
from decoding.settings import Penalties, check_choice, check_int, check_real, settings
from decoding.strategy import Strategy

Array = jax.Array
INF = math.inf


def _ours(l: int) -> float:
  return 0.0 if l <= 3 else 5.0 if l == 4 else INF


def _linear(l: int) -> float:
  return float(l) if l <= 5 else INF


def _constant(l: int) -> float:
  return 0.0 if l == 0 else 2.0


def _log(l: int) -> float:
  return 0.0 if l == 0 else math.log(1 + l, 6) / 0.2


def _exp(l: int) -> float:
  return 0.0 if l == 0 else 1.5 ** l / 2


# R(loop length) by name.
RESISTANCES: dict[str, Callable[[int], float]] = {
    "ours": _ours, "block": _ours, "linear": _linear, "constant": _constant, "log": _log,
    "exp": _exp}


def penalty_table(alpha: float, resistance: str, max_ngram: int) -> np.ndarray:
  """[max_ngram + 1] float32: alpha * R(l) for l = 0..max_ngram (0 * inf taken as 0)."""
  r = RESISTANCES[resistance]
  return np.asarray([0.0 if alpha == 0 else alpha * r(l) for l in range(max_ngram + 1)],
                    np.float32)


def loop_lengths(sequences: Array, seq_len: Array, max_ngram: int, vocab_size: int) -> Array:
  """Loop length l(v) of every token v for each row's context -> [B, V] int32.

  sequences: [B, S] int32, row b's context is sequences[b, :seq_len[b]]; seq_len: [B].
  """
  B, S = sequences.shape
  pos = jnp.arange(S)
  back = jnp.arange(1, max_ngram)  # [N-1]: look-back distances 1..N-1
  # prev[b, j, i-1] = token at j - i; tail[b, i-1] = token at seq_len - i.
  prev = sequences[:, jnp.clip(pos[:, None] - back[None, :], 0, S - 1)]  # [B, S, N-1]
  tail = jnp.take_along_axis(sequences, jnp.clip(seq_len[:, None] - back[None, :], 0, S - 1),
                             axis=1)  # [B, N-1]
  same = ((prev == tail[:, None, :]) & (pos[:, None] >= back[None, :])[None]).astype(jnp.int32)
  suffix = jnp.sum(jnp.cumprod(same, axis=-1), axis=-1)  # [B, S]: common suffix, <= N-1
  valid = pos[None, :] < seq_len[:, None]
  rows = jnp.arange(B)[:, None]
  return jnp.zeros((B, vocab_size), jnp.int32).at[
      rows, jnp.clip(sequences, 0, vocab_size - 1)].max(jnp.where(valid, suffix + 1, 0))


def momentum_scores(logits: Array, ctx: ProcessorContext, penalty: Array, top_k: int,
                    max_ngram: int) -> Array:
  """[B, V] scores p(v) - alpha R(l(v)) on the top-k candidates, -inf elsewhere.

  penalty: [max_ngram + 1] alpha * R(l). The chosen candidate (highest score, ties and the
  all-blocked case resolved toward the higher logit) is raised by one ulp so that the
  greedy argmax over the vocabulary returns exactly it.
  """
  B, V = logits.shape
  k = min(top_k, V)
  top_logits, ids = jax.lax.top_k(logits, k)  # [B, k], by decreasing logit
  probs = jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), ids, axis=1)
  l = jnp.take_along_axis(loop_lengths(ctx.sequences, ctx.seq_len, max_ngram, V), ids, axis=1)
  s = jnp.where(top_logits > -jnp.inf, probs - penalty[l], -jnp.inf)  # [B, k]
  best = jnp.argmax(s, axis=-1)  # first maximum: highest logit among ties
  rows = jnp.arange(B)
  s = s.at[rows, best].set(jnp.nextafter(s[rows, best], jnp.inf))
  return jnp.full((B, V), -jnp.inf, jnp.float32).at[rows[:, None], ids].set(s)


@dataclasses.dataclass(frozen=True)
class MomentumScores(processors.Processor):
  """The momentum scores as a logits processor, composed after the user's processors."""
  alpha: float
  top_k: int
  max_ngram: int
  resistance: str
  reads_context: ClassVar[bool] = True

  def __call__(self, logits: Array, ctx: ProcessorContext) -> Array:
    penalty = jnp.asarray(penalty_table(self.alpha, self.resistance, self.max_ngram))
    return momentum_scores(logits, ctx, penalty, self.top_k, self.max_ngram)


@settings
class Momentum(Penalties):
  """Momentum decoding; defaults from the reference code (alpha = 0.2 in `inference.py`,
  loops up to 5-grams, resistance "ours", k = 5 candidates as in its `test.py`)."""
  momentum_alpha: float = 0.2
  momentum_top_k: int = 5
  momentum_max_ngram: int = 5
  momentum_resistance: str = "ours"  # see RESISTANCES

  def validate(self) -> None:
    super().validate()
    check_choice("momentum_resistance", self.momentum_resistance, sorted(RESISTANCES))
    check_real("momentum_alpha", self.momentum_alpha, 0.0)
    check_int("momentum_top_k", self.momentum_top_k, 1)
    check_int("momentum_max_ngram", self.momentum_max_ngram, 2)

  def logits_processor(self, eos_ids) -> processors.Chain:
    return processors.chain(self.penalty_processors(eos_ids), MomentumScores(
        float(self.momentum_alpha), int(self.momentum_top_k), int(self.momentum_max_ngram),
        str(self.momentum_resistance)))


def prepare(s: Momentum, target, resources):
  return token_loop.make_run(target, s.logits_processor(target.eos_ids),
                           token_loop.greedy_select, s.max_new_tokens)


STRATEGY = Strategy("momentum", Momentum, "momentum decoding over the token graph",
                    prepare=prepare)

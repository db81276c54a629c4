"""The per-token record every decoding loop keeps, and the result every array strategy returns.

One `TokenRecord` pytree holds, for each generated position, the token and four fp32
statistics of the model's next-token distribution there: the raw model's log-probability
of the token, its log-probability under the processed distribution the strategy chose
from (for beam-type strategies: the token's increment of the search score), and the
entropy and mean log-probability of the raw distribution (the terms of self-certainty,
"Scalable Best-of-N Selection for Large Language Models via Self-Certainty"). Greedy and
sampled decoding, speculative decoding, beam search and superposed decoding all build
their records with `token_stats`, write them with `TokenRecord.write` and mask them with
`TokenRecord.finalize`, so every strategy reports the same numbers the same way.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from models import batch_invariant

Array = jax.Array


def is_batch_invariant(lm) -> bool:
  """Whether `lm` runs in the batch-invariant mode (`models.batch_invariant`); its records
  are then summed in a fixed order too (`log_softmax`, `distribution_stats`)."""
  return bool(getattr(getattr(lm, "config", None), "batch_invariant", False))


def log_softmax(logits: Array, invariant: bool = False) -> Array:
  """fp32 log-softmax over the last axis. `invariant`: the normalizer is a pairwise tree sum
  (`models.batch_invariant.tree_sum`), so a row's values do not depend on how many rows the
  call has (XLA:CPU's own reduction can change with the batch shape: seen at V = 576)."""
  x = logits.astype(jnp.float32)
  if not invariant:
    return jax.nn.log_softmax(x, axis=-1)
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))  # exact in any order
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  shifted = x - m
  return shifted - jnp.log(batch_invariant.tree_sum(jnp.exp(shifted)))[..., None]


def distribution_stats(logp: Array, invariant: bool = False) -> tuple[Array, Array]:
  """(entropy, mean log-prob over the vocabulary) of fp32 log-probs [..., V] -> [...].

  Tokens with probability 0 (log p = -inf) add nothing to the entropy; the mean
  log-prob is then -inf, as it should be (self-certainty is unbounded there).
  `invariant`: both sums are pairwise tree sums (see `log_softmax`).
  """
  logp = logp.astype(jnp.float32)
  p = jnp.exp(logp)
  terms = jnp.where(p > 0, p * logp, 0.0)
  if invariant:
    return (-batch_invariant.tree_sum(terms),
            # a product by 1/V rounds the same for any number of rows; a division
            # by V was seen to round differently for 1 and 8 rows on XLA:CPU
            batch_invariant.tree_sum(logp) * (1.0 / logp.shape[-1]))
  return -jnp.sum(terms, axis=-1), jnp.mean(logp, axis=-1)


@flax.struct.dataclass
class TokenRecord:
  """Per-position records, arrays [..., N]; beyond a sequence's length: pad_id / 0."""
  tokens: Array  # int32
  token_logprobs: Array  # log p_model(token), raw model, fp32
  processed_logprobs: Array  # log-prob under the processed distribution (or score increment)
  token_entropy: Array  # entropy of the raw model distribution at the position
  token_mean_logp: Array  # (1/V) sum_v log p_model(v) at the position

  @classmethod
  def empty(cls, shape: tuple[int, ...], pad_id: int) -> "TokenRecord":
    zeros = jnp.zeros(shape, jnp.float32)
    return cls(tokens=jnp.full(shape, pad_id, jnp.int32), token_logprobs=zeros,
               processed_logprobs=zeros, token_entropy=zeros, token_mean_logp=zeros)

  def write(self, start: Array, values: "TokenRecord", count: Optional[Array] = None
            ) -> "TokenRecord":
    """Writes values[..., j] at position start + j for j < count (per leading index).

    self: [..., N]; values: [..., J]; start and count: [...] (or scalars, broadcast);
    count defaults to J. Positions past N are dropped.
    """
    lead, N = self.tokens.shape[:-1], self.tokens.shape[-1]
    J = values.tokens.shape[-1]
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), lead)
    count = jnp.broadcast_to(jnp.asarray(J if count is None else count, jnp.int32), lead)
    j = jnp.arange(J)
    idx = jnp.where(j < count[..., None], start[..., None] + j, N)  # N: out of range, dropped
    flat_idx = idx.reshape(-1, J)
    rows = jnp.arange(flat_idx.shape[0])[:, None]

    def put(arr, val):
      flat = arr.reshape(-1, N)
      out = flat.at[rows, flat_idx].set(val.reshape(-1, J).astype(arr.dtype), mode="drop")
      return out.reshape(arr.shape)
    return jax.tree.map(put, self, values)

  def finalize(self, lengths: Array, pad_id: int) -> "TokenRecord":
    """The record with every position >= lengths[...] reset (pad_id / 0)."""
    valid = jnp.arange(self.tokens.shape[-1]) < lengths[..., None]
    return TokenRecord(
        tokens=jnp.where(valid, self.tokens, pad_id),
        **{k: jnp.where(valid, getattr(self, k), 0.0) for k in (
            "token_logprobs", "processed_logprobs", "token_entropy", "token_mean_logp")})


def token_stats(tokens: Array, raw_logp: Array, processed_logp: Array,
                invariant: bool = False) -> TokenRecord:
  """The record of `tokens` [...] chosen from raw model log-probs `raw_logp` [..., V] (fp32
  log-softmax) and `processed_logp` [..., V] (what the strategy scored the token with);
  `invariant`: the statistics are summed in a fixed order (`distribution_stats`)."""
  pick = lambda lp: jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
  entropy, mean_logp = distribution_stats(raw_logp, invariant)
  return TokenRecord(tokens=tokens.astype(jnp.int32), token_logprobs=pick(raw_logp),
                     processed_logprobs=pick(processed_logp).astype(jnp.float32),
                     token_entropy=entropy, token_mean_logp=mean_logp)


@flax.struct.dataclass
class DecodeResult:
  """What an array strategy returns: rows [B, ...], or [B, R, ...] for strategies that give
  several sequences per prompt (beam search, superposed drafts), best first."""
  record: TokenRecord  # [B, N] or [B, R, N], finalized (pad_id / 0 beyond length)
  lengths: Array  # [B] int32 generated tokens (EOS included)
  scores: Array  # [B] float32: see `score_kind` of the strategy
  finished: Array  # [B] bool: ended with EOS
  extras: Optional[dict] = None  # per-row strategy statistics ({name: [B] array})

  @property
  def tokens(self) -> Array:
    return self.record.tokens

  @property
  def token_logprobs(self) -> Array:
    return self.record.token_logprobs

  @property
  def processed_logprobs(self) -> Array:
    return self.record.processed_logprobs

  @property
  def token_entropy(self) -> Array:
    return self.record.token_entropy

  @property
  def token_mean_logp(self) -> Array:
    return self.record.token_mean_logp

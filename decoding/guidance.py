"""Classifier-free guidance for any strategy: the conditional and unconditional streams run as
one batch, and their next-token distributions are combined before the strategy sees them.

Guided scores ("Classifier-Free Diffusion Guidance", Ho & Salimans, 2022, as used for image
tokens by LlamaGen, "Autoregressive Model Beats Diffusion", Sun et al., 2024, and for captions
by "Guiding Image Captioning Models Toward More Specific Captions", Kornblith et al., ICCV 2023):

    l_g = log_softmax(l_u + s (l_c - l_u)),   i.e.   p_g ∝ p(y | c)^s / p(y)^(s - 1),

where l_c, l_u are the conditional and unconditional logits (or log-probabilities: the two
give the same distribution, since the normalizers only add a per-row constant). s = 1 is
conditional decoding, s = 0 unconditional decoding.

A feature drafter can guide its drafts the same way: with `paired_hidden=True` the wrapper
returns both streams' final hidden states side by side ([..., 2D]), and the EAGLE drafter
(`decoding.speculative.eagle`, `guidance` set) runs its head on each stream and guides the
two draft distributions with the target's scale.

`GuidedLM` wraps a model with the `TransformerLM` boundary: the strategy sees B rows, the
wrapped model runs 2B (rows 0..B-1 conditional, B..2B-1 unconditional, in one call), and the
unconditional stream sees `null_token` at every position < `cond_len` (the condition: LlamaGen's
class token, or a caption model's conditioning prefix). Both streams are fed the same generated
tokens, so they stay aligned whatever the strategy does. Its cache (`GuidedCache`) presents B
rows to the strategy (lengths, rollback, beam reordering, tree compaction act on both streams),
so greedy, sampling, beam search, speculative decoding and Jacobi decoding all run guided
without knowing it. Every processor (temperature, top-k, ...) then applies to the guided scores.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from models.kv_cache import KVCache
from models.transformer import ForwardOutput

Array = jax.Array


def guide(cond_logits: Array, uncond_logits: Array, scale: float) -> Array:
  """Normalized guided log-probabilities l_u + s (l_c - l_u), computed in float32."""
  c = jax.nn.log_softmax(cond_logits.astype(jnp.float32), axis=-1)
  u = jax.nn.log_softmax(uncond_logits.astype(jnp.float32), axis=-1)
  return jax.nn.log_softmax(u + scale * (c - u), axis=-1)


def _pair(x: Array) -> Array:
  return jnp.concatenate([x, x], axis=0)


@flax.struct.dataclass
class GuidedCache:
  """The 2B-row cache of both streams behind a B-row interface."""
  inner: KVCache  # rows 0..B-1 conditional, B..2B-1 unconditional

  @property
  def lengths(self) -> Array:
    return self.inner.lengths[: self.batch_size]

  @property
  def max_len(self) -> int:
    return self.inner.max_len

  @property
  def batch_size(self) -> int:
    return self.inner.batch_size // 2

  def with_lengths(self, lengths: Array) -> "GuidedCache":
    return GuidedCache(self.inner.with_lengths(_pair(jnp.asarray(lengths, jnp.int32))))

  def rollback(self, lengths: Array) -> "GuidedCache":
    return GuidedCache(self.inner.rollback(_pair(jnp.asarray(lengths, jnp.int32))))

  def take_rows(self, rows: Array) -> "GuidedCache":
    B = self.batch_size
    rows = jnp.asarray(rows, jnp.int32)
    return GuidedCache(self.inner.take_rows(jnp.concatenate([rows, rows + B])))

  def compact(self, start: Array, src: Array) -> "GuidedCache":
    return GuidedCache(self.inner.compact(_pair(start), _pair(src)))


@dataclasses.dataclass(frozen=True)
class TwoStreamLM:
  """The base of wrappers that run `lm` on 2B rows (two streams of the same prompts) behind
  a B-row model boundary, with a `GuidedCache`."""
  lm: Any

  @property
  def vocab_size(self) -> int:
    return self.lm.vocab_size

  @property
  def max_positions(self) -> int:
    return self.lm.max_positions

  @property
  def config(self):
    return self.lm.config

  def init_cache(self, batch_size: int, max_len: int) -> GuidedCache:
    return GuidedCache(self.lm.init_cache(2 * batch_size, max_len))

  def embed(self, params, tokens: Array) -> Array:
    return self.lm.embed(params, tokens)


@dataclasses.dataclass(frozen=True)
class GuidedLM(TwoStreamLM):
  """`lm` under classifier-free guidance with scale `scale` (see the module docstring)."""
  scale: float
  null_token: int
  cond_len: int = 1
  paired_hidden: bool = False  # hidden [..., 2D]: both streams' features (guided drafting)

  def __post_init__(self):
    if not 0 <= int(self.null_token) < self.lm.vocab_size:
      raise ValueError(f"null_token {self.null_token} is outside the vocabulary "
                       f"[0, {self.lm.vocab_size})")
    if int(self.cond_len) < 1:
      raise ValueError(f"cond_len must be >= 1, got {self.cond_len}")

  def __call__(self, params, tokens: Optional[Array], positions: Array, cache: GuidedCache,
               attn_mask: Optional[Array] = None, embeds: Optional[Array] = None,
               logits_at: Optional[Array] = None,
               cache_mask: Optional[Array] = None) -> ForwardOutput:
    if embeds is not None:
      raise ValueError("classifier-free guidance needs token inputs (the unconditional "
                       "stream replaces the condition tokens)")
    B = tokens.shape[0]
    uncond = jnp.where(positions < self.cond_len, jnp.int32(self.null_token), tokens)

    def maybe_pair(x):  # per-row masks/indices get the second stream's copy
      return _pair(x) if x is not None and x.ndim >= 2 and x.shape[0] == B else x

    kw = {} if cache_mask is None else {"cache_mask": maybe_pair(cache_mask)}
    out = self.lm(params, jnp.concatenate([tokens, uncond]), _pair(positions),
                  None if cache is None else cache.inner, maybe_pair(attn_mask),
                  logits_at=maybe_pair(logits_at), **kw)
    logits = guide(out.logits[:B], out.logits[B:], self.scale)
    hidden = (jnp.concatenate([out.hidden[:B], out.hidden[B:]], axis=-1) if self.paired_hidden
              else out.hidden[:B])
    return ForwardOutput(logits=logits, hidden=hidden,
                         penultimate=out.penultimate[:B],
                         cache=None if out.cache is None else GuidedCache(out.cache))

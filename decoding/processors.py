"""Logits processors: small pure functions `(logits, ctx) -> logits`, composed left to right.

Each follows the semantics of the Hugging Face processor of the same name, applied
row by row to a ragged batch: a row's context is `ctx.sequences[b, :ctx.seq_len[b]]`
(its prompt followed by what it generated), so padding never counts as context.
Warpers (temperature, top-k, top-p, min-p) reshape the distribution for sampling;
the others (penalties, bans) also apply to greedy decoding.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


@flax.struct.dataclass
class ProcessorContext:
  sequences: Array  # [B, S] int32: prompt then generated tokens, right-padded
  seq_len: Array  # [B] int32: valid length of each row of `sequences`
  prompt_len: Array  # [B] int32
  step: Array  # [] or [B] int32: tokens generated so far (per row in speculative decoding)


LogitsProcessor = Callable[[Array, ProcessorContext], Array]


def chain(*processors: LogitsProcessor) -> LogitsProcessor:
  """Composes processors left to right (the first one sees the raw logits)."""
  def apply(logits: Array, ctx: ProcessorContext) -> Array:
    for p in processors:
      logits = p(logits, ctx)
    return logits
  return apply


def _context_mask(ctx: ProcessorContext) -> Array:
  return jnp.arange(ctx.sequences.shape[1])[None, :] < ctx.seq_len[:, None]


def temperature(t: float) -> LogitsProcessor:
  if not t > 0:
    raise ValueError(f"temperature must be > 0, got {t}")
  return lambda logits, ctx: logits / t


def top_k(k: int, min_tokens_to_keep: int = 1) -> LogitsProcessor:
  """Keeps the max(k, min_tokens_to_keep) highest logits (ties with the last kept one are
  kept, as in Hugging Face)."""
  if k < 1:
    raise ValueError(f"top_k must be >= 1, got {k}")

  def apply(logits, ctx):
    kk = min(max(k, min_tokens_to_keep), logits.shape[-1])
    kth = jax.lax.top_k(logits, kk)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)
  return apply


def top_p(p: float, min_tokens_to_keep: int = 1) -> LogitsProcessor:
  """Nucleus filtering: keeps the smallest top set whose probability exceeds p (and at
  least `min_tokens_to_keep` tokens)."""
  if not 0 < p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {p}")

  def apply(logits, ctx):
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= 1 - p
    remove_sorted = remove_sorted.at[..., -min_tokens_to_keep:].set(False)  # keep the best
    remove = jnp.zeros_like(remove_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)
  return apply


def min_p(p: float, min_tokens_to_keep: int = 1) -> LogitsProcessor:
  """Removes tokens whose probability is below p times the top token's probability (never
  the `min_tokens_to_keep` most likely ones)."""
  if not 0 <= p <= 1:
    raise ValueError(f"min_p must be in [0, 1], got {p}")

  def apply(logits, ctx):
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = p * probs.max(axis=-1, keepdims=True)
    if min_tokens_to_keep > 1:
      kth = jax.lax.top_k(probs, min(min_tokens_to_keep, probs.shape[-1]))[0][..., -1:]
      threshold = jnp.minimum(threshold, kth)
    return jnp.where(probs < threshold, NEG_INF, logits)
  return apply


def repetition_penalty(penalty: float) -> LogitsProcessor:
  """CTRL-style penalty on every token already in the row's context (prompt included)."""
  if not penalty > 0:
    raise ValueError(f"repetition_penalty must be > 0, got {penalty}")

  def apply(logits, ctx):
    B, V = logits.shape
    present = jnp.zeros((B, V), bool).at[
        jnp.arange(B)[:, None], jnp.clip(ctx.sequences, 0, V - 1)].max(_context_mask(ctx))
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(present, penalized, logits)
  return apply


def no_repeat_ngram(n: int) -> LogitsProcessor:
  """Bans any token that would complete an n-gram already present in the row's context."""
  if n < 1:
    raise ValueError(f"no_repeat_ngram_size must be >= 1, got {n}")

  def apply(logits, ctx):
    B, V = logits.shape
    seq, L = ctx.sequences, ctx.seq_len
    S = seq.shape[1]
    if S < n:
      return logits
    starts = jnp.arange(S - n + 1)  # candidate n-gram start positions
    # Last n-1 tokens of each row.
    tail_idx = jnp.clip(L[:, None] - (n - 1) + jnp.arange(n - 1)[None, :], 0, S - 1)
    tail = jnp.take_along_axis(seq, tail_idx, axis=1)  # [B, n-1]
    win_idx = starts[:, None] + jnp.arange(n)[None, :]  # [W, n]
    windows = seq[:, win_idx]  # [B, W, n]
    match = jnp.all(windows[:, :, : n - 1] == tail[:, None, :], axis=-1)
    match &= (starts[None, :] <= L[:, None] - n) & (L[:, None] >= n - 1)
    banned = jnp.zeros((B, V), bool).at[
        jnp.arange(B)[:, None], jnp.clip(windows[:, :, n - 1], 0, V - 1)].max(match)
    return jnp.where(banned, NEG_INF, logits)
  return apply


def min_new_tokens(m: int, eos_ids: Sequence[int]) -> LogitsProcessor:
  """Suppresses the EOS token(s) until m new tokens have been generated."""
  eos = jnp.asarray(list(eos_ids), jnp.int32)

  def apply(logits, ctx):
    ban = jnp.zeros((logits.shape[-1],), bool).at[eos].set(True)
    early = jnp.reshape(jnp.asarray(ctx.step) < m, (-1, 1))  # [1, 1] or [B, 1]
    return jnp.where(early & ban[None, :], NEG_INF, logits)
  return apply


def suppress_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
  ids = jnp.asarray(list(token_ids), jnp.int32)

  def apply(logits, ctx):
    return logits.at[:, ids].set(NEG_INF)
  return apply


def build(cfg, eos_ids: Sequence[int], sampling: bool,
          min_tokens_to_keep: int = 1) -> LogitsProcessor:
  """Processors from a generation config (any mapping with HF field names), in Hugging
  Face's order: penalties and bans first, then, only when sampling, the warpers
  temperature, top-k, top-p and min-p (each keeping at least `min_tokens_to_keep` tokens;
  HF's beam sampling keeps 1 + number of EOS ids).

  The result is cached on the parameter values, so equal configs give the same
  function object and jitted loops that take it as a static argument do not recompile.
  """
  get = lambda k, d: d if cfg.get(k) is None else cfg.get(k)
  return _build(float(get("repetition_penalty", 1.0)), int(get("no_repeat_ngram_size", 0)),
                int(get("min_new_tokens", 0)), tuple(int(e) for e in eos_ids), bool(sampling),
                float(get("temperature", 1.0)), int(get("top_k", 0)), float(get("top_p", 1.0)),
                float(get("min_p", 0.0)), int(min_tokens_to_keep))


def reads_context(cfg) -> bool:
  """Whether `build(cfg, ...)` includes processors that read the decoded context (penalties,
  n-gram bans, min_new_tokens); the warpers only look at the logits."""
  get = lambda k, d: d if cfg.get(k) is None else cfg.get(k)
  return (float(get("repetition_penalty", 1.0)) != 1.0 or int(get("no_repeat_ngram_size", 0)) > 0
          or int(get("min_new_tokens", 0)) > 0)


@functools.lru_cache(maxsize=256)
def _build(rep: float, ngram: int, min_new: int, eos_ids: tuple, sampling: bool, temp: float,
           k: int, p: float, mp: float, keep: int) -> LogitsProcessor:
  procs: list[LogitsProcessor] = []
  if rep != 1.0:
    procs.append(repetition_penalty(rep))
  if ngram:
    procs.append(no_repeat_ngram(ngram))
  if min_new and eos_ids:
    procs.append(min_new_tokens(min_new, eos_ids))
  if sampling:
    if temp != 1.0:
      procs.append(temperature(temp))
    if k:
      procs.append(top_k(k, keep))
    if p != 1.0:
      procs.append(top_p(p, keep))
    if mp:
      procs.append(min_p(mp, keep))
  return chain(*procs)

"""Logits processors: small frozen dataclasses `(logits, ctx) -> logits`, composed left to right.

Each follows the semantics of the Hugging Face processor of the same name, applied row by
row to a ragged batch: a row's context is `ctx.sequences[b, :ctx.seq_len[b]]` (its prompt
followed by what it generated), so padding never counts as context. Warpers (temperature,
top-k, top-p, min-p) reshape the distribution for sampling; the others (penalties, bans)
also apply to greedy decoding.

Processors are values: two with the same parameters are equal and hash alike (as gemma's
sampling methods are), so a jitted loop that takes one as a static argument compiles once
per distinct setting, without caches keyed on object identity. `reads_context` says
whether a processor looks at the decoded context; the warpers only look at the logits,
which lets speculative decoding skip building per-position contexts for them.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

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


class Processor:
  """Base of the processors: frozen dataclasses with `__call__(logits [B, V], ctx)`."""
  reads_context: ClassVar[bool] = False

  def __call__(self, logits: Array, ctx: ProcessorContext) -> Array:
    raise NotImplementedError


LogitsProcessor = Processor  # the type strategies and drafters take


def _context_mask(ctx: ProcessorContext) -> Array:
  return jnp.arange(ctx.sequences.shape[1])[None, :] < ctx.seq_len[:, None]


@dataclasses.dataclass(frozen=True)
class Chain(Processor):
  """Composes processors left to right (the first one sees the raw logits)."""
  processors: tuple[Processor, ...] = ()

  @property
  def reads_context(self) -> bool:  # type: ignore[override]
    return any(p.reads_context for p in self.processors)

  def __call__(self, logits: Array, ctx: ProcessorContext) -> Array:
    for p in self.processors:
      logits = p(logits, ctx)
    return logits


def chain(*processors: Processor) -> Chain:
  """One flat `Chain` of the given processors (nested chains are spliced in)."""
  flat: list[Processor] = []
  for p in processors:
    flat.extend(p.processors if isinstance(p, Chain) else (p,))
  return Chain(tuple(flat))


IDENTITY = Chain()


@dataclasses.dataclass(frozen=True)
class Temperature(Processor):
  temperature: float

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")

  def __call__(self, logits, ctx):
    return logits / self.temperature


@dataclasses.dataclass(frozen=True)
class TopK(Processor):
  """Keeps the max(k, min_tokens_to_keep) highest logits (ties with the last kept one are
  kept, as in Hugging Face)."""
  k: int
  min_tokens_to_keep: int = 1

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.k}")

  def __call__(self, logits, ctx):
    kk = min(max(self.k, self.min_tokens_to_keep), logits.shape[-1])
    kth = jax.lax.top_k(logits, kk)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


@dataclasses.dataclass(frozen=True)
class TopP(Processor):
  """Nucleus filtering: keeps the smallest top set whose probability exceeds p (and at
  least `min_tokens_to_keep` tokens)."""
  p: float
  min_tokens_to_keep: int = 1

  def __post_init__(self):
    if not 0 < self.p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.p}")

  def __call__(self, logits, ctx):
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= 1 - self.p
    remove_sorted = remove_sorted.at[..., -self.min_tokens_to_keep:].set(False)  # keep the best
    remove = jnp.zeros_like(remove_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


@dataclasses.dataclass(frozen=True)
class MinP(Processor):
  """Removes tokens whose probability is below p times the top token's probability (never
  the `min_tokens_to_keep` most likely ones)."""
  p: float
  min_tokens_to_keep: int = 1

  def __post_init__(self):
    if not 0 <= self.p <= 1:
      raise ValueError(f"min_p must be in [0, 1], got {self.p}")

  def __call__(self, logits, ctx):
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = self.p * probs.max(axis=-1, keepdims=True)
    if self.min_tokens_to_keep > 1:
      kth = jax.lax.top_k(probs, min(self.min_tokens_to_keep, probs.shape[-1]))[0][..., -1:]
      threshold = jnp.minimum(threshold, kth)
    return jnp.where(probs < threshold, NEG_INF, logits)


@dataclasses.dataclass(frozen=True)
class RepetitionPenalty(Processor):
  """CTRL-style penalty on every token already in the row's context (prompt included)."""
  penalty: float
  reads_context: ClassVar[bool] = True

  def __post_init__(self):
    if not self.penalty > 0:
      raise ValueError(f"repetition_penalty must be > 0, got {self.penalty}")

  def __call__(self, logits, ctx):
    B, V = logits.shape
    present = jnp.zeros((B, V), bool).at[
        jnp.arange(B)[:, None], jnp.clip(ctx.sequences, 0, V - 1)].max(_context_mask(ctx))
    penalized = jnp.where(logits < 0, logits * self.penalty, logits / self.penalty)
    return jnp.where(present, penalized, logits)


@dataclasses.dataclass(frozen=True)
class NoRepeatNGram(Processor):
  """Bans any token that would complete an n-gram already present in the row's context."""
  n: int
  reads_context: ClassVar[bool] = True

  def __post_init__(self):
    if self.n < 1:
      raise ValueError(f"no_repeat_ngram_size must be >= 1, got {self.n}")

  def __call__(self, logits, ctx):
    n = self.n
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


@dataclasses.dataclass(frozen=True)
class MinNewTokens(Processor):
  """Suppresses the EOS token(s) until m new tokens have been generated. `eos_ids` are real
  token ids (the callers drop the -1 padding of their EOS arrays)."""
  m: int
  eos_ids: tuple[int, ...]
  reads_context: ClassVar[bool] = True  # reads ctx.step

  def __post_init__(self):
    if any(int(e) < 0 for e in self.eos_ids):
      raise ValueError(f"EOS ids must be token ids >= 0, got {self.eos_ids}")

  def __call__(self, logits, ctx):
    eos = jnp.asarray(self.eos_ids, jnp.int32)
    ban = jnp.zeros((logits.shape[-1],), bool).at[eos].set(True)
    early = jnp.reshape(jnp.asarray(ctx.step) < self.m, (-1, 1))  # [1, 1] or [B, 1]
    return jnp.where(early & ban[None, :], NEG_INF, logits)


@dataclasses.dataclass(frozen=True)
class SuppressTokens(Processor):
  """Bans the ids in [start, stop) (e.g. the non-code ids of an image-token model)."""
  start: int
  stop: int

  def __call__(self, logits, ctx):
    ids = jnp.arange(logits.shape[-1])
    return jnp.where((ids >= self.start) & (ids < self.stop), NEG_INF, logits)


def penalties(min_new_tokens: int, repetition_penalty: float, no_repeat_ngram_size: int,
              eos_ids: Sequence[int]) -> Chain:
  """The context processors in Hugging Face's order; neutral values add nothing."""
  procs: list[Processor] = []
  if repetition_penalty != 1.0:
    procs.append(RepetitionPenalty(float(repetition_penalty)))
  if no_repeat_ngram_size:
    procs.append(NoRepeatNGram(int(no_repeat_ngram_size)))
  eos = tuple(int(e) for e in eos_ids if int(e) >= 0)
  if min_new_tokens and eos:
    procs.append(MinNewTokens(int(min_new_tokens), eos))
  return Chain(tuple(procs))


def warpers(temperature: float, top_k: int, top_p: float, min_p: float,
            min_tokens_to_keep: int = 1) -> Chain:
  """The sampling warpers in Hugging Face's order (temperature, top-k, top-p, min-p), each
  keeping at least `min_tokens_to_keep` tokens; neutral values add nothing."""
  procs: list[Processor] = []
  if temperature != 1.0:
    procs.append(Temperature(float(temperature)))
  if top_k:
    procs.append(TopK(int(top_k), int(min_tokens_to_keep)))
  if top_p != 1.0:
    procs.append(TopP(float(top_p), int(min_tokens_to_keep)))
  if min_p:
    procs.append(MinP(float(min_p), int(min_tokens_to_keep)))
  return Chain(tuple(procs))

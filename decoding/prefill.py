"""Prefill: the padded prompts through the model once, into a fresh KV cache.

Every loop (token by token, beam search, superposed, speculative) and every drafter with
its own cache starts here. Batches are ragged: row b's prompt is `prompts[b, :prompt_len[b]]`
(right-padded), its RoPE positions count on from the cache's current length (0 for a fresh
cache) and its cache length is set to its own prompt length afterwards, so a row computes
exactly what it would alone.

Prompts that begin with the same tokens (a few-shot evaluation puts the same k worked
examples before every question) can share that prefix: `shared_prefix_len` finds it on the
host and `prefill(..., shared=S)` runs the first S tokens once, for one row, copies that
cache to every row and prefills only the rest. The function computed is the same; the
floats may differ in the last bits (different matmul shapes), like any change of batch
shape outside the batch-invariant mode.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from models.kv_cache import KVCache

Array = jax.Array

# A shared prefix is used in whole blocks of this many tokens, so a stream of batches whose
# common prefixes differ by a few tokens compiles one shape, and one too short to pay for
# its extra pass is not shared at all.
PREFIX_BLOCK = 64


def shared_prefix_len(prompts: Sequence[Sequence[int]], block: int = PREFIX_BLOCK) -> int:
  """Tokens every prompt starts with, rounded down to a multiple of `block`, leaving each
  prompt at least one token of its own (its last logits come from its own pass)."""
  if len(prompts) < 2:
    return 0
  limit = min(len(p) for p in prompts) - 1
  first = prompts[0]
  n = 0
  while n < limit and all(p[n] == first[n] for p in prompts[1:]):
    n += 1
  return n // block * block


def new_cache(lm, batch_size: int, cache_len: int):
  """An empty cache of `lm` for `batch_size` rows of `cache_len` slots.

  The barrier keeps XLA from constant-folding attention over the all-zero new cache,
  which otherwise adds seconds of compile time per layer and buys nothing.
  """
  return jax.lax.optimization_barrier(lm.init_cache(batch_size, cache_len))


# Prompts longer than this are prefilled in chunks of this many tokens (a scan), so the
# attention scores of a prefill take [B, H, chunk, T] memory, not [B, H, P, T].
PREFILL_CHUNK = 512


def prefill(lm, params, prompts: Array, prompt_len: Array, cache: KVCache,
            chunk: int = PREFILL_CHUNK, return_hidden: bool = False, shared: int = 0):
  """Runs the padded prompts through the model; returns (last-token logits [B, V], cache),
  and with `return_hidden` also the final hidden states of every prompt position
  ([B, P, D]; feature drafters read them).

  The cache rows are then set to each prompt's true length, so padding slots are
  invisible and are overwritten by the first generated tokens. A prompt block longer
  than `chunk` (and a multiple of it, as bucketed lengths are) is fed `chunk` tokens at a
  time, each chunk attending to the cache written by the previous ones.

  shared (static): every row's first `shared` tokens are the same (and each prompt is
  longer, see `shared_prefix_len`): they are run once, for row 0, and that cache is
  copied to every row before the rest of each prompt is prefilled.
  """
  B, P = prompts.shape
  if not shared:
    return _prefill(lm, params, prompts, prompt_len, cache, chunk, return_hidden)
  if not 0 < shared < P:
    raise ValueError(f"shared prefix of {shared} tokens for a prompt block of {P}")
  one = jnp.zeros((1,), jnp.int32)
  head = _prefill(lm, params, prompts[:1, :shared], jnp.full((1,), shared, jnp.int32),
                  cache.take_rows(one), chunk, return_hidden)
  cache = head[1].take_rows(jnp.zeros((B,), jnp.int32))
  tail = _prefill(lm, params, prompts[:, shared:], prompt_len - shared, cache, chunk,
                  return_hidden)
  if not return_hidden:
    return tail
  hidden = jnp.concatenate([jnp.broadcast_to(head[2], (B,) + head[2].shape[1:]), tail[2]], 1)
  return tail[0], tail[1], hidden


def _prefill(lm, params, prompts: Array, prompt_len: Array, cache: KVCache, chunk: int,
             return_hidden: bool):
  B, P = prompts.shape
  start = cache.lengths  # [B]: where each row's positions and cache writes begin
  if P <= chunk or P % chunk:
    positions = start[:, None] + jnp.arange(P, dtype=jnp.int32)[None]
    out = lm(params, prompts, positions, cache, logits_at=(prompt_len - 1)[:, None])
    result = out.logits[:, 0], out.cache.with_lengths(start + prompt_len)
    return result + (out.hidden,) if return_hidden else result

  def body(carry, i):
    cache, logits = carry
    offset = i * chunk
    tokens = jax.lax.dynamic_slice_in_dim(prompts, offset, chunk, axis=1)
    positions = start[:, None] + offset + jnp.arange(chunk, dtype=jnp.int32)[None]
    last = prompt_len - 1 - offset  # index of the prompt's last token within this chunk
    out = lm(params, tokens, positions, cache, logits_at=jnp.clip(last, 0, chunk - 1)[:, None])
    here = (last >= 0) & (last < chunk)
    return ((out.cache, jnp.where(here[:, None], out.logits[:, 0], logits)),
            out.hidden if return_hidden else None)

  logits0 = jnp.zeros((B, lm.vocab_size), jnp.float32)
  (cache, logits), hidden = jax.lax.scan(body, (cache, logits0), jnp.arange(P // chunk))
  result = logits, cache.with_lengths(start + prompt_len)
  if return_hidden:  # [P/chunk, B, chunk, D] -> [B, P, D]
    result += (jnp.moveaxis(hidden, 0, 1).reshape(B, P, hidden.shape[-1]),)
  return result

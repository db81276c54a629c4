"""Prefill: the padded prompts through the model once, into a fresh KV cache.

Every loop (token by token, beam search, superposed, speculative) and every drafter with
its own cache starts here. Batches are ragged: row b's prompt is `prompts[b, :prompt_len[b]]`
(right-padded), its RoPE positions count from 0 and its cache length is set to its own
prompt length afterwards, so a row computes exactly what it would alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from models.kv_cache import KVCache

Array = jax.Array


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
            chunk: int = PREFILL_CHUNK, return_hidden: bool = False):
  """Runs the padded prompts through the model; returns (last-token logits [B, V], cache),
  and with `return_hidden` also the final hidden states of every prompt position
  ([B, P, D]; feature drafters read them).

  The cache rows are then set to each prompt's true length, so padding slots are
  invisible and are overwritten by the first generated tokens. A prompt block longer
  than `chunk` (and a multiple of it, as bucketed lengths are) is fed `chunk` tokens at a
  time, each chunk attending to the cache written by the previous ones.
  """
  B, P = prompts.shape
  start = cache.lengths
  if P <= chunk or P % chunk:
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None], (B, P))
    out = lm(params, prompts, positions, cache, logits_at=(prompt_len - 1)[:, None])
    result = out.logits[:, 0], out.cache.with_lengths(start + prompt_len)
    return result + (out.hidden,) if return_hidden else result

  def body(carry, i):
    cache, logits = carry
    offset = i * chunk
    tokens = jax.lax.dynamic_slice_in_dim(prompts, offset, chunk, axis=1)
    positions = jnp.broadcast_to(offset + jnp.arange(chunk, dtype=jnp.int32)[None], (B, chunk))
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

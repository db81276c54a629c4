"""The decoding core: loop state, prefill, and the `lax.while_loop` token loop.

Every token-by-token strategy is a `select(logits, ctx, keys) -> tokens` function
plugged into `decode`; the model is any callable with the `TransformerLM` boundary
(`lm(params, tokens, positions, cache, attn_mask, embeds, logits_at)`), the logits
processors come from `decoding.processors`. Batches are ragged: row b's prompt is
`prompts[b, :prompt_len[b]]` (right-padded), its KV cache grows from its own length
and its RoPE positions count from 0, so a row computes exactly what it would alone.
Randomness is keyed per row (`row_keys[b]`, folded with the step), so a row's
samples do not depend on the rest of the batch.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from decoding.processors import LogitsProcessor, ProcessorContext
from models.kv_cache import KVCache

Array = jax.Array
# select(processed_logits [B, V], step_keys [B, 2]) -> tokens [B]
Selector = Callable[[Array, Array], Array]


@flax.struct.dataclass
class DecodeState:
  """Loop state of token-by-token decoding (an explicit pytree)."""
  step: Array  # [] int32: tokens generated so far
  sequences: Array  # [B, S] int32: prompt then generated tokens, right-padded with pad_id
  seq_len: Array  # [B] int32
  prompt_len: Array  # [B] int32
  done: Array  # [B] bool: row has emitted EOS
  num_generated: Array  # [B] int32: generated tokens, EOS included
  logits: Array  # [B, V] float32: next-token logits of the model
  token_logprobs: Array  # [B, N] float32: log p_model(token) (raw model distribution)
  processed_logprobs: Array  # [B, N] float32: log-prob under the processed distribution
  token_entropy: Array  # [B, N] float32: entropy of the raw model distribution at each step
  token_mean_logp: Array  # [B, N] float32: (1/V) sum_v log p_model(v) at each step
  cache: KVCache
  row_keys: Array  # [B, 2] uint32 per-row PRNG keys

  @property
  def processor_context(self) -> ProcessorContext:
    return ProcessorContext(sequences=self.sequences, seq_len=self.seq_len,
                            prompt_len=self.prompt_len, step=self.step)


@flax.struct.dataclass
class DecodeResult:
  tokens: Array  # [B, N] int32 generated tokens, pad_id after EOS / beyond length
  lengths: Array  # [B] int32 number of generated tokens (EOS included)
  token_logprobs: Array  # [B, N] float32, 0 beyond length
  processed_logprobs: Array  # [B, N] float32, 0 beyond length
  scores: Array  # [B] float32 sum of token_logprobs (beam strategies: the ranking score)
  finished: Array  # [B] bool: ended with EOS
  # Full-vocabulary statistics of the raw model distribution at each generated position
  # (fp32, 0 beyond length); None when a strategy does not record them.
  token_entropy: Optional[Array] = None  # [B, N]
  token_mean_logp: Optional[Array] = None  # [B, N]
  # Per-row strategy statistics ({name: [B] array}), copied into `Generation.extras`.
  extras: Optional[dict] = None

# Strategies that return several sequences per prompt (beam search, superposed drafts)
# return the same fields with an extra axis after the batch: tokens [B, R, N], lengths
# [B, R], ... ordered best first.


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


def init_state(lm, params, prompts: Array, prompt_len: Array, max_new_tokens: int,
               cache_len: int, row_keys: Array, pad_id: int) -> DecodeState:
  """Prefills the B prompts once; with R = len(row_keys) // B > 1 rows per prompt (several
  samples of each prompt, rows b*R .. b*R+R-1 for prompt b), the prompt's cache and
  logits are then copied to its rows (`KVCache.take_rows`), not recomputed."""
  B, P = prompts.shape
  R = row_keys.shape[0] // B
  if R * B != row_keys.shape[0]:
    raise ValueError(f"{row_keys.shape[0]} row keys for {B} prompts: need a multiple of {B}")
  # The barrier keeps XLA from constant-folding attention over the all-zero new cache,
  # which otherwise adds seconds of compile time per layer and buys nothing.
  cache = jax.lax.optimization_barrier(lm.init_cache(B, cache_len))
  logits, cache = prefill(lm, params, prompts, prompt_len, cache)
  if R > 1:
    rows = jnp.repeat(jnp.arange(B), R)
    prompts, prompt_len, logits, cache = (prompts[rows], prompt_len[rows], logits[rows],
                                          cache.take_rows(rows))
    B = B * R
  S = P + max_new_tokens
  sequences = jnp.full((B, S), pad_id, jnp.int32).at[:, :P].set(prompts)
  valid = jnp.arange(S)[None] < prompt_len[:, None]
  sequences = jnp.where(valid, sequences, pad_id)
  zeros = jnp.zeros((B, max_new_tokens), jnp.float32)
  return DecodeState(step=jnp.zeros((), jnp.int32), sequences=sequences, seq_len=prompt_len,
                     prompt_len=prompt_len, done=jnp.zeros((B,), bool),
                     num_generated=jnp.zeros((B,), jnp.int32), logits=logits,
                     token_logprobs=zeros, processed_logprobs=zeros, token_entropy=zeros,
                     token_mean_logp=zeros, cache=cache,
                     row_keys=row_keys)


def step_keys(row_keys: Array, step: Array) -> Array:
  """Per-row keys for this step: fold the step into each row's own key."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)


def distribution_stats(logp: Array) -> tuple[Array, Array]:
  """(entropy, mean log-prob over the vocabulary) of fp32 log-probs [..., V] -> [...].

  Tokens with probability 0 (log p = -inf) add nothing to the entropy; the mean
  log-prob is then -inf, as it should be (self-certainty is unbounded there).
  """
  logp = logp.astype(jnp.float32)
  p = jnp.exp(logp)
  entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
  return entropy, jnp.mean(logp, axis=-1)


def decode_step(lm, params, state: DecodeState, processor: LogitsProcessor, select: Selector,
                eos_ids: Array, pad_id: int, max_new_tokens: int) -> DecodeState:
  """Chooses one token per row from `state.logits`, records it and runs the model on it."""
  B = state.logits.shape[0]
  raw_logp = jax.nn.log_softmax(state.logits, axis=-1)
  processed = processor(state.logits, state.processor_context)
  proc_logp = jax.nn.log_softmax(processed, axis=-1)
  tokens = select(processed, step_keys(state.row_keys, state.step)).astype(jnp.int32)
  active = ~state.done
  tokens = jnp.where(active, tokens, pad_id)
  rows = jnp.arange(B)
  pick = lambda lp: jnp.where(active, lp[rows, tokens], 0.0)
  token_logprobs = state.token_logprobs.at[:, state.step].set(pick(raw_logp))
  processed_logprobs = state.processed_logprobs.at[:, state.step].set(pick(proc_logp))
  entropy, mean_logp = distribution_stats(raw_logp)
  token_entropy = state.token_entropy.at[:, state.step].set(jnp.where(active, entropy, 0.0))
  token_mean_logp = state.token_mean_logp.at[:, state.step].set(jnp.where(active, mean_logp, 0.0))
  sequences = state.sequences.at[rows, state.seq_len].set(tokens)
  is_eos = jnp.any(tokens[:, None] == eos_ids[None, :], axis=-1) & active
  state = state.replace(
      step=state.step + 1, sequences=sequences, seq_len=state.seq_len + active,
      done=state.done | is_eos, num_generated=state.num_generated + active,
      token_logprobs=token_logprobs, processed_logprobs=processed_logprobs,
      token_entropy=token_entropy, token_mean_logp=token_mean_logp)

  def advance(s: DecodeState) -> DecodeState:
    # Finished rows feed a pad token at a frozen position; their cache row is not advanced.
    positions = (s.seq_len - 1)[:, None]
    out = lm(params, tokens[:, None], positions, s.cache)
    cache = out.cache.with_lengths(s.cache.lengths + active)
    return s.replace(logits=out.logits[:, 0], cache=cache)

  more = (state.step < max_new_tokens) & ~jnp.all(state.done)
  return jax.lax.cond(more, advance, lambda s: s, state)


def decode_loop(lm, params, state: DecodeState, processor: LogitsProcessor, select: Selector,
                eos_ids: Array, pad_id: int, max_new_tokens: int) -> DecodeState:
  def cond(s):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s):
    return decode_step(lm, params, s, processor, select, eos_ids, pad_id, max_new_tokens)

  return jax.lax.while_loop(cond, body, state)


def finalize(state: DecodeState, pad_id: int, max_new_tokens: int) -> DecodeResult:
  idx = state.prompt_len[:, None] + jnp.arange(max_new_tokens)[None]
  tokens = jnp.take_along_axis(state.sequences, jnp.clip(idx, 0, state.sequences.shape[1] - 1),
                               axis=1)
  valid = jnp.arange(max_new_tokens)[None] < state.num_generated[:, None]
  tokens = jnp.where(valid, tokens, pad_id)
  tlp = jnp.where(valid, state.token_logprobs, 0.0)
  plp = jnp.where(valid, state.processed_logprobs, 0.0)
  return DecodeResult(tokens=tokens, lengths=state.num_generated, token_logprobs=tlp,
                      processed_logprobs=plp, scores=tlp.sum(-1), finished=state.done,
                      token_entropy=jnp.where(valid, state.token_entropy, 0.0),
                      token_mean_logp=jnp.where(valid, state.token_mean_logp, 0.0))


@functools.partial(jax.jit, static_argnames=("lm", "processor", "select", "pad_id",
                                             "max_new_tokens", "cache_len"))
def decode(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, eos_ids: Array, *,
           processor: LogitsProcessor, select: Selector, pad_id: int, max_new_tokens: int,
           cache_len: int) -> DecodeResult:
  """Prefill + token loop, jitted. Shapes (B, P, N, cache_len) are static: bucket them.

  prompts: [B, P] int32 right-padded; prompt_len: [B] int32 (>= 1); eos_ids: [E] int32;
  row_keys: [B * R, 2] uint32, one per output row: R > 1 decodes R rows (samples) per
  prompt from one prefill, prompt b owning rows b*R .. b*R+R-1. Results have B * R rows.
  """
  state = init_state(lm, params, prompts, prompt_len, max_new_tokens, cache_len, row_keys, pad_id)
  state = decode_loop(lm, params, state, processor, select, eos_ids, pad_id, max_new_tokens)
  return finalize(state, pad_id, max_new_tokens)

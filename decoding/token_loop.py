"""The token-by-token loop: one `lax.while_loop` step per generated token.

Greedy decoding, ancestral sampling, momentum decoding and autoregressive image generation
are this loop with a different logits processor and token selector: each step applies the
processor to the model's next-token logits (`decoding.processors`), the selector picks a
token per row (`greedy_select`, `sample_select`), the token and its statistics go into the
shared per-token record (`decoding.records`), and the model runs on the new tokens. The
model is any callable with the `TransformerLM` boundary (`lm(params, tokens, positions,
cache, attn_mask, embeds, logits_at)`). Batches are ragged (see `decoding.prefill`) and
randomness is keyed per row (`row_keys[b]`, folded with the step), so a row's samples do not
depend on the rest of the batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from decoding import records
from decoding.prefill import new_cache, prefill
from decoding.processors import LogitsProcessor, ProcessorContext
from decoding.records import DecodeResult, TokenRecord, token_stats
from models.kv_cache import KVCache

Array = jax.Array
# select(processed_logits [B, V], step_keys [B, 2]) -> tokens [B]
Selector = Callable[[Array, Array], Array]


def greedy_select(logits: Array, keys: Array) -> Array:
  """argmax of the processed logits ([B, V] -> [B]); ties go to the lowest id, as in torch."""
  del keys
  return jnp.argmax(logits, axis=-1)


def sample_select(logits: Array, keys: Array) -> Array:
  """One categorical draw per row from softmax(processed logits), with that row's own key."""
  return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits)


class StepHook:
  """Optional per-step hook of the loop, for strategies that choose from more than the
  processed logits or feed the model something other than the chosen token (soft thinking
  feeds a mixture of embeddings, `decoding.soft_thinking`). Hooks are hashable values: they
  are static arguments of the jitted loop.

  init(state) -> aux: the hook's own loop state (per-row arrays), kept in `DecodeState.aux`.
  choose(lm, params, state, processed [B, V], step_keys [B, 2]) -> (tokens [B],
  record_logits [B, V]: the logits whose log-softmax the record's processed log-prob is read
  from, embeds [B, D] or None: the next input (None: the tokens' own embeddings), new aux).
  """

  def init(self, state: "DecodeState") -> Any:
    return None

  def choose(self, lm, params, state: "DecodeState", processed: Array, keys: Array):
    raise NotImplementedError


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
  record: TokenRecord  # [B, N]
  cache: KVCache
  row_keys: Array  # [B, 2] uint32 per-row PRNG keys
  aux: Any = None  # a `StepHook`'s own state, else None

  @property
  def processor_context(self) -> ProcessorContext:
    return ProcessorContext(sequences=self.sequences, seq_len=self.seq_len,
                            prompt_len=self.prompt_len, step=self.step)


def init_state(lm, params, prompts: Array, prompt_len: Array, max_new_tokens: int,
               cache_len: int, row_keys: Array, pad_id: int, shared_len: int = 0
               ) -> DecodeState:
  """Prefills the B prompts once; with R = len(row_keys) // B > 1 rows per prompt (several
  samples of each prompt, rows b*R .. b*R+R-1 for prompt b), the prompt's cache and
  logits are then copied to its rows (`KVCache.take_rows`), not recomputed. shared_len:
  the prompts' common first tokens, prefilled once (`decoding.prefill.prefill`)."""
  B, P = prompts.shape
  R = row_keys.shape[0] // B
  if R * B != row_keys.shape[0]:
    raise ValueError(f"{row_keys.shape[0]} row keys for {B} prompts: need a multiple of {B}")
  logits, cache = prefill(lm, params, prompts, prompt_len, new_cache(lm, B, cache_len),
                          shared=shared_len)
  if R > 1:
    rows = jnp.repeat(jnp.arange(B), R)
    prompts, prompt_len, logits, cache = (prompts[rows], prompt_len[rows], logits[rows],
                                          cache.take_rows(rows))
    B = B * R
  S = P + max_new_tokens
  sequences = jnp.full((B, S), pad_id, jnp.int32).at[:, :P].set(prompts)
  valid = jnp.arange(S)[None] < prompt_len[:, None]
  sequences = jnp.where(valid, sequences, pad_id)
  return DecodeState(step=jnp.zeros((), jnp.int32), sequences=sequences, seq_len=prompt_len,
                     prompt_len=prompt_len, done=jnp.zeros((B,), bool),
                     num_generated=jnp.zeros((B,), jnp.int32), logits=logits,
                     record=TokenRecord.empty((B, max_new_tokens), pad_id), cache=cache,
                     row_keys=row_keys)


def step_keys(row_keys: Array, step: Array) -> Array:
  """Per-row keys for this step: fold the step into each row's own key."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)


def decode_step(lm, params, state: DecodeState, processor: LogitsProcessor, select: Selector,
                eos_ids: Array, pad_id: int, max_new_tokens: int,
                hook: Optional[StepHook] = None) -> DecodeState:
  """Chooses one token per row from `state.logits`, records it and runs the model on it
  (or, with a `hook`, on the input the hook gives)."""
  B = state.logits.shape[0]
  processed = processor(state.logits, state.processor_context)
  keys = step_keys(state.row_keys, state.step)
  embeds, aux = None, state.aux
  if hook is None:
    tokens = select(processed, keys).astype(jnp.int32)
  else:
    tokens, processed, embeds, aux = hook.choose(lm, params, state, processed, keys)
    tokens = tokens.astype(jnp.int32)
  active = ~state.done
  tokens = jnp.where(active, tokens, pad_id)
  invariant = records.is_batch_invariant(lm)  # fixed-order sums for its records too
  stats = token_stats(tokens, records.log_softmax(state.logits, invariant),
                      records.log_softmax(processed, invariant), invariant)
  record = state.record.write(state.step, jax.tree.map(lambda x: x[:, None], stats), active)
  sequences = state.sequences.at[jnp.arange(B), state.seq_len].set(tokens)
  is_eos = jnp.any(tokens[:, None] == eos_ids[None, :], axis=-1) & active
  state = state.replace(
      step=state.step + 1, sequences=sequences, seq_len=state.seq_len + active,
      done=state.done | is_eos, num_generated=state.num_generated + active, record=record,
      aux=aux)

  def advance(s: DecodeState) -> DecodeState:
    # Finished rows feed a pad token at a frozen position; their cache row is not advanced.
    positions = (s.seq_len - 1)[:, None]
    if embeds is None:
      out = lm(params, tokens[:, None], positions, s.cache)
    else:
      out = lm(params, None, positions, s.cache, embeds=embeds[:, None])
    cache = out.cache.with_lengths(s.cache.lengths + active)
    return s.replace(logits=out.logits[:, 0], cache=cache)

  more = (state.step < max_new_tokens) & ~jnp.all(state.done)
  return jax.lax.cond(more, advance, lambda s: s, state)


def decode_loop(lm, params, state: DecodeState, processor: LogitsProcessor, select: Selector,
                eos_ids: Array, pad_id: int, max_new_tokens: int,
                hook: Optional[StepHook] = None) -> DecodeState:
  def cond(s):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s):
    return decode_step(lm, params, s, processor, select, eos_ids, pad_id, max_new_tokens, hook)

  return jax.lax.while_loop(cond, body, state)


def finalize(state: DecodeState, pad_id: int) -> DecodeResult:
  record = state.record.finalize(state.num_generated, pad_id)
  return DecodeResult(record=record, lengths=state.num_generated,
                      scores=record.token_logprobs.sum(-1), finished=state.done)


@functools.partial(jax.jit, static_argnames=("lm", "processor", "select", "pad_id",
                                             "max_new_tokens", "cache_len", "shared_len"))
def decode(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, eos_ids: Array, *,
           processor: LogitsProcessor, select: Selector, pad_id: int, max_new_tokens: int,
           cache_len: int, shared_len: int = 0) -> DecodeResult:
  """Prefill + token loop, jitted. Shapes (B, P, N, cache_len) are static: bucket them.

  prompts: [B, P] int32 right-padded; prompt_len: [B] int32 (>= 1); eos_ids: [E] int32;
  row_keys: [B * R, 2] uint32, one per output row: R > 1 decodes R rows (samples) per
  prompt from one prefill, prompt b owning rows b*R .. b*R+R-1. Results have B * R rows.
  """
  state = init_state(lm, params, prompts, prompt_len, max_new_tokens, cache_len, row_keys, pad_id,
                     shared_len)
  state = decode_loop(lm, params, state, processor, select, eos_ids, pad_id, max_new_tokens)
  return finalize(state, pad_id)


def make_run(target, processor: LogitsProcessor, select: Selector, max_new_tokens: int):
  """`run(batch) -> DecodeResult` of this loop on `target` (a `decoding.strategy.Target`):
  what the token-by-token strategies hand to the runner."""
  def run(batch) -> DecodeResult:
    return decode(target.lm, target.params, batch.prompts, batch.prompt_len, batch.row_keys,
                  target.eos_array, processor=processor, select=select, pad_id=target.pad_id,
                  max_new_tokens=max_new_tokens, cache_len=batch.cache_len,
                  shared_len=batch.shared_len)
  return run

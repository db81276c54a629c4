"""`generate`: validation, bucketing and batching around the registered strategies.

`generate(model, prompts, settings)` takes token-id prompts and a strategy's settings object
(`decoding.settings`; the object names its strategy, `decoding.registry`), checks everything
before compiling, pads prompt lengths and batch sizes to a few buckets (so new prompts do not
recompile), runs the strategy and returns one `decoding.results.Generation` per output
sequence.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoding import registry
from decoding.errors import GenerationError
from decoding.lengths import bucket, plan_lengths  # noqa: F401 (part of this module's API)
from decoding.prefill import shared_prefix_len
from decoding.results import Generation, to_generations
from decoding.settings import check_int, is_int
from decoding.strategy import Batch, Resources, Target

Array = jax.Array


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
  if len(prompts) == 0:
    raise GenerationError("no prompts given")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise GenerationError(f"prompt {i} is empty: give at least one token")
    arr = np.asarray(p)
    if not np.issubdtype(arr.dtype, np.integer):
      raise GenerationError(f"prompt {i} has non-integer token ids")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
      raise GenerationError(
          f"prompt {i} has token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")


def row_keys(seed: int, row_ids: Sequence[int]) -> Array:
  """[B, 2] PRNG keys: fold each row's id into the seed's key."""
  ids = np.asarray(list(row_ids), np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
    raise GenerationError("row ids must be in [0, 2**32)")
  return _fold(jax.random.PRNGKey(int(seed)), jnp.asarray(ids.astype(np.uint32)))


@jax.jit
def _fold(base, ids):
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)


@jax.jit
def sample_keys(keys, sample_idx):
  """Row key for sample 0, the row key folded with r for sample r >= 1."""
  folded = jax.vmap(jax.random.fold_in)(keys, sample_idx)
  return jnp.where((sample_idx == 0)[:, None], keys, folded)


class Stage:
  """What a pipeline strategy runs its stages with: `stage(prompts, settings, **overrides)`
  is `generate` with this request's options (seed, row ids, batching, resources), which a
  pipeline that batches its own passes reads from `options`."""

  def __init__(self, target: Target, options: dict):
    self.target, self.options = target, options

  def __call__(self, prompts, settings, **overrides) -> list[Generation]:
    return generate(self.target, prompts, settings, **{**self.options, **overrides})


def generate(model, prompts: Sequence[Sequence[int]], settings, *, seed: int = 0,
             batch_size: int = 8, max_cache_len: int = 0,
             row_ids: Optional[Sequence[int]] = None,
             shard: Optional[Callable[[Any], Any]] = None,
             resources: Optional[Resources] = None,
             share_prefix: bool = False, prompt_slots: int = 0) -> list[Generation]:
  """Runs the strategy of `settings` on token-id prompts. Validation happens first.

  model: a `decoding.strategy.Target` or a loaded model (`models.lm.LoadedModel`).
  Returns one `Generation` per prompt, or `num_return_sequences` consecutive ones per
  prompt (best first for beam-type strategies, in sample order for sampling).
  seed: the PRNG seed of sampling strategies. row_ids: per-prompt identities for the PRNG
  (default: position in `prompts`); a prompt with the same row id and seed gives the same
  output in any batch. batch_size: prompts x rows per compiled batch. max_cache_len: the KV
  cache length (0: sized from the longest prompt + max_new_tokens). shard: optional
  function placing the batch arrays on a device mesh. resources: loaded artifacts kept
  across calls (draft models, heads, n-gram tables; a fresh one per call by default).
  share_prefix: prefill the prompt tokens a batch's prompts all start with once and copy
  that cache to every row (`decoding.prefill.shared_prefix_len`): a k-shot evaluation's
  worked examples cost one row's prefill per batch instead of one per prompt. The same
  function is computed, not bit for bit the same floats, so it is off by default.
  prompt_slots: pad every prompt to the bucket of max(longest prompt, prompt_slots) rather
  than of the longest prompt given. A caller that runs a long prompt list in chunks (to
  save progress) passes the whole list's longest prompt, so every chunk has the shapes,
  and therefore the floats, of one call over the whole list.
  """
  target = model if isinstance(model, Target) else Target.of(model)
  strategy = registry.strategy_of(settings)
  if strategy.modality != "text":
    raise GenerationError(f"strategy {strategy.name!r} generates images: use "
                          "decoding.image_strategies.generate_images")
  if strategy.check_inputs is None:
    validate_prompts(prompts, target.lm.vocab_size)
  else:  # not token-id prompts (e.g. exact_extract's passages and questions)
    prompts = strategy.check_inputs(prompts)
  check_int("batch_size", batch_size, 1)
  check_int("max_cache_len", max_cache_len, 0)
  check_int("prompt_slots", prompt_slots, 0)
  if not is_int(seed):
    raise GenerationError(f"seed must be an integer, got {seed!r}")
  row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
  if len(row_ids) != len(prompts):
    raise GenerationError(f"{len(row_ids)} row ids for {len(prompts)} prompts")
  if strategy.needs_tokenizer and target.tokenizer is None:
    raise GenerationError(f"strategy {strategy.name!r} works on text: the model needs a tokenizer")
  if share_prefix and not strategy.shares_prefix:
    able = [n for n, s in registry.STRATEGIES.items() if s.shares_prefix]
    raise GenerationError(f"strategy {strategy.name!r} cannot share a prompt prefix "
                          f"(share_prefix=True); these can: {', '.join(able)}")
  resources = Resources() if resources is None else resources
  options = dict(seed=seed, batch_size=batch_size, max_cache_len=max_cache_len,
                 row_ids=row_ids, shard=shard, resources=resources, share_prefix=share_prefix,
                 prompt_slots=prompt_slots)
  if strategy.pipeline is not None:
    return strategy.pipeline(settings, target, prompts, Stage(target, options))
  longest = max(len(p) for p in prompts)
  P, cache_len = plan_lengths(settings.max_new_tokens, longest, target.lm.max_positions,
                              max_cache_len, prompt_slots)
  run = strategy.prepare(settings, target, resources)
  # Sampling strategies decode R rows (samples) per prompt from one prefill.
  R = strategy.rows_per_prompt(settings)
  per_batch = max(1, batch_size // R)  # prompts per batch
  base_keys = np.asarray(row_keys(seed, row_ids))
  greedy = strategy.greedy_equivalent(settings)
  out: list[Generation] = []
  for start in range(0, len(prompts), per_batch):
    chunk = list(range(start, min(start + per_batch, len(prompts))))
    B = min(per_batch, bucket(len(chunk), minimum=1))
    rows = chunk + [chunk[0]] * (B - len(chunk))
    padded = np.full((B, P), target.pad_id, np.int32)
    lens = np.ones((B,), np.int32)
    for b, i in enumerate(rows):
      padded[b, :len(prompts[i])] = prompts[i]
      lens[b] = len(prompts[i])
    keys = sample_keys(jnp.asarray(np.repeat(base_keys[rows], R, axis=0)),
                       jnp.asarray(np.tile(np.arange(R), B), jnp.uint32))
    arrays = (jnp.asarray(padded), jnp.asarray(lens), keys)
    if shard is not None:
      arrays = shard(arrays)
    shared = shared_prefix_len([prompts[i] for i in chunk]) if share_prefix else 0
    res = jax.device_get(run(Batch(*arrays, cache_len=cache_len, shared_len=shared)))
    if R > 1:  # [B * R, ...] -> [B, R, ...]
      res = jax.tree.map(lambda x: x.reshape((B, R) + x.shape[1:]), res)
    out += to_generations(res, [prompts[i] for i in chunk], chunk, target.lm.vocab_size,
                          strategy.score_kind, greedy)
  if strategy.postprocess is not None:
    strategy.postprocess(out)
  return out

"""User-facing generation: validation, bucketing, batching, strategy registry.

`generate(lm, params, prompts, cfg)` takes token-id prompts and a generation config
(an ml_collections ConfigDict or any mapping using Hugging Face GenerationConfig field
names), checks everything before compiling, pads prompt lengths and batch sizes to a
few buckets (so new prompts do not recompile), runs the chosen strategy and returns
numpy results per prompt.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoding import core, processors, sampling

Array = jax.Array


class GenerationError(ValueError):
  """Invalid generation request (raised before anything is compiled)."""


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A named decoding strategy.

  Array strategies give `run(lm, params, prompts [B, P], prompt_len [B], row_keys [B, 2],
  eos_ids [E], cfg, pad_id, max_new_tokens, cache_len[, tokenizer]) -> core.DecodeResult`,
  a jitted computation (`tokenizer=` is passed when `needs_tokenizer`); with `multiple=True` the result has a sequence axis ([B, R, N], best
  first, R = `num_return_sequences`), otherwise [B, N].

  Pipeline strategies (several stages with host work between them, such as best-of-N
  with answer extraction or self-agreement) give instead
  `pipeline(lm, params, prompts, cfg, eos_ids, pad_id, row_ids, shard, tokenizer)
  -> list[Generation]`, built from the array strategies.

  `sampling=True` strategies draw random numbers (temperature must be > 0) and, when not
  `multiple`, return R = `num_return_sequences` samples per prompt: `run` then gets
  row_keys [B * R, 2] (prompt b's samples in rows b*R .. b*R+R-1, independent keys),
  prefills each prompt once and returns B * R rows.
  """
  name: str
  run: Optional[Callable[..., core.DecodeResult]] = None
  sampling: bool = False
  validate: Optional[Callable[[Any], None]] = None
  multiple: bool = False
  pipeline: Optional[Callable[..., list]] = None
  needs_tokenizer: bool = False  # run/pipeline get `tokenizer=` (e.g. to build n-gram tables)
  postprocess: Optional[Callable[[list], None]] = None  # adds extras to the Generations


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
  STRATEGIES[strategy.name] = strategy
  return strategy


def _token_loop(select, is_sampling):
  def run(lm, params, prompts, prompt_len, row_keys, eos_ids, cfg, pad_id, max_new_tokens,
          cache_len):
    proc = processors.build(cfg, [int(e) for e in np.asarray(eos_ids) if e >= 0],
                            sampling=is_sampling)
    return core.decode(lm, params, prompts, prompt_len, row_keys, eos_ids, processor=proc,
                       select=select, pad_id=pad_id, max_new_tokens=max_new_tokens,
                       cache_len=cache_len)
  return run


register_strategy(Strategy("greedy", _token_loop(sampling.greedy_select, False), sampling=False))
register_strategy(Strategy("sample", _token_loop(sampling.sample_select, True), sampling=True))


def get_strategy(name: str) -> Strategy:
  if name not in STRATEGIES:
    raise GenerationError(f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}")
  return STRATEGIES[name]


# --------------------------------------------------------------------------- validation


def _get(cfg, key, default=None):
  try:
    v = cfg.get(key, default)
  except AttributeError:
    v = getattr(cfg, key, default)
  return default if v is None else v


def validate_config(cfg) -> None:
  """Checks the generation config values; raises GenerationError with a clear message."""
  strategy = _get(cfg, "strategy", "greedy")
  if strategy not in STRATEGIES:
    raise GenerationError(
        f"unknown strategy {strategy!r}; available: {sorted(STRATEGIES)}")
  n = _get(cfg, "max_new_tokens", 0)
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise GenerationError(f"max_new_tokens must be an integer >= 1, got {n!r}")
  m = _get(cfg, "min_new_tokens", 0)
  if m < 0 or m > n:
    raise GenerationError(f"min_new_tokens must be in [0, max_new_tokens={n}], got {m}")
  if STRATEGIES[strategy].sampling:
    t = _get(cfg, "temperature", 1.0)
    if not t > 0:
      raise GenerationError(f"temperature must be > 0 for sampling, got {t}")
  p = _get(cfg, "top_p", 1.0)
  if not 0 < p <= 1:
    raise GenerationError(f"top_p must be in (0, 1], got {p}")
  k = _get(cfg, "top_k", 0)
  if k != 0 and k < 1:
    raise GenerationError(f"top_k must be >= 1 (or 0 to disable), got {k}")
  mp = _get(cfg, "min_p", 0.0)
  if not 0 <= mp <= 1:
    raise GenerationError(f"min_p must be in [0, 1], got {mp}")
  rp = _get(cfg, "repetition_penalty", 1.0)
  if not rp > 0:
    raise GenerationError(f"repetition_penalty must be > 0, got {rp}")
  ng = _get(cfg, "no_repeat_ngram_size", 0)
  if ng < 0:
    raise GenerationError(f"no_repeat_ngram_size must be >= 0, got {ng}")
  for key in ("num_beams", "num_beam_groups", "num_return_sequences", "batch_size"):
    if _get(cfg, key, 1) < 1:
      raise GenerationError(f"{key} must be >= 1, got {_get(cfg, key)}")
  spec = STRATEGIES[strategy]
  if _get(cfg, "do_sample", False) and strategy in ("greedy", "momentum"):
    raise GenerationError(f"do_sample=True with strategy {strategy!r}: use strategy='sample' "
                          "(or 'beam' with do_sample=True for beam sampling)")
  r = _get(cfg, "num_return_sequences", 1)
  if r > 1 and not (spec.sampling or spec.multiple or spec.pipeline):
    raise GenerationError(
        f"strategy {strategy!r} is deterministic and returns one sequence per prompt: "
        f"num_return_sequences must be 1, got {r} (use strategy='sample' or 'beam')")
  if STRATEGIES[strategy].validate is not None:
    STRATEGIES[strategy].validate(cfg)


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


def bucket(n: int, minimum: int = 16) -> int:
  """Next power of two >= n (at least `minimum`): the few shapes we compile for."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def plan_lengths(cfg, longest_prompt: int, max_positions: int) -> tuple[int, int]:
  """(padded prompt length P, cache length) for a batch; errors if the request cannot fit.

  The padded prefill writes P slots per row before they are trimmed to the true
  lengths, so the cache holds at least P + max_new_tokens slots.
  """
  n = int(_get(cfg, "max_new_tokens"))
  P = bucket(longest_prompt)
  explicit = int(_get(cfg, "max_cache_len", 0))
  needed = longest_prompt + n
  if explicit and needed > explicit:
    raise GenerationError(
        f"prompt of {longest_prompt} tokens + max_new_tokens={n} = {needed} exceeds the KV "
        f"cache (max_cache_len={explicit}); shorten the prompt or raise max_cache_len")
  if needed > max_positions:
    raise GenerationError(
        f"prompt of {longest_prompt} tokens + max_new_tokens={n} = {needed} exceeds the "
        f"model's context of {max_positions} positions")
  return P, max(explicit, P + n)


# ------------------------------------------------------------------------------ running


@dataclasses.dataclass
class Generation:
  """One generated sequence. With num_return_sequences = R > 1 a prompt has R of them,
  consecutive and best first (as Hugging Face returns them); `index` is the prompt's
  position in the request and `rank` the sequence's rank for that prompt."""
  prompt_ids: list[int]
  output_ids: list[int]
  token_logprobs: list[float]  # log p_model(token) under the raw model, fp32
  processed_logprobs: list[float]
  score: float  # sum of token_logprobs; beam strategies: the length-penalized beam score
  finished: bool  # ended with EOS
  index: int = 0
  rank: int = 0
  token_entropy: Optional[list[float]] = None  # entropy of p_model at each position
  self_certainty: Optional[float] = None  # card 17: mean_t KL(U || p_t)
  gnll: Optional[float] = None  # card 16: -sum log p of the greedy output (greedy only)
  extras: dict = dataclasses.field(default_factory=dict)  # strategy-specific results

  @property
  def nll(self) -> float:
    """Negative log-likelihood of the output under the raw model."""
    return -float(sum(self.token_logprobs))


def row_keys(seed: int, row_ids: Sequence[int]) -> Array:
  """[B, 2] PRNG keys: fold each row's id into the seed's key."""
  ids = np.asarray(list(row_ids), np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
    raise GenerationError("row ids must be in [0, 2**32)")
  return _fold(jax.random.PRNGKey(int(seed)), jnp.asarray(ids.astype(np.uint32)))


@jax.jit
def _fold(base, ids):
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)


def results_to_generations(res, prompts: Sequence[Sequence[int]], indices: Sequence[int],
                           ranks: Sequence[int], strategy: str, vocab_size: int
                           ) -> list[Generation]:
  """Host-side conversion of a (device_get) DecodeResult with rows [B, ...] or [B, R, ...]."""
  from decoding.scoring import self_certainty
  out = []
  multi = np.ndim(res.lengths) == 2
  for i, p in enumerate(prompts):
    for r in (range(res.lengths.shape[1]) if multi else [None]):
      at = (i, r) if multi else (i,)
      L = int(res.lengths[at])
      tlp = [float(x) for x in res.token_logprobs[at][:L]]
      g = Generation(prompt_ids=[int(t) for t in p],
                     output_ids=[int(t) for t in res.tokens[at][:L]], token_logprobs=tlp,
                     processed_logprobs=[float(x) for x in res.processed_logprobs[at][:L]],
                     score=float(res.scores[at]), finished=bool(res.finished[at]),
                     index=int(indices[i]), rank=int(ranks[i] if r is None else r))
      if res.token_entropy is not None:
        g.token_entropy = [float(x) for x in res.token_entropy[at][:L]]
      if res.token_mean_logp is not None and L:
        g.self_certainty = self_certainty(res.token_mean_logp[at][:L], vocab_size)
      for k, val in (res.extras or {}).items():
        g.extras[k] = np.asarray(val[at]).item()
      if strategy == "greedy":
        g.gnll = -float(np.sum(np.asarray(tlp, np.float64)))
      out.append(g)
  return out


def generate(lm, params, prompts: Sequence[Sequence[int]], cfg, eos_ids: Sequence[int],
             pad_id: int, row_ids: Optional[Sequence[int]] = None,
             shard: Optional[Callable[[Any], Any]] = None, tokenizer=None) -> list[Generation]:
  """Runs the configured strategy on token-id prompts. Validation happens first.

  Returns one `Generation` per prompt, or `num_return_sequences` consecutive ones per
  prompt (best first for beam-type strategies, in sample order for sampling).
  row_ids: per-prompt identities for the PRNG (default: position in `prompts`); a
  prompt with the same row id and seed gives the same output in any batch. Sample r
  of a row uses the row's key folded with r (r >= 1), so sample 0 is what
  num_return_sequences=1 gives.
  shard: optional function placing the batch arrays on a device mesh.
  tokenizer: needed by strategies that work on text (self-agreement, answer extraction).
  """
  validate_config(cfg)
  validate_prompts(prompts, lm.vocab_size)
  name = _get(cfg, "strategy", "greedy")
  strategy = STRATEGIES[name]
  row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
  if len(row_ids) != len(prompts):
    raise GenerationError(f"{len(row_ids)} row ids for {len(prompts)} prompts")
  if strategy.needs_tokenizer and tokenizer is None:
    raise GenerationError(f"strategy {name!r} needs a tokenizer (pass tokenizer=...)")
  if strategy.pipeline is not None:
    return strategy.pipeline(lm, params, prompts, cfg, eos_ids, pad_id, row_ids, shard, tokenizer)
  n = int(_get(cfg, "max_new_tokens"))
  longest = max(len(p) for p in prompts)
  P, cache_len = plan_lengths(cfg, longest, lm.max_positions)
  batch_size = int(_get(cfg, "batch_size", 8))
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  seed = int(_get(cfg, "seed", 0))
  R = int(_get(cfg, "num_return_sequences", 1))
  # Sampling strategies decode R rows (samples) per prompt from one prefill.
  R_rows = R if (strategy.sampling and not strategy.multiple) else 1
  per_batch = max(1, batch_size // R_rows)  # prompts per batch
  base_keys = np.asarray(row_keys(seed, row_ids))
  out: list[Generation] = []
  for start in range(0, len(prompts), per_batch):
    chunk = list(range(start, min(start + per_batch, len(prompts))))
    B = min(per_batch, bucket(len(chunk), minimum=1))
    rows = chunk + [chunk[0]] * (B - len(chunk))
    padded = np.full((B, P), pad_id, np.int32)
    lens = np.ones((B,), np.int32)
    for b, i in enumerate(rows):
      padded[b, :len(prompts[i])] = prompts[i]
      lens[b] = len(prompts[i])
    keys = _sample_keys(jnp.asarray(np.repeat(base_keys[rows], R_rows, axis=0)),
                        jnp.asarray(np.tile(np.arange(R_rows), B), jnp.uint32))
    arrays = (jnp.asarray(padded), jnp.asarray(lens), keys)
    if shard is not None:
      arrays = shard(arrays)
    extra = {"tokenizer": tokenizer} if strategy.needs_tokenizer else {}
    res = jax.device_get(strategy.run(lm, params, *arrays, eos, cfg, pad_id, n, cache_len, **extra))
    if R_rows > 1:  # [B * R, ...] -> [B, R, ...]
      res = jax.tree.map(lambda x: x.reshape((B, R_rows) + x.shape[1:]), res)
    out += results_to_generations(res, [prompts[i] for i in chunk], chunk, [0] * len(chunk),
                                  name, lm.vocab_size)
  if strategy.postprocess is not None:
    strategy.postprocess(out)
  return out


@jax.jit
def _sample_keys(keys, sample_idx):
  """Row key for sample 0, the row key folded with r for sample r >= 1."""
  folded = jax.vmap(jax.random.fold_in)(keys, sample_idx)
  return jnp.where((sample_idx == 0)[:, None], keys, folded)


# Strategy families registered from their own modules (imported last: they use the
# registry above).
from decoding import beam  # noqa: E402,F401  beam, diverse_beam
from decoding import momentum  # noqa: E402,F401  momentum
from decoding import superposed  # noqa: E402,F401  superposed
from decoding import selection  # noqa: E402,F401  best_of_n, self_agreement
from decoding import drafters  # noqa: E402,F401  speculative

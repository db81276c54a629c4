"""Superposed Decoding: k drafts for the cost of one autoregressive pass.

"Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass"
(Shen et al., NeurIPS 2024); the details follow the reference code,
github.com/RAIVNLab/SuperposedDecoding (`superposed/llama/superpose.py`,
`superposed_generation.py`, `eval.py`, `params/p15_d3_mixed.json`).

Each prompt keeps k alive drafts with scores s_i (log-probabilities under the smoothed
model, summed over the draft's tokens) and ONE sequence in the KV cache, the
superposition of the drafts. At step t, with next-token logits z of that sequence:

1. p = softmax(z / T) restricted to its m most likely tokens and renormalized:
   log p(v) = z_v / T - logsumexp_{top m}(z / T). The same p serves every draft.
2. Per draft i and kept token v, n-gram smoothing ("geom" in the reference):
     p_ng^(i)(v) = sum_{c=1..5} w_c P_c(v | last c tokens of prompt + draft i)
     log p~^(i)(v) = (1 - alpha) log p(v) + alpha log p_ng^(i)(v)
   (orders longer than the available context are skipped, unseen n-grams give 0, see
   `decoding.ngram`). If no kept token of draft i has n-gram support, log p~^(i)(v) =
   (1 - alpha) log p(v) - penalty instead.
3. Beam-like update: the 2k best candidates s_i + log p~^(i)(v) over (i, v); candidates
   ending in EOS go to a finished list (the k best by score kept), the k best others
   become the new alive drafts. At t = 0 every draft is the prompt, so the scores start
   as [0, -inf, ..., -inf] and the 2k candidates all extend draft 0 (the reference's
   first-step rule).
4. Superposition: gamma_i = exp(s_i) / sum_j exp(s_j) over the alive drafts (sum to 1;
   weights of drafts with the same last token add up), the next input embedding is
   e~ = sum_i gamma_i E[last token of draft i] (k embedding rows, never a V x D
   product), and one forward of the superposed sequence at position prompt_len + t,
   `lm(params, None, positions, cache, embeds=e~)`, gives the next z.
5. After max_new_tokens steps, finished and alive drafts together are ranked by their
   average score per token s / length (the reference's `eval.py` ranks them by the
   perplexity exp(-s / length)); the best R = num_return_sequences are returned.

What a returned draft reports (`core.DecodeResult` with a draft axis, best first):
* `scores`: the draft score s (sum of `processed_logprobs`); exp(-s / length) is the
  perplexity the reference ranks by (`extras["perplexity"]` of `Generation`).
* `processed_logprobs`: each token's score increment log p~^(i)(v) (temperature, top-m
  renormalization, n-gram mixing and penalty included); all <= 0, so scores never rise.
* `token_logprobs`: log softmax(z)[v] at T = 1, the raw model's log-probability of the
  token under the shared superposed distribution of that step. The drafts share one
  forward, so this is not the log-probability the model gives the draft on its own
  prefix: for that (the perplexity a researcher compares against other decoders),
  re-score the returned drafts teacher-forced with `decoding.scoring.score_continuations`.
* `token_entropy` / `token_mean_logp`: statistics of that shared distribution.

Choices where the paper and code leave room (tested in tests/test_superposed.py):
* alpha = 0 means no n-gram term at all (the reference would compute 0 * log 0 = nan).
  With k = 1 the alive draft is then greedy decoding token for token; an EOS among the
  2 candidates goes to the finished list (as in the reference), and the final ranking by
  average score chooses between it and the continuation.
* The n-gram weights must be non-negative with sum <= 1, which keeps every
  increment <= 0.
* A prompt stops early once no alive draft can change the result any more: the k-th
  finished score is >= the best alive score (nothing can enter the finished list) and
  every finished draft's average score is >= best alive score / max_new_tokens (no
  alive or later-finished draft can outrank it). The result is the one running to
  max_new_tokens would give. Ties in the final ranking prefer finished drafts.
* Candidates without n-gram support get log p~ = -inf (alpha > 0), so a prompt can have
  fewer than R possible drafts; the missing ones come back empty (length 0, score -inf).

Fixed shapes, one `lax.while_loop` per batch; rows of a ragged batch compute exactly what
they would alone (own RoPE positions from 0, own cache length, own stopping).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decoding import core, generation, ngram
from models.kv_cache import KVCache

Array = jax.Array

# Defaults of `params/p15_d3_mixed.json` in the reference code (n-gram penalty: the
# `Superpose` default; corpus: the project's offline prose corpus).
DEFAULTS = dict(num_drafts=3, ngram_alpha=0.54, temperature=0.06, num_token_sample=9,
                ngram_weights=(0.01, 0.04, 0.15, 0.18, 0.12), ngram_penalty=200.0,
                ngram_corpus=ngram.DEFAULT_CORPUS)

# Hugging Face options that act on one sequence's logits; superposed decoding has its own
# temperature and top-m and does not apply them (value given -> neutral value).
_UNSUPPORTED = dict(top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                    no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1)


@flax.struct.dataclass
class SuperposedState:
  """Loop state. k drafts per row; N = max_new_tokens; H = n-gram context length."""
  step: Array  # [] int32
  done: Array  # [B] bool: the row's result can no longer change
  num_steps: Array  # [B] int32: steps the row took (length of its alive drafts)
  prompt_len: Array  # [B] int32
  logits: Array  # [B, V] float32: next-token logits of the superposed sequence
  cache: KVCache
  history: Array  # [B, k, H] int32: last H tokens of prompt + alive draft, most recent last
  alive_tokens: Array  # [B, k, N] int32
  alive_logprobs: Array  # [B, k, N] float32: log p_model(token), shared distribution
  alive_smoothed: Array  # [B, k, N] float32: score increments log p~(token)
  alive_scores: Array  # [B, k] float32
  fin_tokens: Array  # [B, k, N] int32
  fin_logprobs: Array  # [B, k, N] float32
  fin_smoothed: Array  # [B, k, N] float32
  fin_scores: Array  # [B, k] float32, -inf for empty slots
  fin_lengths: Array  # [B, k] int32
  token_entropy: Array  # [B, N] float32: entropy of the shared distribution per step
  token_mean_logp: Array  # [B, N] float32


def draft_weights(scores: Array) -> Array:
  """gamma = softmax(scores) over the drafts ([..., k]); drafts at -inf get weight 0."""
  top = jnp.max(scores, axis=-1, keepdims=True)
  w = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
  return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def superposed_embedding(lm, params, tokens: Array, weights: Array) -> Array:
  """sum_i weights_i E[tokens_i]: [B, k] tokens and weights -> [B, D] (fp32).

  Equals (V-dim weight vector, duplicates added) @ E, by linearity of the row lookup.
  """
  rows = lm.embed(params, tokens).astype(jnp.float32)  # [B, k, D]
  return jnp.einsum("bk,bkd->bd", weights.astype(jnp.float32), rows,
                    precision=jax.lax.Precision.HIGHEST)


def smoothed_logprobs(model: ngram.NGramModel, history: Array, available: Array,
                      candidates: Array, model_logp: Array, alpha: Array, weights: Array,
                      penalty: Array) -> Array:
  """log p~ of each draft's candidates (step 2 of the module docstring).

  history [B, k, H]; available [B]; candidates [B, m]; model_logp [B, m] (top-m
  renormalized log p) -> [B, k, m].
  """
  k = history.shape[1]
  cands = jnp.broadcast_to(candidates[:, None, :], (candidates.shape[0], k, candidates.shape[1]))
  p_ng = ngram.interpolated_prob(model, history, available[:, None], cands, weights)
  model_term = (1.0 - alpha) * model_logp[:, None, :]
  log_ng = jnp.log(jnp.where(p_ng > 0, p_ng, 1.0))
  ng_term = jnp.where(p_ng > 0, alpha * log_ng, jnp.where(alpha > 0, -jnp.inf, 0.0))
  unsupported = jnp.all(p_ng <= 0, axis=-1, keepdims=True) & (alpha > 0)
  return jnp.where(unsupported, model_term - penalty, model_term + ng_term)


def _take(x: Array, idx: Array) -> Array:
  """x[b, idx[b, j], ...]: gathers along the draft axis (axis 1)."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _init(lm, params, model: ngram.NGramModel, prompts, prompt_len, k, max_new_tokens,
          cache_len, pad_id) -> SuperposedState:
  B, P = prompts.shape
  N, H = max_new_tokens, model.max_context
  cache = jax.lax.optimization_barrier(lm.init_cache(B, cache_len))
  logits, cache = core.prefill(lm, params, prompts, prompt_len, cache)
  idx = prompt_len[:, None] - H + jnp.arange(H)[None]
  last = jnp.take_along_axis(prompts, jnp.clip(idx, 0, P - 1), axis=1)
  history = jnp.broadcast_to(jnp.where(idx >= 0, last, 0)[:, None], (B, k, H))
  zeros = jnp.zeros((B, k, N), jnp.float32)
  pads = jnp.full((B, k, N), pad_id, jnp.int32)
  scores = jnp.full((B, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
  return SuperposedState(
      step=jnp.zeros((), jnp.int32), done=jnp.zeros((B,), bool),
      num_steps=jnp.zeros((B,), jnp.int32), prompt_len=prompt_len, logits=logits, cache=cache,
      history=history.astype(jnp.int32), alive_tokens=pads, alive_logprobs=zeros,
      alive_smoothed=zeros, alive_scores=scores, fin_tokens=pads, fin_logprobs=zeros,
      fin_smoothed=zeros, fin_scores=jnp.full((B, k), -jnp.inf, jnp.float32),
      fin_lengths=jnp.zeros((B, k), jnp.int32),
      token_entropy=jnp.zeros((B, N), jnp.float32), token_mean_logp=jnp.zeros((B, N), jnp.float32))


def _step(lm, params, model, st: SuperposedState, eos_ids, alpha, temperature, weights, penalty,
          m: int, max_new_tokens: int) -> SuperposedState:
  B, k, N = st.alive_tokens.shape
  t = st.step
  active = ~st.done
  raw_logp = jax.nn.log_softmax(st.logits, axis=-1)
  entropy, mean_logp = core.distribution_stats(raw_logp)
  top_z, top_ids = jax.lax.top_k(st.logits / temperature, m)  # [B, m]
  model_logp = top_z - jax.nn.logsumexp(top_z, axis=-1, keepdims=True)
  raw_top = jnp.take_along_axis(raw_logp, top_ids, axis=-1)
  smoothed = smoothed_logprobs(model, st.history, st.prompt_len + t, top_ids, model_logp, alpha,
                               weights, penalty)  # [B, k, m]

  # 2k best (draft, token) candidates.
  flat = (st.alive_scores[:, :, None] + smoothed).reshape(B, k * m)
  cand_scores, flat_idx = jax.lax.top_k(flat, 2 * k)
  parent, j = flat_idx // m, flat_idx % m
  tok = jnp.take_along_axis(top_ids, j, axis=1)  # [B, 2k]
  cand_smoothed = jnp.take_along_axis(smoothed.reshape(B, k * m), flat_idx, axis=1)
  cand_raw = jnp.take_along_axis(raw_top, j, axis=1)
  is_eos = jnp.any(tok[:, :, None] == eos_ids[None, None, :], axis=-1)
  cand_tokens = _take(st.alive_tokens, parent).at[:, :, t].set(tok)
  cand_logprobs = _take(st.alive_logprobs, parent).at[:, :, t].set(cand_raw)
  cand_smoothed_all = _take(st.alive_smoothed, parent).at[:, :, t].set(cand_smoothed)
  cand_history = jnp.concatenate([_take(st.history, parent)[:, :, 1:], tok[:, :, None]], axis=2)

  # Alive: the k best candidates not ending in EOS.
  alive_scores, sel = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, cand_scores), k)
  alive = (_take(cand_tokens, sel), _take(cand_logprobs, sel), _take(cand_smoothed_all, sel),
           _take(cand_history, sel), alive_scores)

  # Finished: the k best of the old finished drafts and the EOS candidates.
  fin_key = jnp.concatenate([st.fin_scores, jnp.where(is_eos, cand_scores, -jnp.inf)], axis=1)
  fin_scores, fsel = jax.lax.top_k(fin_key, k)
  both = lambda old, new: _take(jnp.concatenate([old, new], axis=1), fsel)
  fin_lengths = both(st.fin_lengths, jnp.full((B, 2 * k), t + 1, jnp.int32))
  fin = (both(st.fin_tokens, cand_tokens), both(st.fin_logprobs, cand_logprobs),
         both(st.fin_smoothed, cand_smoothed_all), fin_scores, fin_lengths)

  keep = lambda new, old: jnp.where(active.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
  (a_tok, a_lp, a_sm, hist, a_sc) = [keep(n, o) for n, o in zip(alive, (
      st.alive_tokens, st.alive_logprobs, st.alive_smoothed, st.history, st.alive_scores))]
  (f_tok, f_lp, f_sm, f_sc, f_len) = [keep(n, o) for n, o in zip(fin, (
      st.fin_tokens, st.fin_logprobs, st.fin_smoothed, st.fin_scores, st.fin_lengths))]

  # Stop a row once nothing alive can change its result (module docstring).
  best_alive = jnp.max(a_sc, axis=-1)
  fin_avg = jnp.where(f_len > 0, f_sc / jnp.maximum(f_len, 1), -jnp.inf)
  settled = (f_sc[:, -1] >= best_alive) & (jnp.min(fin_avg, axis=-1) >= best_alive / max_new_tokens)
  done = st.done | settled
  st = st.replace(
      step=t + 1, done=done, num_steps=st.num_steps + active, alive_tokens=a_tok,
      alive_logprobs=a_lp, alive_smoothed=a_sm, history=hist, alive_scores=a_sc,
      fin_tokens=f_tok, fin_logprobs=f_lp, fin_smoothed=f_sm, fin_scores=f_sc,
      fin_lengths=f_len,
      token_entropy=st.token_entropy.at[:, t].set(jnp.where(active, entropy, 0.0)),
      token_mean_logp=st.token_mean_logp.at[:, t].set(jnp.where(active, mean_logp, 0.0)))

  def advance(s: SuperposedState) -> SuperposedState:
    embeds = superposed_embedding(lm, params, s.history[:, :, -1], draft_weights(s.alive_scores))
    positions = (s.prompt_len + t)[:, None]
    out = lm(params, None, positions, s.cache, embeds=embeds[:, None, :])
    cache = out.cache.with_lengths(s.cache.lengths + ~s.done)
    return s.replace(logits=out.logits[:, 0], cache=cache)

  more = (st.step < max_new_tokens) & ~jnp.all(st.done)
  return jax.lax.cond(more, advance, lambda s: s, st)


def _finalize(st: SuperposedState, R: int, pad_id: int) -> core.DecodeResult:
  B, k, N = st.alive_tokens.shape
  scores = jnp.concatenate([st.fin_scores, st.alive_scores], axis=1)  # [B, 2k]
  lengths = jnp.concatenate([st.fin_lengths, jnp.broadcast_to(st.num_steps[:, None], (B, k))], 1)
  avg = jnp.where(lengths > 0, scores / jnp.maximum(lengths, 1), -jnp.inf)
  _, sel = jax.lax.top_k(avg, R)  # ties: finished drafts first
  pick = lambda fin, alive: _take(jnp.concatenate([fin, alive], axis=1), sel)
  lengths = _take(lengths, sel)
  valid = jnp.arange(N)[None, None, :] < lengths[:, :, None]
  masked = lambda x: jnp.where(valid, x, 0.0)
  shared = lambda x: masked(jnp.broadcast_to(x[:, None, :], (B, R, N)))
  scores = _take(scores, sel)
  return core.DecodeResult(
      tokens=jnp.where(valid, pick(st.fin_tokens, st.alive_tokens), pad_id), lengths=lengths,
      token_logprobs=masked(pick(st.fin_logprobs, st.alive_logprobs)),
      processed_logprobs=masked(pick(st.fin_smoothed, st.alive_smoothed)), scores=scores,
      finished=(sel < k) & jnp.isfinite(scores), token_entropy=shared(st.token_entropy),
      token_mean_logp=shared(st.token_mean_logp))


@functools.partial(jax.jit, static_argnames=(
    "lm", "num_drafts", "num_token_sample", "num_return_sequences", "max_new_tokens",
    "cache_len", "pad_id"))
def superposed_decode(lm, params, ngram_model: ngram.NGramModel, prompts: Array,
                      prompt_len: Array, eos_ids: Array, *, num_drafts: int = 3,
                      alpha=0.54, temperature=0.06, num_token_sample: int = 9,
                      ngram_weights=DEFAULTS["ngram_weights"], ngram_penalty=200.0,
                      num_return_sequences: Optional[int] = None, max_new_tokens: int,
                      cache_len: int, pad_id: int) -> core.DecodeResult:
  """Superposed decoding of a batch, jitted; returns [B, R, N] drafts, best first.

  prompts: [B, P] int32 right-padded; prompt_len: [B] int32 (>= 1); eos_ids: [E] int32;
  ngram_model: `decoding.ngram.NGramModel` built with the model's tokenizer (a traced
  argument). alpha, temperature, ngram_weights (<= max_context floats for context
  lengths 1, 2, ...) and ngram_penalty are traced, so sweeping them does not recompile;
  num_drafts (k), num_token_sample (m), num_return_sequences (R, default k) and the
  shapes are static. cache_len >= P + max_new_tokens.
  """
  R = num_drafts if num_return_sequences is None else num_return_sequences
  weights = jnp.asarray(ngram_weights, jnp.float32)
  if weights.shape[0] > ngram_model.max_context:
    raise ValueError(f"{weights.shape[0]} n-gram weights for tables of context length "
                     f"<= {ngram_model.max_context}")
  st = _init(lm, params, ngram_model, prompts, prompt_len, num_drafts, max_new_tokens, cache_len,
             pad_id)
  step = functools.partial(_step, lm, params, ngram_model, eos_ids=eos_ids, alpha=alpha,
                           temperature=temperature, weights=weights, penalty=ngram_penalty,
                           m=num_token_sample, max_new_tokens=max_new_tokens)
  st = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done),
                          lambda s: step(st=s), st)
  return _finalize(st, R, pad_id)


# ------------------------------------------------------------------------------- strategy


def _setting(cfg, key):
  return generation._get(cfg, key, DEFAULTS[key])


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and (
      math.isfinite(float(x)))


def validate(cfg) -> None:
  """Checks the superposed-decoding settings (GenerationError before anything compiles)."""
  err = generation.GenerationError
  k = _setting(cfg, "num_drafts")
  if not _is_int(k) or k < 1:
    raise err(f"num_drafts must be an integer >= 1, got {k!r}")
  m = _setting(cfg, "num_token_sample")
  if not _is_int(m) or m < 2:
    raise err(f"num_token_sample must be an integer >= 2 (the update draws 2 x num_drafts "
              f"candidates from num_drafts x num_token_sample), got {m!r}")
  a = _setting(cfg, "ngram_alpha")
  if not _is_real(a) or not 0 <= a <= 1:
    raise err(f"ngram_alpha must be in [0, 1], got {a!r}")
  t = _setting(cfg, "temperature")
  if not _is_real(t) or not t > 0:
    raise err(f"temperature must be > 0 for superposed decoding, got {t!r}")
  w = _setting(cfg, "ngram_weights")
  if (isinstance(w, (str, bytes)) or not isinstance(w, (Sequence, np.ndarray))
      or not 1 <= len(w) <= ngram.MAX_CONTEXT or not all(_is_real(x) and x >= 0 for x in w)
      or sum(float(x) for x in w) > 1 + 1e-6):
    raise err(f"ngram_weights must be 1..{ngram.MAX_CONTEXT} non-negative numbers (context "
              f"lengths 1, 2, ...) summing to at most 1, got {w!r}")
  p = _setting(cfg, "ngram_penalty")
  if not _is_real(p) or p < 0:
    raise err(f"ngram_penalty must be a finite number >= 0, got {p!r}")
  corpus = _setting(cfg, "ngram_corpus")
  if corpus not in ngram.CORPORA:
    raise err(f"ngram_corpus must be one of {list(ngram.CORPORA)}, got {corpus!r}")
  r = generation._get(cfg, "num_return_sequences", 1)
  if r > k:
    raise err(f"num_return_sequences ({r}) must be <= num_drafts ({k})")
  for key, neutral in _UNSUPPORTED.items():
    if generation._get(cfg, key, neutral) != neutral:
      raise err(f"{key}={generation._get(cfg, key)!r} is not supported by superposed decoding "
                f"(it uses temperature and num_token_sample); leave it at {neutral!r}")


def perplexity(score: float, length: int) -> float:
  """exp(-score / length): the reference's draft perplexity (inf for an empty draft)."""
  if length <= 0 or not -score / length < 700:
    return float("inf")
  return math.exp(-score / length)


def _run(lm, params, prompts, prompt_len, row_keys, eos_ids, cfg, pad_id, max_new_tokens,
         cache_len, tokenizer):
  """The registered strategy: `superposed_decode` with the n-gram tables of `ngram_corpus`
  tokenized by `tokenizer` (cached per process and on disk, see `ngram.load_ngram_model`)."""
  del row_keys  # deterministic: no randomness
  m = int(_setting(cfg, "num_token_sample"))
  if m > lm.vocab_size:
    raise generation.GenerationError(
        f"num_token_sample ({m}) exceeds the vocabulary size ({lm.vocab_size})")
  model = ngram.load_ngram_model(_setting(cfg, "ngram_corpus"), tokenizer)
  return superposed_decode(
      lm, params, model, prompts, prompt_len, eos_ids, max_new_tokens=max_new_tokens,
      cache_len=cache_len, pad_id=pad_id, num_drafts=int(_setting(cfg, "num_drafts")),
      alpha=float(_setting(cfg, "ngram_alpha")), temperature=float(_setting(cfg, "temperature")),
      num_token_sample=m, ngram_weights=tuple(float(x) for x in _setting(cfg, "ngram_weights")),
      ngram_penalty=float(_setting(cfg, "ngram_penalty")),
      num_return_sequences=int(generation._get(cfg, "num_return_sequences", 1)))


def _add_perplexity(gens) -> None:
  for g in gens:
    g.extras["perplexity"] = perplexity(g.score, len(g.output_ids))


generation.register_strategy(generation.Strategy(
    "superposed", run=_run, validate=validate, multiple=True, needs_tokenizer=True,
    postprocess=_add_perplexity))

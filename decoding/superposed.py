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

What a returned draft reports (`decoding.records.DecodeResult` with a draft axis, best first):
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

Choices where the paper and code leave room (tested in tests/decoding/test_superposed.py):
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
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decoding import ngram
from decoding.errors import GenerationError
from decoding.prefill import new_cache, prefill
from decoding.records import DecodeResult, TokenRecord, distribution_stats
from decoding.settings import (TextSettings, check_choice, check_int, check_real, is_int, is_real,
                               settings)
from decoding.strategy import Strategy
from models.kv_cache import KVCache

Array = jax.Array
# n-gram weights w_c for context lengths 1..5 (the reference's `params/p15_d3_mixed.json`)
NGRAM_WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)


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
  # Per-token records [B, k, N]: token_logprobs are log p_model(token) of the shared
  # distribution, processed_logprobs the score increments log p~(token), and the entropy
  # and mean log-prob those of the shared distribution at each step.
  alive: TokenRecord
  alive_scores: Array  # [B, k] float32
  fin: TokenRecord
  fin_scores: Array  # [B, k] float32, -inf for empty slots
  fin_lengths: Array  # [B, k] int32


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
  logits, cache = prefill(lm, params, prompts, prompt_len, new_cache(lm, B, cache_len))
  idx = prompt_len[:, None] - H + jnp.arange(H)[None]
  last = jnp.take_along_axis(prompts, jnp.clip(idx, 0, P - 1), axis=1)
  history = jnp.broadcast_to(jnp.where(idx >= 0, last, 0)[:, None], (B, k, H))
  empty = TokenRecord.empty((B, k, N), pad_id)
  scores = jnp.full((B, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
  return SuperposedState(
      step=jnp.zeros((), jnp.int32), done=jnp.zeros((B,), bool),
      num_steps=jnp.zeros((B,), jnp.int32), prompt_len=prompt_len, logits=logits, cache=cache,
      history=history.astype(jnp.int32), alive=empty, alive_scores=scores, fin=empty,
      fin_scores=jnp.full((B, k), -jnp.inf, jnp.float32),
      fin_lengths=jnp.zeros((B, k), jnp.int32))


def _step(lm, params, model, st: SuperposedState, eos_ids, alpha, temperature, weights, penalty,
          m: int, max_new_tokens: int) -> SuperposedState:
  B, k, N = st.alive.tokens.shape
  t = st.step
  active = ~st.done
  raw_logp = jax.nn.log_softmax(st.logits, axis=-1)
  entropy, mean_logp = distribution_stats(raw_logp)  # [B]: shared by every draft
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
  shared = lambda x: jnp.broadcast_to(x[:, None, None], (B, 2 * k, 1))
  step_rec = TokenRecord(tokens=tok[..., None], token_logprobs=cand_raw[..., None],
                         processed_logprobs=cand_smoothed[..., None],
                         token_entropy=shared(entropy), token_mean_logp=shared(mean_logp))
  cands = jax.tree.map(lambda x: _take(x, parent), st.alive).write(t, step_rec)  # [B, 2k, N]
  cand_history = jnp.concatenate([_take(st.history, parent)[:, :, 1:], tok[:, :, None]], axis=2)

  # Alive: the k best candidates not ending in EOS.
  alive_scores, sel = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, cand_scores), k)
  alive = (jax.tree.map(lambda x: _take(x, sel), cands), _take(cand_history, sel), alive_scores)

  # Finished: the k best of the old finished drafts and the EOS candidates.
  fin_key = jnp.concatenate([st.fin_scores, jnp.where(is_eos, cand_scores, -jnp.inf)], axis=1)
  fin_scores, fsel = jax.lax.top_k(fin_key, k)
  both = lambda old, new: _take(jnp.concatenate([old, new], axis=1), fsel)
  fin_lengths = both(st.fin_lengths, jnp.full((B, 2 * k), t + 1, jnp.int32))
  fin = (jax.tree.map(both, st.fin, cands), fin_scores, fin_lengths)

  keep = lambda new, old: jnp.where(active.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
  (a_rec, hist, a_sc) = jax.tree.map(keep, alive, (st.alive, st.history, st.alive_scores))
  (f_rec, f_sc, f_len) = jax.tree.map(keep, fin, (st.fin, st.fin_scores, st.fin_lengths))

  # Stop a row once nothing alive can change its result (module docstring).
  best_alive = jnp.max(a_sc, axis=-1)
  fin_avg = jnp.where(f_len > 0, f_sc / jnp.maximum(f_len, 1), -jnp.inf)
  settled = (f_sc[:, -1] >= best_alive) & (jnp.min(fin_avg, axis=-1) >= best_alive / max_new_tokens)
  done = st.done | settled
  st = st.replace(
      step=t + 1, done=done, num_steps=st.num_steps + active, alive=a_rec, history=hist,
      alive_scores=a_sc, fin=f_rec, fin_scores=f_sc, fin_lengths=f_len)

  def advance(s: SuperposedState) -> SuperposedState:
    embeds = superposed_embedding(lm, params, s.history[:, :, -1], draft_weights(s.alive_scores))
    positions = (s.prompt_len + t)[:, None]
    out = lm(params, None, positions, s.cache, embeds=embeds[:, None, :])
    cache = out.cache.with_lengths(s.cache.lengths + ~s.done)
    return s.replace(logits=out.logits[:, 0], cache=cache)

  more = (st.step < max_new_tokens) & ~jnp.all(st.done)
  return jax.lax.cond(more, advance, lambda s: s, st)


def _finalize(st: SuperposedState, R: int, pad_id: int) -> DecodeResult:
  B, k, N = st.alive.tokens.shape
  scores = jnp.concatenate([st.fin_scores, st.alive_scores], axis=1)  # [B, 2k]
  lengths = jnp.concatenate([st.fin_lengths, jnp.broadcast_to(st.num_steps[:, None], (B, k))], 1)
  avg = jnp.where(lengths > 0, scores / jnp.maximum(lengths, 1), -jnp.inf)
  _, sel = jax.lax.top_k(avg, R)  # ties: finished drafts first
  pick = lambda fin, alive: _take(jnp.concatenate([fin, alive], axis=1), sel)
  lengths = _take(lengths, sel)
  scores = _take(scores, sel)
  return DecodeResult(record=jax.tree.map(pick, st.fin, st.alive).finalize(lengths, pad_id),
                      lengths=lengths, scores=scores,
                      finished=(sel < k) & jnp.isfinite(scores))


@functools.partial(jax.jit, static_argnames=(
    "lm", "num_drafts", "num_token_sample", "num_return_sequences", "max_new_tokens",
    "cache_len", "pad_id"))
def superposed_decode(lm, params, ngram_model: ngram.NGramModel, prompts: Array,
                      prompt_len: Array, eos_ids: Array, *, num_drafts: int = 3,
                      alpha=0.54, temperature=0.06, num_token_sample: int = 9,
                      ngram_weights=NGRAM_WEIGHTS, ngram_penalty=200.0,
                      num_return_sequences: Optional[int] = None, max_new_tokens: int,
                      cache_len: int, pad_id: int) -> DecodeResult:
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


@settings
class Superposed(TextSettings):
  """Superposed decoding; defaults from the reference code's `params/p15_d3_mixed.json`
  (k = 3, alpha = 0.54, T = 0.06, m = 9, n-gram weights for contexts 1..5) and its n-gram
  penalty default 200. The corpus is the project's offline prose (Jane Austen's novels).
  It has its own temperature and top-m, and no other Hugging Face processor applies."""
  num_drafts: int = 3  # k
  num_return_sequences: Optional[int] = None  # drafts returned per prompt, best first; None: k
  temperature: float = 0.06  # T in p = softmax(z / T)
  num_token_sample: int = 9  # m: tokens kept from p (renormalized)
  ngram_alpha: float = 0.54  # log p~ = (1 - alpha) log p + alpha log p_ng
  ngram_weights: tuple[float, ...] = NGRAM_WEIGHTS  # w_c for context lengths 1, 2, ...
  ngram_penalty: float = 200.0  # subtracted when no kept token of a draft has n-gram support
  ngram_corpus: str = ngram.DEFAULT_CORPUS

  def __post_init__(self):
    w = self.ngram_weights
    if isinstance(w, (list, np.ndarray)):  # a config list: stored as a tuple (hashable)
      object.__setattr__(self, "ngram_weights", tuple(w.tolist() if isinstance(w, np.ndarray)
                                                      else w))
    super().__post_init__()

  @property
  def returned(self) -> int:
    return self.num_drafts if self.num_return_sequences is None else self.num_return_sequences

  def validate(self) -> None:
    super().validate()
    check_int("num_drafts", self.num_drafts, 1)
    if not is_int(self.num_token_sample) or self.num_token_sample < 2:
      raise GenerationError(f"num_token_sample must be an integer >= 2 (the update draws 2 x "
                            f"num_drafts candidates from num_drafts x num_token_sample), got "
                            f"{self.num_token_sample!r}")
    check_real("ngram_alpha", self.ngram_alpha, 0.0, 1.0)
    check_real("temperature", self.temperature, 0.0, low_open=True)
    w = self.ngram_weights
    if (not isinstance(w, tuple) or not 1 <= len(w) <= ngram.MAX_CONTEXT
        or not all(is_real(x) and x >= 0 for x in w) or sum(float(x) for x in w) > 1 + 1e-6):
      raise GenerationError(f"ngram_weights must be 1..{ngram.MAX_CONTEXT} non-negative numbers "
                            f"(context lengths 1, 2, ...) summing to at most 1, got {w!r}")
    check_real("ngram_penalty", self.ngram_penalty, 0.0)
    check_choice("ngram_corpus", self.ngram_corpus, ngram.CORPORA)
    if self.num_return_sequences is not None:
      check_int("num_return_sequences", self.num_return_sequences, 1, self.num_drafts)


def perplexity(score: float, length: int) -> float:
  """exp(-score / length): the reference's draft perplexity (inf for an empty draft)."""
  if length <= 0 or not -score / length < 700:
    return float("inf")
  return math.exp(-score / length)


def prepare(s: Superposed, target, resources):
  """`superposed_decode` with the n-gram tables of `ngram_corpus` tokenized by the target's
  tokenizer (built once, then read from the disk cache; kept in `resources`)."""
  if s.num_token_sample > target.lm.vocab_size:
    raise GenerationError(f"num_token_sample ({s.num_token_sample}) exceeds the vocabulary "
                          f"size ({target.lm.vocab_size})")
  tables = resources.get(("ngram", s.ngram_corpus),
                         lambda: ngram.load_ngram_model(s.ngram_corpus, target.tokenizer),
                         depends_on=(target.tokenizer,))

  def run(batch):
    return superposed_decode(
        target.lm, target.params, tables, batch.prompts, batch.prompt_len, target.eos_array,
        max_new_tokens=s.max_new_tokens, cache_len=batch.cache_len, pad_id=target.pad_id,
        num_drafts=s.num_drafts, alpha=float(s.ngram_alpha), temperature=float(s.temperature),
        num_token_sample=s.num_token_sample, ngram_weights=tuple(map(float, s.ngram_weights)),
        ngram_penalty=float(s.ngram_penalty), num_return_sequences=s.returned)
  return run


def _add_perplexity(gens) -> None:
  for g in gens:
    g.extras["perplexity"] = perplexity(g.score, len(g.output_ids))


STRATEGY = Strategy("superposed", Superposed, "k drafts from one forward pass per step, "
                    "n-gram smoothed", prepare=prepare, needs_tokenizer=True,
                    score_kind="draft_score", postprocess=_add_perplexity)

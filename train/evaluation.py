"""Language-model evaluation before and after fine-tuning, as in "The Hyperfitting Phenomenon:
Sharpening and Stabilizing LLMs for Open-Ended Text Generation" (Carlsson et al., ICLR 2025).

The paper's signature of hyperfitting is measured by four numbers on held-out text:
* perplexity (it gets *worse*) and the mean entropy of the next-token distribution (it
  collapses), from a cache-free teacher-forced pass (`perplexity_and_entropy`);
* the type-token ratio of greedy continuations (96 tokens from 32-token contexts; it goes
  *up*, i.e. less repetition) (`greedy_continuations`, `type_token_ratio`);
* how often a greedy continuation copies a training subsequence of >= 10 tokens (the paper
  finds it rare) (`copy_fraction`).
`ngram_repetition` adds the usual within-sequence rep-n metric. `evaluate_lm` runs all of
them and returns a flat dict of floats, so a run can report them before and after training.

Model calls run in fixed-size jitted batches: the last batch is padded with copies of its
first row and the padding rows are dropped, so nothing recompiles per batch and results do
not depend on the batch size. Token inputs may be numpy or jax arrays; results are plain
Python floats and numpy arrays.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoding import greedy
from decoding.strategy import Batch, Resources, Target
from models.config import ModelConfig
from train import losses

Array = jax.Array
Tokens = Any  # [N, L] int array (numpy or jax), or a sequence of 1-D token sequences (ragged)


# --------------------------------------------------------------------------------- helpers


def _as_2d(tokens, name: str, vocab_size: Optional[int] = None) -> np.ndarray:
  arr = np.asarray(jax.device_get(tokens))
  if arr.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [rows, length] token array, got shape {arr.shape}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"{name} is empty (shape {arr.shape})")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
  if vocab_size is not None:
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
      raise ValueError(
          f"{name} has token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")
  return arr.astype(np.int32)


def _rows(tokens) -> list[np.ndarray]:
  """Rows of a 2-D array or of a ragged sequence of sequences, each a 1-D int64 array."""
  if isinstance(tokens, (np.ndarray, jax.Array)):
    arr = np.asarray(jax.device_get(tokens))
    if arr.ndim != 2:
      raise ValueError(f"expected a 2-D [rows, length] token array, got shape {arr.shape}")
    return list(arr.astype(np.int64))
  return [np.asarray(jax.device_get(r), np.int64).reshape(-1) for r in tokens]


def _batches(arr: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Yields ([B, ...] batch, number of real rows); the last batch is padded with its first row."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  B = min(batch_size, arr.shape[0])
  for start in range(0, arr.shape[0], B):
    chunk = arr[start:start + B]
    n = chunk.shape[0]
    if n < B:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], B - n, axis=0)], axis=0)
    yield chunk, n


# ---------------------------------------------------------------- perplexity and entropy


@functools.partial(jax.jit, static_argnums=1)
def _row_scores(params: Any, config: ModelConfig, tokens: Array) -> tuple[Array, Array]:
  """Per-row sums over the T - 1 predicted positions. tokens [B, T] -> (nll [B], entropy [B])."""
  logits = losses.sequence_logits(params, config, tokens)  # [B, T, V]
  logp = losses.token_logprobs(logits, tokens)[:, 1:]  # [B, T-1]: log p(x_t | x_<t), t >= 1
  entropy = losses.token_entropy(logits[:, :-1])  # [B, T-1]: at the positions that predict x_t
  return -jnp.sum(logp, axis=-1), jnp.sum(entropy, axis=-1)


def perplexity_and_entropy(lm, params, sequences: Tokens, batch_size: int = 8) -> dict:
  """Held-out perplexity and mean next-token entropy under teacher forcing.

  sequences: [N, T] token ids (T >= 2). Every position t = 1..T-1 of every row is predicted
  from its prefix (one cache-free causal pass per batch, `losses.sequence_logits`), so there
  are N (T - 1) predictions. Returns
    nll: mean over all predictions of -log p(x_t | x_<t) (nats);
    perplexity: exp(nll);
    mean_entropy: mean over the same positions of H(p(. | x_<t)) (nats).
  (The paper's code averages the entropy over all T positions of each batch, including the
  last one, which predicts past the sequence; we use exactly the predicting positions.)
  """
  arr = _as_2d(sequences, "sequences", lm.config.vocab_size)
  if arr.shape[1] < 2:
    raise ValueError(f"sequences need at least 2 tokens to predict one, got length {arr.shape[1]}")
  nll_sum, ent_sum = 0.0, 0.0
  for batch, n in _batches(arr, batch_size):
    nll, ent = jax.device_get(_row_scores(params, lm.config, jnp.asarray(batch)))
    nll_sum += float(np.sum(nll[:n], dtype=np.float64))
    ent_sum += float(np.sum(ent[:n], dtype=np.float64))
  count = arr.shape[0] * (arr.shape[1] - 1)
  nll = nll_sum / count
  return {"perplexity": math.exp(nll), "nll": nll, "mean_entropy": ent_sum / count}


# --------------------------------------------------------------------- greedy generation


def greedy_continuations(lm, params, contexts: Tokens, max_new_tokens: int = 96,
                         batch_size: int = 8, eos_id: Optional[int] = None) -> np.ndarray:
  """Greedy continuations of exactly `max_new_tokens` tokens. contexts [N, C] -> [N, max_new].

  Runs the library's greedy decoding loop (the registered "greedy" strategy, i.e. the jitted
  `decoding.token_loop.decode` with a KV cache) on fixed [batch_size, C] batches. Every row gets
  exactly `max_new_tokens` tokens: with `eos_id=None` no token stops decoding; with an
  `eos_id`, that token is banned for all steps (`min_new_tokens = max_new_tokens`), so the
  argmax is taken over the other tokens. Deterministic (argmax, ties to the lowest id).
  (The paper's code lets Hugging Face `generate` stop at EOS and pads with EOS instead.)
  """
  arr = _as_2d(contexts, "contexts", lm.vocab_size)
  N, C = arr.shape
  n = int(max_new_tokens)
  settings = greedy.Greedy(max_new_tokens=n, min_new_tokens=n if eos_id is not None else 0)
  if C + n > lm.max_positions:
    raise ValueError(f"context of {C} tokens + max_new_tokens={n} exceeds the model's context "
                     f"of {lm.max_positions} positions")
  target = Target(lm, params, eos_ids=() if eos_id is None else (int(eos_id),), pad_id=0)
  run = greedy.prepare(settings, target, Resources())
  out = np.empty((N, n), np.int32)
  start = 0
  for batch, rows in _batches(arr, batch_size):
    B = batch.shape[0]
    prompt_len = jnp.full((B,), C, jnp.int32)
    keys = jnp.zeros((B, 2), jnp.uint32)  # unused by greedy selection
    res = run(Batch(jnp.asarray(batch), prompt_len, keys, cache_len=C + n))
    tokens, lengths = jax.device_get((res.tokens, res.lengths))
    if np.any(lengths[:rows] != n):  # cannot happen: EOS is absent or banned
      raise RuntimeError(f"greedy decoding stopped early: lengths {lengths[:rows]}")
    out[start:start + rows] = tokens[:rows]
    start += rows
  return out


# ------------------------------------------------------------------- diversity and copying


def type_token_ratio(rows: Tokens, window: Optional[int] = None) -> float:
  """Mean over rows of (#distinct token ids / #tokens): token-level type-token ratio (TTR).

  Token ids, not words: the paper's code (`src/validation.py`, `_generation_validation`)
  computes `len(set(ids)) / len(ids)` on the generated token ids (the last
  `ttr_window_size = 96` of them), never on decoded words. `window` keeps only the last
  `window` tokens of each row, as that code does. rows: [N, L] or ragged; each row non-empty.
  A row of L distinct tokens has TTR 1, a constant row 1 / L.
  """
  ratios = []
  for i, r in enumerate(_rows(rows)):
    if window is not None:
      r = r[-int(window):]
    if r.size == 0:
      raise ValueError(f"row {i} is empty: TTR needs at least one token")
    ratios.append(np.unique(r).size / r.size)
  if not ratios:
    raise ValueError("no rows given")
  return float(np.mean(ratios))


def ngram_repetition(rows: Tokens, n: int) -> float:
  """Mean over rows of the fraction of repeated n-grams: 1 - #distinct n-grams / #n-grams.

  The sequence-level rep-n of "Neural Text Generation with Unlikelihood Training" (Welleck
  et al., ICLR 2020), on token ids: 0 when no n-gram repeats within a row, -> 1 for a row
  stuck in a loop. Rows with fewer than n tokens have no n-grams and are left out of the
  mean (nan if no row has any).
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  reps = []
  for r in _rows(rows):
    if r.size < n:
      continue
    grams = np.lib.stride_tricks.sliding_window_view(r, n)  # [L - n + 1, n]
    distinct = np.unique(grams, axis=0).shape[0]
    reps.append(1.0 - distinct / grams.shape[0])
  return float(np.mean(reps)) if reps else float("nan")


def distinct_n(rows: Tokens, n: int) -> float:
  """Corpus-level distinct-n: #distinct n-grams over all rows / #n-grams (n-grams within rows).

  The diversity measure of "A Diversity-Promoting Objective Function for Neural Conversation
  Models" (Li et al., NAACL 2016), on token ids: 1 when no n-gram occurs twice anywhere.
  nan when no row has n tokens.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  keys = [k for r in _rows(rows) for k in _ngram_keys(r, n)]
  return len(set(keys)) / len(keys) if keys else float("nan")


def _ngram_keys(row: np.ndarray, n: int) -> list[bytes]:
  """The n-grams of one row as hashable bytes keys (int64 ids)."""
  if row.size < n:
    return []
  grams = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(row, n))
  return [g.tobytes() for g in grams]


def training_ngrams(train_sequences: Tokens, n: int = 10) -> set[bytes]:
  """Every n-gram (n consecutive token ids within one training row) as a set of bytes keys.

  N-grams do not cross row boundaries. About 100 bytes per n-gram: fine for ~1e5-1e6 tokens.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  keys: set[bytes] = set()
  for r in _rows(train_sequences):
    keys.update(_ngram_keys(r, n))
  return keys


def copies_training_ngram(outputs: Tokens, train_sequences: Tokens, n: int = 10,
                          train_ngrams: Optional[set[bytes]] = None) -> np.ndarray:
  """[N] bool: whether each output contains an n-gram that also occurs in the training set.

  `train_ngrams` (from `training_ngrams(train_sequences, n)`) can be passed to reuse the set.
  """
  table = training_ngrams(train_sequences, n) if train_ngrams is None else train_ngrams
  return np.asarray([any(k in table for k in _ngram_keys(r, n)) for r in _rows(outputs)], bool)


def copy_fraction(outputs: Tokens, train_sequences: Tokens, n: int = 10) -> float:
  """Fraction of outputs that copy a training subsequence of n tokens (the paper: >= 10).

  An output counts when any n consecutive token ids of it also occur consecutively in one
  row of `train_sequences` (an output holding a longer copy holds such an n-gram too).
  outputs: [N, L] or ragged; train_sequences: [M, T] or ragged.
  """
  flags = copies_training_ngram(outputs, train_sequences, n)
  if flags.size == 0:
    raise ValueError("no outputs given")
  return float(np.mean(flags))


# ----------------------------------------------------------------------------- everything


def evaluate_lm(lm, params, heldout: Tokens, train_sequences: Tokens, context_len: int = 32,
                gen_len: int = 96, num_generations: Optional[int] = 32, batch_size: int = 8,
                eos_id: Optional[int] = None, copy_n: int = 10,
                rep_ns: Sequence[int] = (2, 4)) -> dict[str, float]:
  """All of the above on one held-out set; a flat dict of floats to report before/after.

  heldout: [N, T] token ids. Perplexity and entropy use every row in full. Greedy
  continuations of `gen_len` tokens start from the first `context_len` tokens of the first
  `num_generations` rows (all rows if None). The paper's code uses 32 contexts of 32 tokens
  and the TTR of the last 96 generated tokens (by default it generates up to the full
  held-out length, e.g. 224 tokens for 256-token rows; pass `gen_len` to match that and call
  `type_token_ratio(..., window=96)`). train_sequences: the fine-tuning set, for `copy_fraction`.
  Keys: perplexity, nll, mean_entropy, ttr, copy_fraction, rep_<n> for n in rep_ns, and
  num_generations.
  """
  held = _as_2d(heldout, "heldout", lm.config.vocab_size)
  if not 1 <= context_len <= held.shape[1]:
    raise ValueError(f"context_len must be in [1, {held.shape[1]}], got {context_len}")
  metrics = dict(perplexity_and_entropy(lm, params, held, batch_size))
  k = held.shape[0] if num_generations is None else min(int(num_generations), held.shape[0])
  if k < 1:
    raise ValueError(f"num_generations must be >= 1, got {num_generations}")
  outputs = greedy_continuations(lm, params, held[:k, :context_len], gen_len, batch_size, eos_id)
  metrics["ttr"] = type_token_ratio(outputs)
  metrics["copy_fraction"] = copy_fraction(outputs, train_sequences, copy_n)
  for n in rep_ns:
    metrics[f"rep_{n}"] = ngram_repetition(outputs, n)
  metrics["num_generations"] = float(k)
  return {key: float(v) for key, v in metrics.items()}

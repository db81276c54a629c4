"""Evaluation metrics (train/evaluation.py) against plain references on a tiny random model."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params
from train import evaluation

V = 32


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config(vocab_size=V)
  params = init_params(config, jax.random.PRNGKey(0))
  # Weights 25x the 0.02-scale init (norm scales kept): the layers then matter, greedy
  # continuations vary from step to step (not just repeating the last token) and the
  # argmax margins are far above rounding error.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x if "scale" in jax.tree_util.keystr(path) else x * 25.0, params)
  return TransformerLM(config), params


# One shape for every model call (5 rows of 12 tokens; contexts of 6 + 6 new tokens), so the
# whole file compiles each jitted function about once.
N, T, C, NEW = 5, 12, 6, 6


def random_tokens(seed, shape=(N, T), low=0, high=V):
  return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.int32)


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def row_logits(lm, params, row):
  """[T, V] logits of one row of length T (cache-free, batch of one)."""
  return np.asarray(lm(params, jnp.asarray(row[None]), jnp.arange(T)[None], None).logits[0])


def test_perplexity_matches_loop_reference(tiny):
  lm, params = tiny
  seqs = random_tokens(1)
  nll, ent, count = 0.0, 0.0, 0
  for row in seqs:  # one row at a time, float64 softmax, one prediction at a time
    logits = row_logits(lm, params, row)
    for t in range(1, T):
      logp = log_softmax64(logits[t - 1])
      nll -= logp[row[t]]
      ent -= np.sum(np.exp(logp) * logp)
      count += 1
  got = evaluation.perplexity_and_entropy(lm, params, seqs, batch_size=2)
  assert got["nll"] == pytest.approx(nll / count, rel=1e-5)
  assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
  assert got["mean_entropy"] == pytest.approx(ent / count, rel=1e-5)
  assert all(type(v) is float for v in got.values())


def test_uniform_model_has_entropy_log_v_and_perplexity_v(tiny):
  lm, params = tiny
  uniform = dict(params)
  uniform["embed"] = {"table": jnp.zeros_like(params["embed"]["table"])}  # tied head: logits 0
  got = evaluation.perplexity_and_entropy(lm, uniform, random_tokens(2), batch_size=2)
  assert got["mean_entropy"] == pytest.approx(math.log(V), rel=1e-6)
  assert got["perplexity"] == pytest.approx(V, rel=1e-5)
  assert got["nll"] == pytest.approx(math.log(V), rel=1e-6)


def test_padding_of_last_batch_does_not_change_results(tiny):
  lm, params = tiny
  seqs = random_tokens(3)
  one_batch = evaluation.perplexity_and_entropy(lm, params, seqs, batch_size=8)  # [5, T]
  padded = evaluation.perplexity_and_entropy(lm, params, seqs, batch_size=2)  # 2 + 2 + (1 + pad)
  for k in one_batch:
    assert padded[k] == pytest.approx(one_batch[k], rel=1e-6)
  # Greedy: reversing the rows moves a different row into the padded last batch.
  ctx = seqs[:, :C]
  forward = evaluation.greedy_continuations(lm, params, ctx, NEW, batch_size=2)
  backward = evaluation.greedy_continuations(lm, params, ctx[::-1], NEW, batch_size=2)
  np.testing.assert_array_equal(forward, backward[::-1])


def test_greedy_continuations_equal_argmax_loop(tiny):
  lm, params = tiny
  ctx = random_tokens(4)[:, :C]
  got = evaluation.greedy_continuations(lm, params, ctx, max_new_tokens=NEW, batch_size=2)
  assert got.shape == (N, NEW) and got.dtype == np.int32
  assert len(np.unique(got)) > NEW  # a non-trivial model: continuations are not constant
  for row, out in zip(ctx, got):  # cache-free: the whole prefix through the model every step
    seq = np.zeros(T, np.int32)  # causal, so the zero tail does not affect earlier positions
    seq[:C] = row
    for t in range(C, T):
      seq[t] = int(np.argmax(row_logits(lm, params, seq)[t - 1]))
    np.testing.assert_array_equal(out, seq[C:])


def test_greedy_with_eos_bans_it_and_keeps_length(tiny):
  lm, params = tiny
  ctx = random_tokens(5)[:, :C]
  free = evaluation.greedy_continuations(lm, params, ctx, NEW, batch_size=2)
  eos = int(free[0, 0])  # the first token row 0 would emit
  got = evaluation.greedy_continuations(lm, params, ctx, NEW, batch_size=2, eos_id=eos)
  assert got.shape == (N, NEW) and not np.any(got == eos)
  assert not np.array_equal(got[0], free[0])


def test_type_token_ratio():
  L = 96
  assert evaluation.type_token_ratio(np.arange(L)[None]) == 1.0
  assert evaluation.type_token_ratio(np.full((1, L), 7)) == pytest.approx(1 / L)
  rows = np.stack([np.arange(L), np.full(L, 3)])
  assert evaluation.type_token_ratio(rows) == pytest.approx((1 + 1 / L) / 2)
  # window: only the last tokens count; ragged rows are accepted.
  assert evaluation.type_token_ratio([[1, 1, 1, 2, 3]], window=2) == 1.0
  assert evaluation.type_token_ratio([[5, 5], [1, 2, 3]]) == pytest.approx(0.75)


def test_distinct_n():
  # Rows [1 2 3 1 2] and [3 1 2]: bigrams 12 23 31 12 | 31 12 -> 3 distinct of 6.
  assert evaluation.distinct_n([[1, 2, 3, 1, 2], [3, 1, 2]], 2) == pytest.approx(3 / 6)
  assert evaluation.distinct_n([np.arange(10)], 3) == 1.0
  # N-grams do not cross rows: [1 2] [3 4] has no bigram (2 3).
  assert evaluation.distinct_n([[1, 2], [3, 4]], 2) == 1.0
  assert np.isnan(evaluation.distinct_n([[1]], 2))


def test_ngram_repetition():
  assert evaluation.ngram_repetition(np.arange(20)[None], 2) == 0.0
  assert evaluation.ngram_repetition(np.full((1, 10), 4), 1) == pytest.approx(0.9)
  loop = np.tile([1, 2, 3], 4)[None]  # 10 trigrams, 3 distinct
  assert evaluation.ngram_repetition(loop, 3) == pytest.approx(0.7)
  assert math.isnan(evaluation.ngram_repetition([[1, 2]], 3))


def test_copy_fraction_finds_planted_10gram_and_ignores_9gram():
  rng = np.random.default_rng(6)
  train = rng.integers(0, 1000, size=(20, 64))  # training ids in [0, 1000)
  outputs = rng.integers(1000, 2000, size=(4, 96))  # outputs in [1000, 2000): no overlap
  outputs[0, 30:40] = train[7, 11:21]  # a 10-gram copied from training
  outputs[1, 50:59] = train[3, 0:9]  # only a 9-gram
  outputs[2, :5] = train[4, -5:]  # 10 tokens spanning two training rows: not a training n-gram
  outputs[2, 5:10] = train[5, :5]
  assert evaluation.copy_fraction(outputs, train, n=10) == pytest.approx(0.25)
  np.testing.assert_array_equal(evaluation.copies_training_ngram(outputs, train, n=10),
                                [True, False, False, False])
  assert evaluation.copy_fraction(outputs, train, n=9) == pytest.approx(0.5)
  assert evaluation.copy_fraction(jnp.asarray(outputs), list(train), n=10) == pytest.approx(0.25)


def test_evaluate_lm_reports_flat_floats(tiny):
  lm, params = tiny
  held = random_tokens(7)
  train = random_tokens(8, (4, T))
  got = evaluation.evaluate_lm(lm, params, held, train, context_len=C, gen_len=NEW,
                               num_generations=3, batch_size=2, rep_ns=(1, 2))
  assert set(got) == {"perplexity", "nll", "mean_entropy", "ttr", "copy_fraction", "rep_1",
                      "rep_2", "num_generations"}
  assert all(type(v) is float for v in got.values())
  outs = evaluation.greedy_continuations(lm, params, held[:3, :C], NEW, batch_size=2)
  assert got["ttr"] == pytest.approx(evaluation.type_token_ratio(outs))
  assert got["rep_1"] == pytest.approx(1 - got["ttr"])  # rep-1 is 1 - TTR on full rows
  assert got["perplexity"] == pytest.approx(
      evaluation.perplexity_and_entropy(lm, params, held, batch_size=2)["perplexity"], rel=1e-6)

"""Logits processors equal Hugging Face's processors of the same name."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from decoding import processors as P

torch = pytest.importorskip("torch")
hf = pytest.importorskip("transformers.generation.logits_process")


def _case(seed, B=3, S=12, V=20):
  rng = np.random.default_rng(seed)
  seqs = rng.integers(0, V, (B, S)).astype(np.int32)
  seqs[:, 6:9] = seqs[:, 0:3]  # repeated n-grams
  logits = (rng.normal(size=(B, V)) * 2).astype(np.float32)
  return seqs, logits


def _ctx(seqs, step=0, prompt_len=4):
  B, S = seqs.shape
  return P.ProcessorContext(sequences=jnp.asarray(seqs), seq_len=jnp.full((B,), S, jnp.int32),
                            prompt_len=jnp.full((B,), prompt_len, jnp.int32),
                            step=jnp.asarray(step, jnp.int32))


def _same(ours, ref):
  ours, ref = np.asarray(ours), ref.numpy()
  np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
  fin = np.isfinite(ref)
  np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("make_ours,make_ref", [
    (lambda: P.RepetitionPenalty(1.3), lambda: hf.RepetitionPenaltyLogitsProcessor(1.3)),
    (lambda: P.RepetitionPenalty(0.7), lambda: hf.RepetitionPenaltyLogitsProcessor(0.7)),
    (lambda: P.NoRepeatNGram(2), lambda: hf.NoRepeatNGramLogitsProcessor(2)),
    (lambda: P.NoRepeatNGram(3), lambda: hf.NoRepeatNGramLogitsProcessor(3)),
    (lambda: P.Temperature(0.6), lambda: hf.TemperatureLogitsWarper(0.6)),
    (lambda: P.TopK(5), lambda: hf.TopKLogitsWarper(5)),
    (lambda: P.TopP(0.8), lambda: hf.TopPLogitsWarper(0.8)),
    (lambda: P.TopP(0.3), lambda: hf.TopPLogitsWarper(0.3)),
    (lambda: P.MinP(0.1), lambda: hf.MinPLogitsWarper(0.1)),
])
def test_matches_hf(seed, make_ours, make_ref):
  seqs, logits = _case(seed)
  ours = make_ours()(jnp.asarray(logits), _ctx(seqs))
  ref = make_ref()(torch.tensor(seqs, dtype=torch.long), torch.tensor(logits))
  _same(ours, ref)


@pytest.mark.parametrize("step", [0, 3, 5])
def test_min_new_tokens_matches_hf(step):
  seqs, logits = _case(0)
  ctx = _ctx(seqs[:, :4 + step], step=step)
  ours = P.MinNewTokens(5, (2, 7))(jnp.asarray(logits), ctx)
  ref = hf.MinNewTokensLengthLogitsProcessor(4, 5, [2, 7])(
      torch.tensor(seqs[:, :4 + step], dtype=torch.long), torch.tensor(logits))
  _same(ours, ref)


def test_ngram_ignores_padding_beyond_row_length():
  seqs = np.array([[1, 2, 1, 0, 1, 2]], np.int32)  # only the first 3 are valid context
  ctx = P.ProcessorContext(sequences=jnp.asarray(seqs), seq_len=jnp.asarray([3]),
                           prompt_len=jnp.asarray([3]), step=jnp.asarray(0))
  out = np.asarray(P.NoRepeatNGram(2)(jnp.zeros((1, 4)), ctx))
  assert np.isneginf(out[0, 2]) and np.isfinite(out[0, 0])  # "1 2" seen; "1 0" was padding


@settings(max_examples=40, deadline=None)
@given(p=st.floats(0.01, 1.0), k=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_chain_of_warpers_matches_hf(p, k, seed):
  seqs, logits = _case(seed, V=12)
  ours = P.chain(P.Temperature(0.9), P.TopK(k), P.TopP(p))(jnp.asarray(logits), _ctx(seqs))
  t = torch.tensor(logits)
  ids = torch.tensor(seqs, dtype=torch.long)
  for w in (hf.TemperatureLogitsWarper(0.9), hf.TopKLogitsWarper(k), hf.TopPLogitsWarper(p)):
    t = w(ids, t)
  _same(ours, t)
  assert np.isfinite(np.asarray(ours)).any(axis=-1).all()  # never removes every token


def test_invalid_processor_values():
  with pytest.raises(ValueError, match="temperature"):
    P.Temperature(0.0)
  with pytest.raises(ValueError, match="top_p"):
    P.TopP(1.5)
  with pytest.raises(ValueError, match="top_k"):
    P.TopK(0)


def test_warpers_keep_min_tokens_to_keep():
  """HF's beam sampling keeps at least 1 + |EOS| tokens in top-k, top-p and min-p."""
  logits = jnp.asarray([[5.0, 1.0, 0.5, 0.0, -1.0]])
  ctx = None
  for proc in (P.TopK(1, 3), P.TopP(0.01, 3), P.MinP(0.9, 3)):
    kept = np.isfinite(np.asarray(proc(logits, ctx)))[0]
    assert kept.tolist() == [True, True, True, False, False]
  assert np.isfinite(np.asarray(P.TopK(1)(logits, ctx))).sum() == 1


def test_processors_are_values():
  """Equal settings give equal, equally hashed processors: a jitted loop taking one as a
  static argument compiles once per setting, without caches keyed on object identity."""
  a = P.chain(P.RepetitionPenalty(1.2), P.Temperature(0.7), P.TopP(0.9))
  b = P.chain(P.RepetitionPenalty(1.2), P.Temperature(0.7), P.TopP(0.9))
  assert a == b and hash(a) == hash(b) and a is not b
  assert a != P.chain(P.RepetitionPenalty(1.2), P.Temperature(0.8), P.TopP(0.9))
  assert a.reads_context and not P.chain(P.Temperature(0.7), P.TopK(3)).reads_context
  assert P.penalties(0, 1.0, 0, [2]) == P.IDENTITY  # neutral settings add nothing
  assert P.penalties(3, 1.0, 0, [-1]) == P.IDENTITY  # no real EOS id: nothing to ban

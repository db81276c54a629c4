"""Device n-gram tables (decoding/ngram.py) against brute-force counting in Python."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import ngram
from tests.helpers import ngram_counts


def expected_probs(table, history, available, candidates, max_context):
  out = np.zeros((len(candidates), max_context))
  for j, v in enumerate(candidates):
    for c in range(1, max_context + 1):
      ctx = tuple(history[len(history) - c:])
      nexts = table[c].get(ctx)
      if c <= available and nexts:
        out[j, c - 1] = nexts[v] / sum(nexts.values())
  return out


def corpus_and_queries(rng, vocab, offset, num_docs=30, num_queries=200, max_context=5):
  # A tiny effective vocabulary (4 symbols) so that long n-grams repeat; `offset` moves the
  # ids up (to exercise 16-bit packing near 2^16, or one token per word above it).
  docs = [list(offset + rng.integers(0, 4, int(rng.integers(0, 40)))) for _ in range(num_docs)]
  docs.append([offset + 1])  # too short for any n-gram
  H = max_context + 2
  hist, avail, cands = [], [], []
  for q in range(num_queries):
    d = docs[int(rng.integers(0, num_docs))]
    if q % 3 and len(d) > H:  # a context taken from the corpus: mostly seen n-grams
      start = int(rng.integers(0, len(d) - H))
      h = d[start:start + H]
    else:  # random context: often unseen
      h = list(offset + rng.integers(0, 5, H))
    hist.append(h)
    avail.append(int(rng.integers(1, max_context + 2)))
    cands.append(list(offset + rng.integers(0, 5, 6)))
  assert vocab > offset + 5
  return docs, np.asarray(hist), np.asarray(avail), np.asarray(cands)


@pytest.mark.parametrize("vocab,offset", [(50, 0), (65536, 65530), (70000, 65600)])
def test_device_probabilities_equal_brute_force(vocab, offset):
  rng = np.random.default_rng(vocab)
  docs, hist, avail, cands = corpus_and_queries(rng, vocab, offset)
  model = ngram.build_ngram_model(docs, vocab)
  assert model.tokens_per_word == (2 if vocab <= 65536 else 1)
  got = np.asarray(ngram.order_probs(model, jnp.asarray(hist), jnp.asarray(avail),
                                              jnp.asarray(cands)))
  table = ngram_counts(docs, ngram.MAX_CONTEXT)
  want = np.stack([expected_probs(table, h, a, c, ngram.MAX_CONTEXT)
                   for h, a, c in zip(hist, avail, cands)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  # The queries cover all three cases: seen n-grams, seen contexts with an unseen next
  # token, unseen contexts; and orders skipped for lack of context.
  assert (want > 0).sum() > 100 and (want == 0).sum() > 100
  assert (avail < ngram.MAX_CONTEXT).any()

  weights = jnp.asarray([0.01, 0.04, 0.15, 0.18, 0.12])
  mixed = ngram.interpolated_prob(model, jnp.asarray(hist), jnp.asarray(avail),
                                  jnp.asarray(cands), weights)
  np.testing.assert_allclose(np.asarray(mixed), want @ np.asarray(weights), rtol=1e-5, atol=1e-9)
  # Fewer weights than orders: the missing orders weigh 0.
  mixed2 = ngram.interpolated_prob(model, jnp.asarray(hist), jnp.asarray(avail),
                                   jnp.asarray(cands), weights[:2])
  np.testing.assert_allclose(np.asarray(mixed2), want[..., :2] @ np.asarray(weights[:2]),
                             rtol=1e-5, atol=1e-9)


def test_every_stored_ngram_is_found_with_its_count():
  rng = np.random.default_rng(1)
  docs = [list(rng.integers(0, 6, 60)) for _ in range(10)]
  model = ngram.build_ngram_model(docs, 6, max_context=3)
  table = ngram_counts(docs, 3)
  rows = sum(len(n) for c in table.values() for n in c.values())
  assert model.num_rows == rows + 1  # + the padding row
  keys, offsets = np.asarray(model.keys), np.asarray(model.offsets)
  assert len({tuple(k) for k in keys}) == len(keys)  # one row per n-gram
  # Each bucket's rows hash to it, and the largest bucket sets the static scan width.
  bucket = ngram._hash(keys, np) & np.uint32(len(offsets) - 2)
  np.testing.assert_array_equal(bucket, np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))
  assert model.bucket_size == np.diff(offsets).max() >= 2  # shared buckets: told apart by keys
  # Query every stored n-gram (as the last c + 1 tokens of a context) at once.
  hist, cands, want = [], [], []
  for c, ctxs in table.items():
    for ctx, nexts in ctxs.items():
      for v, n in nexts.items():
        hist.append([0] * (3 - c) + list(ctx))
        cands.append([v])
        want.append((c, n / sum(nexts.values())))
  got = np.asarray(ngram.order_probs(model, jnp.asarray(hist), jnp.full((len(hist),), 3),
                                     jnp.asarray(cands)))[:, 0, :]
  for g, (c, p) in zip(got, want):
    assert g[c - 1] == pytest.approx(p, rel=1e-6)


class CharTokenizer:
  """A stand-in tokenizer: one id per byte."""
  vocab_size = 256

  def encode(self, text, add_special_tokens=True):
    return list(text.encode())


def test_tables_are_cached_on_disk(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="unknown n-gram corpus"):
    ngram.corpus_documents("nope/train")
  monkeypatch.setenv("DECODAX_NGRAM_DIR", str(tmp_path))
  monkeypatch.setattr(ngram, "corpus_documents", lambda corpus: ["abracadabra", "banana band"])
  tok = CharTokenizer()
  tables, seconds = ngram.load_tables(ngram.DEFAULT_CORPUS, tok)
  model = ngram.model_from_tables(tables)
  path = ngram.cache_path(ngram.DEFAULT_CORPUS, ngram.tokenizer_fingerprint(tok))
  assert path.startswith(str(tmp_path)) and os.path.isfile(path) and seconds is not None
  monkeypatch.setattr(ngram, "corpus_documents", lambda corpus: pytest.fail("rebuilt"))
  again = ngram.load_ngram_model(ngram.DEFAULT_CORPUS, tok)  # from the .npz
  assert ngram.load_tables(ngram.DEFAULT_CORPUS, tok)[1] is None  # read, not built
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # "a" follows "n" 2 times out of 3 ("banana band"), and "an" 2 times out of 3.
  probs = ngram.order_probs(again, jnp.asarray([[0, 0, 0, ord("a"), ord("n")]]),
                            jnp.asarray([2]), jnp.asarray([[ord("a")]]))
  np.testing.assert_allclose(np.asarray(probs)[0, 0], [2 / 3, 2 / 3, 0, 0, 0], rtol=1e-6)

"""The decoding core on fake and tiny models: exact tokens, EOS, lengths, log-probs, keys."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import prefill, runner, sampling, token_loop
from decoding.sampling import Sample
from decoding.strategy import Batch, Resources
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params
from tests.fakes import BigramLM
from tests.helpers import run_config, target

EOS, PAD = 1, 0


def cfg(**kw):
  base = dict(strategy="greedy", max_new_tokens=6, min_new_tokens=0, seed=0, batch_size=8)
  base.update(kw)
  return base


def bigram_table(V=6):
  # Deterministic chain 2 -> 3 -> 4 -> 5 -> EOS(1); token 0 (pad) -> 2.
  t = np.full((V, V), -5.0, np.float32)
  for a, b in [(0, 2), (2, 3), (3, 4), (4, 5), (5, EOS), (EOS, 2)]:
    t[a, b] = 5.0
  return jnp.asarray(t)


def test_greedy_follows_chain_and_stops_at_eos():
  lm, table = BigramLM(6), bigram_table()
  out = run_config(lm, table, [[2], [4], [3, 4, 5, 2]], cfg(), [EOS], PAD)
  assert out[0].output_ids == [3, 4, 5, EOS]
  assert out[1].output_ids == [5, EOS]
  assert out[2].output_ids == [3, 4, 5, EOS]
  assert all(g.finished for g in out)
  # Log-probs are the model's log-softmax of the chosen tokens; score is their sum.
  lp = jax.nn.log_softmax(table, -1)
  assert out[1].token_logprobs == pytest.approx([float(lp[4, 5]), float(lp[5, EOS])], abs=1e-6)
  assert out[1].score == pytest.approx(sum(out[1].token_logprobs), abs=1e-6)


def test_max_and_min_new_tokens():
  lm, table = BigramLM(6), bigram_table()
  out = run_config(lm, table, [[2]], cfg(max_new_tokens=2), [EOS], PAD)
  assert out[0].output_ids == [3, 4] and not out[0].finished
  out = run_config(lm, table, [[4]], cfg(min_new_tokens=4), [EOS], PAD)
  # EOS is banned for the first 4 tokens: 5 -> (EOS banned) best other token.
  ids = out[0].output_ids
  assert len(ids) >= 4 and EOS not in ids[:4]


def test_repetition_penalty_and_ngram_ban_change_greedy_path():
  V = 6
  t = np.full((V, V), 0.0, np.float32)
  t[2, 3], t[3, 2], t[2, 4], t[3, 5] = 3.0, 3.0, 2.5, 2.0  # 2 3 2 3 ... loop
  lm = BigramLM(V)
  plain = run_config(lm, jnp.asarray(t), [[2]], cfg(max_new_tokens=4), [EOS], PAD)
  assert plain[0].output_ids == [3, 2, 3, 2]
  banned = run_config(lm, jnp.asarray(t), [[2]], cfg(max_new_tokens=4,
                                                               no_repeat_ngram_size=2),
                               [EOS], PAD)
  seq = [2] + banned[0].output_ids
  grams = list(zip(seq, seq[1:]))
  assert len(grams) == len(set(grams))


def test_sampling_matches_model_distribution_chi_square():
  """Two-token joint distribution of samples matches the exact bigram probabilities."""
  V = 4
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(V, V)).astype(np.float32))
  lm = BigramLM(V)
  n = 4000
  keys = runner.row_keys(123, range(n))
  proc = Sample().logits_processor([])
  res = token_loop.decode(lm, table, jnp.full((n, 1), 2, jnp.int32), jnp.ones((n,), jnp.int32), keys,
                    jnp.asarray([-1], jnp.int32), processor=proc, select=token_loop.sample_select,
                    pad_id=PAD, max_new_tokens=2, cache_len=4)
  toks = np.asarray(res.tokens)
  p = np.asarray(jax.nn.softmax(table, -1))
  expected = np.array([p[2, a] * p[a, b] for a, b in itertools.product(range(V), range(V))]) * n
  observed = np.array([np.sum((toks[:, 0] == a) & (toks[:, 1] == b))
                       for a, b in itertools.product(range(V), range(V))])
  chi2 = float(((observed - expected) ** 2 / expected).sum())
  # 15 degrees of freedom: the 0.999 quantile is 37.7.
  assert chi2 < 37.7, chi2


@pytest.fixture(scope="module")
def tiny():
  c = tiny_config(vocab_size=40, num_layers=2)
  return TransformerLM(c), init_params(c, jax.random.PRNGKey(0))


def test_ragged_batch_equals_each_prompt_alone(tiny):
  lm, params = tiny
  prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15], [3, 3]]
  for strat, extra in (("greedy", {}), ("sample", {"temperature": 0.7})):
    c = cfg(strategy=strat, max_new_tokens=8, **extra)
    together = run_config(lm, params, prompts, c, [EOS], PAD)
    for i, p in enumerate(prompts):
      alone = run_config(lm, params, [p], c, [EOS], PAD, row_ids=[i])
      assert alone[0].output_ids == together[i].output_ids, (strat, i)
      np.testing.assert_allclose(alone[0].token_logprobs, together[i].token_logprobs, atol=1e-5)


def test_sampling_is_seeded_per_row(tiny):
  lm, params = tiny
  c = cfg(strategy="sample", max_new_tokens=10)
  a = run_config(lm, params, [[5, 6], [7]], c, [], PAD)
  b = run_config(lm, params, [[5, 6], [7]], c, [], PAD)
  assert [g.output_ids for g in a] == [g.output_ids for g in b]
  c2 = cfg(strategy="sample", max_new_tokens=10, seed=1)
  d = run_config(lm, params, [[5, 6], [7]], c2, [], PAD)
  assert [g.output_ids for g in a] != [g.output_ids for g in d]
  # Same row id in a different batch composition and order gives the same sample.
  e = run_config(lm, params, [[9], [7], [5, 6]], c, [], PAD, row_ids=[7, 1, 0])
  assert e[2].output_ids == a[0].output_ids and e[1].output_ids == a[1].output_ids


def test_samples_per_prompt_share_one_prefill(tiny):
  """R samples per prompt from one prefill (cache rows copied) equal decoding R copies of
  the prompt with the same keys; sample 0 is the R = 1 sample; samples differ."""
  lm, params = tiny
  prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
  c = cfg(strategy="sample", max_new_tokens=8, num_return_sequences=3, batch_size=8)
  shared = run_config(lm, params, prompts, c, [EOS], PAD)
  assert [(g.index, g.rank) for g in shared] == [(i, r) for i in range(3) for r in range(3)]
  padded = np.full((9, 16), PAD, np.int32)
  lens = np.zeros((9,), np.int32)
  for i, p in enumerate(prompts):
    padded[3 * i:3 * i + 3, :len(p)] = p
    lens[3 * i:3 * i + 3] = len(p)
  keys = runner.sample_keys(jnp.repeat(runner.row_keys(0, range(3)), 3, axis=0),
                            jnp.tile(jnp.arange(3, dtype=jnp.uint32), 3))
  copies = sampling.prepare(Sample(max_new_tokens=8), target(lm, params, [EOS], PAD),
                            Resources())(
      Batch(jnp.asarray(padded), jnp.asarray(lens), keys, cache_len=24))
  for row, g in enumerate(shared):
    L = int(copies.lengths[row])
    assert g.output_ids == [int(t) for t in copies.tokens[row, :L]]
  single = run_config(lm, params, prompts, cfg(strategy="sample", max_new_tokens=8),
                               [EOS], PAD)
  assert [g.output_ids for g in single] == [g.output_ids for g in shared if g.rank == 0]
  assert len({tuple(g.output_ids) for g in shared}) > 3


def test_greedy_matches_brute_force_argmax(tiny):
  """Greedy tokens equal step-by-step argmax of full (uncached) forward passes."""
  lm, params = tiny
  prompt = [4, 9, 2]
  out = run_config(lm, params, [prompt], cfg(max_new_tokens=6), [], PAD)[0]
  seq = list(prompt)
  for _ in range(6):  # fixed padded shape: one compile
    padded = jnp.asarray([seq + [0] * (16 - len(seq))])
    logits = lm(params, padded, jnp.arange(16)[None], lm.init_cache(1, 16),
                logits_at=jnp.asarray([[len(seq) - 1]])).logits
    seq.append(int(jnp.argmax(logits[0, 0])))
  assert out.output_ids == seq[len(prompt):]


def test_bucketed_shapes_do_not_recompile(tiny):
  lm, params = tiny
  c = cfg(max_new_tokens=4)
  run_config(lm, params, [[1, 2, 3]], c, [], PAD)
  before = token_loop.decode._cache_size()
  run_config(lm, params, [[4, 5, 6, 7, 8]], c, [], PAD)
  run_config(lm, params, [[9] * 11], c, [], PAD)
  assert token_loop.decode._cache_size() == before


def test_prompt_slots_give_chunks_the_whole_lists_shapes_and_outputs(tiny):
  """A prompt list run in chunks with prompt_slots = the list's longest prompt compiles no
  new shape and gives bit for bit the outputs of one call; without it, the chunk of short
  prompts is padded to a smaller bucket."""
  lm, params = tiny
  prompts = [[5] * 20, [6, 7], [8, 9, 10], [11]]  # buckets 32, then 16
  c = cfg(max_new_tokens=5, batch_size=2)
  whole = run_config(lm, params, prompts, c, [], PAD)
  compiled = token_loop.decode._cache_size()
  chunks = [run_config(lm, params, prompts[i:i + 2], c, [], PAD, row_ids=[i, i + 1],
                       prompt_slots=20) for i in (0, 2)]
  assert token_loop.decode._cache_size() == compiled
  for g, h in zip(whole, chunks[0] + chunks[1]):
    assert g.output_ids == h.output_ids
    np.testing.assert_array_equal(g.token_logprobs, h.token_logprobs)
  run_config(lm, params, prompts[2:], c, [], PAD)
  assert token_loop.decode._cache_size() == compiled + 1


def test_chunked_prefill_equals_one_pass(tiny):
  """A long prompt block prefilled in chunks gives the same logits and cache as one pass."""
  lm, params = tiny
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(0, 40, size=(3, 64)), jnp.int32)
  lens = jnp.asarray([64, 17, 40], jnp.int32)
  one_logits, one_cache = prefill.prefill(lm, params, prompts, lens, lm.init_cache(3, 80), chunk=64)
  ch_logits, ch_cache = prefill.prefill(lm, params, prompts, lens, lm.init_cache(3, 80), chunk=16)
  np.testing.assert_allclose(ch_logits, one_logits, atol=1e-5)
  np.testing.assert_array_equal(ch_cache.lengths, one_cache.lengths)
  np.testing.assert_allclose(ch_cache.k[:, :, :, :64], one_cache.k[:, :, :, :64], atol=1e-5)

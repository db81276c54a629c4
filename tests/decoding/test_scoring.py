"""Teacher-forced scoring, G-NLL (card 16), self-certainty (card 17) and AUROC."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from decoding import scoring
from decoding.errors import GenerationError
from tests.helpers import run_config
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params


@pytest.fixture(scope="module")
def tiny():
  c = tiny_config(vocab_size=5, hidden_size=16, num_layers=2)
  # Large weights make the distributions peaked enough for greedy to miss the MAP sometimes.
  params = jax.tree.map(lambda x: 4 * x, init_params(c, jax.random.PRNGKey(3)))
  return TransformerLM(c), params


def _greedy(lm, params, prompts, n):
  cfg = ml_collections.ConfigDict(dict(strategy="greedy", max_new_tokens=n, seed=0))
  return run_config(lm, params, prompts, cfg, eos_ids=[], pad_id=0)


def test_gnll_brute_force_bound_and_equality(tiny):
  """Card 16: G-NLL >= -log max_y p(y|x) over all V^4 continuations, with equality exactly
  when greedy decoding finds the most likely sequence."""
  lm, params = tiny
  prompts = [[1, 2], [3], [4, 0, 1], [2, 2, 2, 3], [0], [1, 4]]
  greedy = _greedy(lm, params, prompts, 4)
  conts = [list(y) for y in itertools.product(range(5), repeat=4)]
  outcomes = set()
  for p, g in zip(prompts, greedy):
    scores = scoring.score_continuations(lm, params, [p] * len(conts), conts, batch_size=128)
    nll = np.array([s.nll for s in scores])
    best = int(np.argmin(nll))
    assert g.gnll >= nll[best] - 1e-5
    is_map = g.output_ids == conts[best]
    assert (abs(g.gnll - nll[best]) < 1e-5) == is_map
    outcomes.add(is_map)
  assert outcomes == {True, False}, "the tiny model should exercise both cases"


def test_gnll_equals_teacher_forced_nll_of_greedy_output(smollm, prompt_ids):
  prompts = prompt_ids[:3]
  greedy = _greedy(smollm.lm, smollm.params, prompts, 12)
  scored = scoring.score_continuations(smollm.lm, smollm.params, prompts,
                                       [g.output_ids for g in greedy])
  for g, s in zip(greedy, scored):
    assert s.is_greedy  # every token is the argmax of its step
    np.testing.assert_allclose(s.nll, g.gnll, rtol=1e-4)
    np.testing.assert_allclose(s.token_logprobs, s.max_logp, atol=1e-6)
    # Self-certainty seen while decoding equals teacher-forced re-scoring.
    np.testing.assert_allclose(s.self_certainty, g.self_certainty, rtol=1e-4)
    np.testing.assert_allclose(s.entropy, g.token_entropy, rtol=1e-3, atol=1e-4)


def test_ragged_batch_equals_alone(tiny):
  lm, params = tiny
  prompts, conts = [[1, 2, 3], [4]], [[0, 1], [2, 3, 4, 0, 1]]
  both = scoring.score_continuations(lm, params, prompts, conts)
  for i in range(2):
    alone = scoring.score_continuations(lm, params, [prompts[i]], [conts[i]])[0]
    np.testing.assert_allclose(both[i].token_logprobs, alone.token_logprobs, atol=1e-6)
    np.testing.assert_array_equal(both[i].rank, alone.rank)


def test_statistics_equal_direct_formulas():
  """Entropy, mean log-prob, rank and self-certainty against numpy on explicit logits."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3
  tokens = rng.integers(0, 7, size=(2, 3))
  st = jax.device_get(scoring.stats_from_logits(jnp.asarray(logits), jnp.asarray(tokens)))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(st.entropy, -(p * np.log(p)).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(st.mean_logp, np.log(p).mean(-1), rtol=1e-5)
  order_rank = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)
  np.testing.assert_array_equal(st.rank, order_rank)
  # SC = mean_t KL(U || p_t), computed directly.
  kl = (np.full(7, 1 / 7) * np.log((1 / 7) / p[0])).sum(-1).mean()
  assert scoring.self_certainty(st.mean_logp[0], 7) == pytest.approx(kl, rel=1e-5)


def test_self_certainty_properties():
  V = 11
  uniform = jnp.zeros((1, 4, V))
  sharp = jnp.zeros((1, 4, V)).at[..., 0].set(5.0)
  sharper = jnp.zeros((1, 4, V)).at[..., 0].set(9.0)
  toks = jnp.zeros((1, 4), jnp.int32)
  sc = lambda l: scoring.self_certainty(np.asarray(scoring.stats_from_logits(l, toks).mean_logp[0]), V)
  assert sc(uniform) == pytest.approx(0.0, abs=1e-6)
  assert 0 < sc(sharp) < sc(sharper)
  rng = np.random.default_rng(1)
  for _ in range(5):
    assert sc(jnp.asarray(rng.normal(size=(1, 4, V)) * 4)) >= 0


def test_auroc_equals_pairwise_count():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 5, size=40).astype(float)  # many ties
  y = rng.random(40) < 0.4
  pairs = [(a, b) for a in s[y] for b in s[~y]]
  expected = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
  assert scoring.auroc(s, y) == pytest.approx(expected)
  assert scoring.auroc([1, 2, 3], [False, False, True]) == 1.0
  assert scoring.auroc([3, 2, 1], [False, False, True]) == 0.0
  assert math.isnan(scoring.auroc([1, 2], [True, True]))


def test_bad_input_is_rejected_before_compiling(tiny):
  lm, params = tiny
  with pytest.raises(GenerationError, match="outside"):
    scoring.score_continuations(lm, params, [[1]], [[7]])
  with pytest.raises(GenerationError, match="continuations"):
    scoring.score_continuations(lm, params, [[1]], [[1], [2]])
  with pytest.raises(GenerationError, match="context"):
    scoring.score_continuations(lm, params, [[1]], [[1] * 200])

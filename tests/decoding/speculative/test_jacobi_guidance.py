"""Speculative Jacobi decoding (greedy = AR greedy; sampling = the target's sequence law by
chi-square; forward passes <= tokens) and classifier-free guidance (the guided scores, scale 1 /
0 = conditional / unconditional decoding, and every strategy running through GuidedLM)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import beam_search as beam
from decoding import guidance, token_loop
from decoding.speculative import jacobi, loop, prompt_lookup
from models import transformer
from models.config import tiny_config
from models.lm import TransformerLM
from tests.helpers import chi2_pvalue, processor_of, row_keys


def _tiny(V=32, seed=0):
  cfg = tiny_config(vocab_size=V, max_position_embeddings=128)
  return TransformerLM(cfg), transformer.init_params(cfg, jax.random.PRNGKey(seed))


def _greedy(lm, params, prompts, lens, n, proc=None):
  proc = proc or processor_of({}, [])
  return token_loop.decode(lm, params, prompts, lens, row_keys(prompts.shape[0]),
                     jnp.asarray([-1], jnp.int32), processor=proc,
                     select=token_loop.greedy_select, pad_id=0, max_new_tokens=n, cache_len=64)


def _jacobi(lm, params, drafter, prompts, lens, n, sample=False, proc=None, keys=None):
  proc = proc or processor_of({}, [], sampling=sample)
  keys = row_keys(prompts.shape[0]) if keys is None else keys
  return loop.speculative_decode(
      lm, params, drafter, None, prompts, lens, keys, jnp.asarray([-1], jnp.int32),
      processor=proc, sample=sample, pad_id=0, max_new_tokens=n, cache_len=64)


def _prompts(B, P, V, seed=0):
  rng = np.random.RandomState(seed)
  return (jnp.asarray(rng.randint(0, V, (B, P)), jnp.int32),
          jnp.asarray(rng.randint(1, P + 1, (B,)), jnp.int32))


# ------------------------------------------------------------------------------ Jacobi


@pytest.mark.parametrize("init_mode", ["random", "spatial"])
def test_jacobi_greedy_equals_greedy(init_mode):
  lm, params = _tiny()
  prompts, lens = _prompts(4, 5, 32)
  n = 20
  ref = _greedy(lm, params, prompts, lens, n)
  d = jacobi.JacobiDrafter(num_draft=6, draft_vocab=16, init_mode=init_mode, grid=4)
  res = _jacobi(lm, params, d, prompts, lens, n)
  np.testing.assert_array_equal(res.tokens, ref.tokens)
  calls = np.asarray(res.extras["target_calls"])
  assert (calls <= n - 1).all()  # forward passes never exceed the tokens (first: prefill)


def test_jacobi_update_reuses_the_targets_predictions():
  """On a target whose next token depends only on the position (not on the drafts), every
  prediction of a call is right, so after a call that rejects, the Jacobi-updated window is
  the true continuation and the next call accepts all L drafts plus the bonus token. (On a
  bigram target SJD gains nothing: a draft after a rejection is predicted from the rejected
  token.)"""
  from tests.fakes import BigramLM
  from models.transformer import ForwardOutput

  class PositionLM(BigramLM):
    def __call__(self, params, tokens, positions, cache, attn_mask=None, **kw):
      logits = 10.0 * jax.nn.one_hot((positions * 3 + 1) % self.vocab_size, self.vocab_size)
      if kw.get("logits_at") is not None:
        logits = jnp.take_along_axis(logits, kw["logits_at"][:, :, None], axis=1)
      h = jnp.zeros(tokens.shape + (1,), jnp.float32)
      return ForwardOutput(logits=logits, hidden=h, penultimate=h,
                           cache=cache.replace(lengths=cache.lengths + tokens.shape[1]))

  # calls alternate: random window (1 token: the target's own) -> Jacobi-updated window
  # (all 6 drafts + the bonus) -> the window past a full accept is fresh random again
  Vt, L, n = 8, 6, 1 + 3 * (1 + 7)  # the first token comes from the prefill
  res = _jacobi(PositionLM(Vt), None, jacobi.JacobiDrafter(num_draft=L),
                jnp.asarray([[0, 1]], jnp.int32), jnp.asarray([2]), n)
  expect = [(p * 3 + 1) % Vt for p in range(1, 1 + n)]  # position p - 1 predicts position p
  assert res.tokens[0].tolist() == expect
  assert int(res.extras["target_calls"][0]) == 6
  assert int(res.extras["accepted_drafts"][0]) >= 18


def test_jacobi_sampling_matches_the_sequence_distribution():
  """Chi-square over all 5^4 continuations of a small random transformer (the next token
  depends on the whole prefix, so stale Jacobi drafts are really exercised), 10000 rows."""
  Vt, N, B = 5, 4, 10000
  lm, params = _tiny(V=Vt, seed=3)
  cfg = {"temperature": 0.35}  # sharpen the random model's near-uniform distributions
  proc = processor_of(cfg, [], sampling=True)
  prompt = [1, 2]
  seqs = np.array(list(itertools.product(range(Vt), repeat=N)))
  full = jnp.asarray(np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], 1), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(full.shape[1]), full.shape)
  logits = transformer.forward(params, lm.config, full, pos, None).logits / cfg["temperature"]
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  P = len(prompt)
  probs = np.exp(sum(logp[np.arange(len(seqs)), P - 1 + j, seqs[:, j]] for j in range(N)))
  prompts = jnp.asarray([prompt] * B, jnp.int32)
  lens = jnp.full((B,), P, jnp.int32)
  for init_mode in ("random", "spatial"):
    d = jacobi.JacobiDrafter(num_draft=3, init_mode=init_mode, grid=2)
    res = _jacobi(lm, params, d, prompts, lens, N, sample=True, proc=proc, keys=row_keys(B, 7))
    idx = (np.asarray(res.tokens)[:, :N] * (Vt ** np.arange(N - 1, -1, -1))).sum(1)
    counts = np.bincount(idx, minlength=Vt ** N)
    expected = probs * B
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert chi2_pvalue(obs, exp) > 1e-3, init_mode
    assert float(res.extras["target_calls"].sum()) < B * (N - 1)  # some drafts accepted


def test_jacobi_rejects_bad_settings():
  with pytest.raises(ValueError, match="init_mode"):
    jacobi.JacobiDrafter(init_mode="zeros")
  with pytest.raises(ValueError, match="grid"):
    jacobi.JacobiDrafter(init_mode="spatial")


# ---------------------------------------------------------------------------- guidance


def test_guide_formula():
  rng = np.random.RandomState(0)
  c, u = jnp.asarray(rng.randn(3, 7)), jnp.asarray(rng.randn(3, 7))
  np.testing.assert_allclose(guidance.guide(c, u, 1.0), jax.nn.log_softmax(c), atol=1e-5)
  np.testing.assert_allclose(guidance.guide(c, u, 0.0), jax.nn.log_softmax(u), atol=1e-5)
  g = guidance.guide(c, u, 3.0)
  np.testing.assert_allclose(jnp.exp(g).sum(-1), 1.0, atol=1e-5)
  # p_g ∝ p_c^s / p_u^(s-1): the same after normalization whether logits or log-probs mix
  lc, lu = jax.nn.log_softmax(c), jax.nn.log_softmax(u)
  np.testing.assert_allclose(g, jax.nn.log_softmax(3.0 * lc - 2.0 * lu), atol=1e-5)
  # a large scale picks the token with the largest conditional/unconditional log-ratio
  np.testing.assert_array_equal(jnp.argmax(guidance.guide(c, u, 50.0), -1),
                                jnp.argmax(lc - lu, -1))


def _cond_prompts(B, V, null, seed=0):
  prompts, lens = _prompts(B, 4, V - 1, seed)
  return prompts, jnp.maximum(lens, 2)


def test_guided_scale_one_and_zero_are_conditional_and_unconditional_greedy():
  V, null = 32, 31
  lm, params = _tiny(V)
  prompts, lens = _cond_prompts(3, V, null)
  n = 12
  one = _greedy(guidance.GuidedLM(lm, 1.0, null), params, prompts, lens, n)
  np.testing.assert_array_equal(one.tokens, _greedy(lm, params, prompts, lens, n).tokens)
  zero = _greedy(guidance.GuidedLM(lm, 0.0, null), params, prompts, lens, n)
  uncond = prompts.at[:, 0].set(null)
  np.testing.assert_array_equal(zero.tokens, _greedy(lm, params, uncond, lens, n).tokens)
  # one batched call = guide() of two separate calls, the second with the condition nulled
  g = guidance.GuidedLM(lm, 2.0, null, cond_len=2)
  pos = jnp.broadcast_to(jnp.arange(4), prompts.shape)
  out = g(params, prompts, pos, g.init_cache(3, 8))
  c = lm(params, prompts, pos, lm.init_cache(3, 8)).logits
  u = lm(params, prompts.at[:, :2].set(null), pos, lm.init_cache(3, 8)).logits
  np.testing.assert_allclose(out.logits, guidance.guide(c, u, 2.0), atol=1e-5)
  assert out.cache.lengths.shape == (3,) and out.cache.inner.lengths.shape == (6,)


def test_every_strategy_runs_guided():
  """Speculative decoding (prompt lookup) through GuidedLM's cache (rollback) gives
  guided greedy exactly; beam search through it (beam reordering) at scale 1 is plain beam."""
  V, null = 32, 31
  lm, params = _tiny(V)
  prompts, lens = _cond_prompts(3, V, null)
  n = 14
  g = guidance.GuidedLM(lm, 2.5, null)
  ref = _greedy(g, params, prompts, lens, n)
  res = _jacobi(g, params, prompt_lookup.PromptLookupDrafter(4, 2, 1), prompts, lens, n)
  np.testing.assert_array_equal(res.tokens, ref.tokens)
  kw = dict(num_beams=3, max_new_tokens=8, cache_len=32, pad_id=0)
  eos = jnp.asarray([-1], jnp.int32)
  guided = beam.beam_search(guidance.GuidedLM(lm, 1.0, null), params, prompts, lens,
                            row_keys(3), eos, **kw)
  plain = beam.beam_search(lm, params, prompts, lens, row_keys(3), eos, **kw)
  np.testing.assert_array_equal(guided.tokens, plain.tokens)


def test_guided_lm_rejects_bad_null_token():
  lm, _ = _tiny(32)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    guidance.GuidedLM(lm, 2.0, 32)

"""Superposed decoding (decoding/superposed.py): a host re-implementation of the reference
algorithm, greedy equivalence, superposition identities and the config checks."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from decoding import ngram, superposed
from decoding.cli import settings_from_config
from decoding.errors import GenerationError
from decoding.prefill import prefill
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import embed_mixture, init_params
from tests.helpers import ngram_counts, run_config

PAD = 0
EOS_IDS = (1, 2)
WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config(vocab_size=12, max_position_embeddings=64)
  lm = TransformerLM(config)
  params = init_params(config, jax.random.PRNGKey(3))
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(3, 12, int(rng.integers(5, 60)))) + [1] for _ in range(40)]
  return lm, params, docs, ngram.build_ngram_model(docs, 12)


# ------------------------------------------------------------ host reference (numpy, float64)


def reference_decode(lm, params, table, prompt, k, alpha, temperature, m, weights, penalty, n,
                     eos_ids):
  """Superposed decoding for one prompt, step by step on the host, as the reference code
  (`superpose.py`, `eval.py`) does it: all drafts start as the prompt with only draft 0
  alive; top-m renormalized p; per-draft n-gram mixing with the penalty fallback; top 2k
  candidates; EOS candidates to the finished list (k best by score); union ranked by
  average score. Runs all n steps (no early stop) unless every draft is dead (-inf)."""
  padded = np.full((1, 8), PAD, np.int32)  # one prefill shape for every prompt
  padded[0, :len(prompt)] = prompt
  cache = lm.init_cache(1, 8 + n)
  logits, cache = prefill(lm, params, jnp.asarray(padded), jnp.asarray([len(prompt)]), cache)
  table_e = np.asarray(params["embed"]["table"], np.float64)  # [D, V]
  alive = [dict(seq=list(prompt), tok=[], lp=[], sm=[], score=0.0 if i == 0 else -math.inf)
           for i in range(k)]
  fin = []
  for t in range(n):
    z = np.asarray(logits[0], np.float64)
    raw = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
    zt = z / temperature
    ids = np.argsort(-zt, kind="stable")[:m]
    lp = zt[ids] - (np.log(np.sum(np.exp(zt[ids] - zt[ids].max()))) + zt[ids].max())
    cands = []
    for i, d in enumerate(alive):
      png = []
      for v in ids:
        p = 0.0
        for c, w in enumerate(weights, 1):
          nexts = table[c].get(tuple(d["seq"][-c:]))
          if c <= len(d["seq"]) and nexts:
            p += w * nexts[int(v)] / sum(nexts.values())
        png.append(p)
      png = np.asarray(png)
      if alpha > 0 and not (png > 0).any():
        sm = (1 - alpha) * lp - penalty
      else:
        with np.errstate(divide="ignore"):
          sm = (1 - alpha) * lp + (alpha * np.log(png) if alpha > 0 else 0.0)
      for j, v in enumerate(ids):
        cands.append((d["score"] + sm[j], i * m + j, i, int(v), raw[v], sm[j]))
    cands.sort(key=lambda c: (-c[0], c[1]))
    top = [dict(seq=alive[i]["seq"] + [v], tok=alive[i]["tok"] + [v], lp=alive[i]["lp"] + [r],
                sm=alive[i]["sm"] + [s], score=sc)
           for sc, _, i, v, r, s in cands[:2 * k]]
    alive = [c for c in top if c["tok"][-1] not in eos_ids][:k]
    fin = sorted(fin + [c for c in top if c["tok"][-1] in eos_ids and c["score"] > -math.inf],
                 key=lambda c: -c["score"])[:k]
    if all(d["score"] == -math.inf for d in alive):
      break  # nothing alive: only the finished drafts are left
    if t + 1 < n:
      s = np.asarray([d["score"] for d in alive])
      gamma = np.exp(s - s.max())
      gamma /= gamma.sum()
      emb = sum(g * table_e[:, d["tok"][-1]] for g, d in zip(gamma, alive))
      out = lm(params, None, jnp.asarray([[len(prompt) + t]]), cache,
               embeds=jnp.asarray(emb, jnp.float32)[None, None])
      logits, cache = out.logits[:, 0], out.cache
  union = [dict(c, finished=True) for c in fin] + [
      dict(c, finished=False) for c in alive if c["score"] > -math.inf]
  return sorted(union, key=lambda c: -c["score"] / len(c["tok"]))


def run_tiny(lm, params, model, prompts, eos_ids=EOS_IDS, **kw):
  P = 8  # one padded width for every call: one compile per batch size
  padded = np.full((len(prompts), P), PAD, np.int32)
  for b, p in enumerate(prompts):
    padded[b, :len(p)] = p
  settings = dict(num_drafts=3, alpha=0.54, temperature=0.5, num_token_sample=4,
                  ngram_weights=WEIGHTS, ngram_penalty=200.0, max_new_tokens=10)
  settings.update(kw)
  res = superposed.superposed_decode(
      lm, params, model, jnp.asarray(padded), jnp.asarray([len(p) for p in prompts], jnp.int32),
      jnp.asarray(eos_ids, jnp.int32), cache_len=P + settings["max_new_tokens"], pad_id=PAD,
      **settings)
  return jax.device_get(res)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 4], [9], [4, 4, 3]]


@pytest.mark.parametrize("eos_ids,alpha,some_finished", [
    (EOS_IDS, 0.54, True),
    (EOS_IDS, 0.0, False),  # no n-gram term
    ((8, 11), 0.9, True),  # prompt 0 settles a step early (early stop), the others go on
    ((1, 4), 0.54, True),  # prompt 0 has only 2 possible drafts (both EOS after one step)
])
def test_batch_matches_host_reference_row_by_row(tiny, eos_ids, alpha, some_finished):
  lm, params, docs, model = tiny
  res = run_tiny(lm, params, model, PROMPTS, eos_ids=eos_ids, alpha=alpha)
  table = ngram_counts(docs, ngram.MAX_CONTEXT)
  finished = 0
  for b, prompt in enumerate(PROMPTS):
    want = reference_decode(lm, params, table, prompt, 3, alpha, 0.5, 4, WEIGHTS, 200.0, 10,
                            eos_ids)[:3]
    for r in range(len(want), 3):  # fewer possible drafts than asked for: empty ones
      assert res.scores[b, r] == -np.inf and res.lengths[b, r] == 0
    for r in range(len(want)):
      L = int(res.lengths[b, r])
      assert res.tokens[b, r, :L].tolist() == want[r]["tok"]
      assert (res.tokens[b, r, L:] == PAD).all()
      assert bool(res.finished[b, r]) == want[r]["finished"]
      np.testing.assert_allclose(res.scores[b, r], want[r]["score"], rtol=1e-5)
      np.testing.assert_allclose(res.processed_logprobs[b, r, :L], want[r]["sm"], rtol=1e-4,
                                 atol=1e-4)
      np.testing.assert_allclose(res.token_logprobs[b, r, :L], want[r]["lp"], atol=1e-5)
      finished += want[r]["finished"]
  assert bool(finished) == some_finished  # the finished-list path is exercised


def test_ragged_rows_equal_runs_alone_and_are_deterministic(tiny):
  lm, params, _, model = tiny
  batch = run_tiny(lm, params, model, PROMPTS)
  again = run_tiny(lm, params, model, PROMPTS)
  for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  for i, prompt in enumerate(PROMPTS):
    alone = run_tiny(lm, params, model, [prompt])
    for key in ("tokens", "lengths", "finished"):
      np.testing.assert_array_equal(getattr(batch, key)[i], getattr(alone, key)[0])
    for key in ("scores", "token_logprobs", "processed_logprobs", "token_entropy"):
      np.testing.assert_allclose(getattr(batch, key)[i], getattr(alone, key)[0], atol=1e-5)


def test_scores_never_increase(tiny):
  lm, params, _, model = tiny
  res = run_tiny(lm, params, model, PROMPTS)
  # Each draft's score is the running sum of its increments, all <= 0.
  assert (res.processed_logprobs <= 0).all()
  np.testing.assert_allclose(res.processed_logprobs.sum(-1), res.scores, rtol=1e-5)
  assert np.isfinite(res.scores).all()


def test_draft_weights_sum_to_one_and_ignore_dead_drafts():
  s = jnp.asarray([[-1.0, -2.0, -3.0], [0.0, -jnp.inf, -jnp.inf], [-900.0, -901.0, -jnp.inf]])
  g = np.asarray(superposed.draft_weights(s))
  np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(g[0], np.exp([-1, -2, -3]) / np.exp([-1, -2, -3]).sum(), rtol=1e-6)
  np.testing.assert_array_equal(g[1], [1, 0, 0])
  assert g[2, 2] == 0 and g[2, 0] > g[2, 1] > 0


def test_superposed_embedding_is_the_token_mixture(tiny):
  lm, params, _, _ = tiny
  tokens = jnp.asarray([[3, 7, 3], [5, 5, 5]])
  gamma = jnp.asarray([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
  mix = jnp.zeros((2, lm.vocab_size)).at[jnp.arange(2)[:, None], tokens].add(gamma)
  want = embed_mixture(params, lm.config, mix[:, None])[:, 0]
  np.testing.assert_allclose(superposed.superposed_embedding(lm, params, tokens, gamma), want,
                             rtol=1e-6, atol=1e-7)
  # All drafts on one token: that token's embedding (up to rounding of the weighted sum).
  np.testing.assert_allclose(superposed.superposed_embedding(lm, params, tokens, gamma)[1],
                             lm.embed(params, tokens)[1, 0], rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------ SmolLM2


def sup_config(**kw):
  base = dict(strategy="superposed", max_new_tokens=8, batch_size=8, num_return_sequences=1)
  base.update({k: v for k, v in superposed.Superposed().to_flat().items()
               if k not in ("max_new_tokens", "num_return_sequences")})
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.mark.slow
def test_one_draft_without_ngrams_is_greedy(smollm, prompt_ids):
  tok = smollm.tokenizer
  eos, pad = [tok.eos_id], tok.pad_id
  greedy = run_config(smollm.lm, smollm.params, prompt_ids,
                               ml_collections.ConfigDict(dict(strategy="greedy",
                                                              max_new_tokens=8)), eos, pad)
  sup = run_config(smollm.lm, smollm.params, prompt_ids,
                            sup_config(num_drafts=1, ngram_alpha=0.0), eos, pad, tokenizer=tok)
  assert [g.output_ids for g in sup] == [g.output_ids for g in greedy]
  for s, g in zip(sup, greedy):
    # One draft: the superposed input is the token itself, so the log-probs are the model's.
    np.testing.assert_allclose(s.token_logprobs, g.token_logprobs, atol=2e-4)
    assert s.extras["perplexity"] == pytest.approx(math.exp(-s.score / len(s.output_ids)))


def test_one_hot_superposition_equals_token_forward(smollm, prompt_ids):
  lm, params = smollm.lm, smollm.params
  prompt = prompt_ids[0]
  cache = lm.init_cache(1, 32)
  _, cache = prefill(lm, params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]), cache)
  pos = jnp.asarray([[len(prompt)]])
  drafts = jnp.asarray([[1234, 42, 1234]])
  token_out = lm(params, drafts[:, :1], pos, cache)
  gamma = jnp.asarray([[1.0, 0.0, 0.0]])
  sup_out = lm(params, None, pos, cache,
               embeds=superposed.superposed_embedding(lm, params, drafts, gamma)[:, None])
  np.testing.assert_allclose(sup_out.logits, token_out.logits, atol=1e-5, rtol=0)
  # Drafts whose last tokens agree superpose to that token, whatever their weights.
  same = jnp.asarray([[1234, 1234, 1234]])
  mixed = lm(params, None, pos, cache, embeds=superposed.superposed_embedding(
      lm, params, same, jnp.asarray([[0.2, 0.5, 0.3]]))[:, None])
  np.testing.assert_allclose(mixed.logits, token_out.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("key,value,match", [
    ("num_drafts", 0, "num_drafts"),
    ("num_drafts", 2.5, "num_drafts"),
    ("num_token_sample", 1, "num_token_sample"),
    ("ngram_alpha", 1.5, "ngram_alpha"),
    ("temperature", 0.0, "temperature"),
    ("ngram_weights", [0.5, 0.6], "ngram_weights"),
    ("ngram_weights", [0.1] * 6, "ngram_weights"),
    ("ngram_weights", [-0.1], "ngram_weights"),
    ("ngram_weights", "0.1", "ngram_weights"),
    ("ngram_penalty", -1.0, "ngram_penalty"),
    ("ngram_corpus", "wikipedia", "ngram_corpus"),
    ("num_return_sequences", 4, "num_return_sequences"),
    ("top_p", 0.9, "top_p"),
    ("repetition_penalty", 1.2, "repetition_penalty"),
])
def test_bad_settings_raise_before_compiling(key, value, match):
  with pytest.raises(GenerationError, match=match):
    settings_from_config(sup_config(**{key: value}))


def test_needs_a_tokenizer_and_defaults_validate():
  settings_from_config(sup_config())
  with pytest.raises(GenerationError, match="tokenizer"):
    run_config(TransformerLM(tiny_config()), None, [[3]], sup_config(), [1], 0)

"""Beam search, beam sampling and diverse beam search: Hugging Face parity (SmolLM2, and a
tiny random Llama for many settings), exhaustive search on a tiny transformer, diversity
invariants, the sampling law and seeding, validation."""
from __future__ import annotations

import contextlib
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from decoding import beam_search as beam
from decoding import runner
from decoding.cli import settings_from_config
from decoding.errors import GenerationError
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params
from tests.fakes import BigramLM
from tests.helpers import run_config

EOS, PAD = 1, 0


def _cfg(**kw):
  c = dict(strategy="beam", max_new_tokens=8, min_new_tokens=0, seed=0, batch_size=8,
           num_beams=4, num_return_sequences=1, length_penalty=1.0, early_stopping=False)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _rows(out, n_prompts):
  """Generations grouped per prompt, best first."""
  return [[g for g in out if g.index == i] for i in range(n_prompts)]


# ------------------------------------------------------------------ Hugging Face parity


@contextlib.contextmanager
def _one_torch_thread(torch):
  # On a loaded 2-core machine torch's thread pool is ~10x slower than one thread.
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(n)


def _hf_generate(hf, ids, n_new, eos, pad, **kw):
  """HF generate on one prompt: [(generated tokens up to EOS, sequences_score)]."""
  torch = pytest.importorskip("torch")
  with _one_torch_thread(torch), torch.no_grad():
    r = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=n_new, eos_token_id=eos, pad_token_id=pad, output_scores=True,
                    return_dict_in_generate=True, **kw)
  out = []
  for seq, score in zip(r.sequences, r.sequences_scores):
    new = seq[len(ids):].tolist()
    out.append((new[:new.index(eos) + 1] if eos in new else new, float(score)))
  return out


def _hf_kwargs(c):
  keys = ("num_beams", "num_return_sequences", "length_penalty", "early_stopping",
          "num_beam_groups", "diversity_penalty", "repetition_penalty", "no_repeat_ngram_size",
          "min_new_tokens")
  return {k: c[k] for k in keys if k in c}


def _compare_with_hf(lm, params, hf, prompts, c, eos, pad):
  """Ours on the ragged batch vs HF on each prompt alone; returns our outputs per prompt."""
  ours = _rows(run_config(lm, params, prompts, c, [eos], pad), len(prompts))
  for i, ids in enumerate(prompts):
    ref = _hf_generate(hf, ids, c.max_new_tokens, eos, pad, do_sample=False, **_hf_kwargs(c))
    label = (dict(c), i)
    assert [g.output_ids for g in ours[i]] == [t for t, _ in ref], label
    np.testing.assert_allclose([g.score for g in ours[i]], [s for _, s in ref], atol=1e-4,
                               err_msg=str(label))
    for g in ours[i]:
      assert g.finished == (g.output_ids[-1] == eos)
      np.testing.assert_allclose(sum(g.processed_logprobs) / len(g.output_ids) ** c.length_penalty,
                                 g.score, rtol=1e-5, atol=1e-6)
  return [[g.output_ids for g in row] for row in ours]


@pytest.mark.slow
def test_beam_search_matches_hf_on_smollm(smollm, hf_smollm, prompt_ids):
  """SmolLM2, one ragged batch (a raw text prompt and a chat prompt with a one-word answer,
  so hypotheses end early), 3 sequences per prompt, length_penalty 1.5 with early_stopping
  True and False (which give different results here); one compile (traced values)."""
  question = [{"role": "user", "content": "Say yes or no: is water wet?"}]
  prompts = [prompt_ids[0], smollm.tokenizer.encode_chat(question)]
  runs = [_compare_with_hf(smollm.lm, smollm.params, hf_smollm, prompts, _cfg(
      max_new_tokens=10, num_return_sequences=3, length_penalty=1.5, early_stopping=es), 2, 2)
          for es in (True, False)]
  assert runs[0] != runs[1]


@pytest.mark.slow
def test_diverse_beam_matches_hf_group_beam_search_on_smollm(smollm, hf_smollm, prompt_ids):
  """HF 4.55.4's built-in group beam search (num_beam_groups, diversity_penalty)."""
  c = _cfg(strategy="diverse_beam", max_new_tokens=8, num_beams=6, num_beam_groups=3,
           diversity_penalty=0.5, num_return_sequences=4)
  _compare_with_hf(smollm.lm, smollm.params, hf_smollm, [prompt_ids[1], prompt_ids[7]], c, 2, 2)


TINY_EOS = 7  # the tiny model's most frequent token, so hypotheses end early and often


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """A random 12-token Hugging Face Llama and the same weights in our model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from models import checkpoint
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=12, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
      tie_word_embeddings=False, max_position_embeddings=128)).eval()
  with torch.no_grad():
    hf.lm_head.weight.mul_(20.0)  # peaked next-token distributions: few near-ties
  path = tmp_path_factory.mktemp("tiny_llama")
  hf.save_pretrained(path, safe_serialization=True)
  config, params = checkpoint.load_safetensors(str(path))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 12, size=n).tolist() for n in (1, 3, 7, 4, 2, 6)]
  return TransformerLM(config), params, hf, prompts


@pytest.mark.slow
def test_beam_search_matches_hf_on_tiny_llama(tiny_llama):
  """Many settings, cheaply: every early_stopping mode with positive, unit and negative
  length penalties, and group beam search with HF's processors (after the diversity
  term, on log-probs)."""
  lm, params, hf, prompts = tiny_llama
  run = lambda **kw: _compare_with_hf(lm, params, hf, prompts, _cfg(**kw), TINY_EOS, PAD)
  beam3 = dict(max_new_tokens=8, num_beams=3, num_return_sequences=3)
  out = {(lp, es): run(length_penalty=lp, early_stopping=es, **beam3)
         for lp, es in ((2.0, True), (2.0, False), (1.0, False), (1.0, "never"), (-0.5, "never"))}
  # The settings matter for these prompts: early_stopping changes what is returned.
  assert out[2.0, True] != out[2.0, False] and out[1.0, False] != out[1.0, "never"]
  groups = dict(strategy="diverse_beam", max_new_tokens=8, num_beams=4, num_beam_groups=2,
                num_return_sequences=4, length_penalty=1.5, repetition_penalty=1.5,
                no_repeat_ngram_size=2, min_new_tokens=2)
  for lam, es in ((0.5, True), (3.0, False), (1.0, "never")):
    run(diversity_penalty=lam, early_stopping=es, **groups)


# ----------------------------------------------------------------- tiny transformer


@pytest.fixture(scope="module")
def tiny():
  """A 5-token transformer with sharpened logits (few near-ties between sequences)."""
  c = tiny_config(vocab_size=5, num_layers=2)
  params = dict(init_params(c, jax.random.PRNGKey(0)))
  params["final_norm"] = {"scale": params["final_norm"]["scale"] * 4}
  return TransformerLM(c), params


def _complete_hypotheses(lm, params, prompt, n_new, width=8):
  """Every complete hypothesis (ends with EOS, or reaches n_new tokens without one) with
  its per-token log-probs, from cache-free forward passes over all prefixes (padded to
  `width` tokens, so every prompt shares one compile)."""
  V = lm.vocab_size
  prefixes = [p for L in range(n_new) for p in itertools.product(
      [v for v in range(V) if v != EOS], repeat=L)]
  seqs = jnp.asarray([list(prompt) + list(p) + [PAD] * (width - len(prompt) - len(p))
                      for p in prefixes])
  logits = lm(params, seqs, jnp.broadcast_to(jnp.arange(width), seqs.shape), None).logits
  logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
  nxt = {p: logp[j, len(prompt) + len(p) - 1] for j, p in enumerate(prefixes)}
  hyps = []
  for p in prefixes:
    for v in range(V):
      if v == EOS or len(p) + 1 == n_new:
        y = list(p) + [v]
        hyps.append((y, [nxt[tuple(y[:t])][y[t]] for t in range(len(y))]))
  return hyps


def test_wide_beam_finds_brute_force_best(tiny):
  """With num_beams >= V (V-1)^(N-1) nothing is pruned: the R best of all complete
  sequences, ranked by sum log p / L^length_penalty, for a ragged batch of 2 prompts."""
  lm, params = tiny
  prompts, n, R = [[2, 3, 4], [3]], 3, 8
  every = [_complete_hypotheses(lm, params, p, n) for p in prompts]
  for lp in (1.0, 0.0, 2.0, -1.0):
    c = _cfg(max_new_tokens=n, num_beams=80, num_return_sequences=R, length_penalty=lp,
             early_stopping="never")
    ours = _rows(run_config(lm, params, prompts, c, [EOS], PAD), 2)
    for i in range(len(prompts)):
      best = sorted(((sum(lps) / len(y) ** lp, y, lps) for y, lps in every[i]),
                    key=lambda h: -h[0])[:R]
      assert [g.output_ids for g in ours[i]] == [y for _, y, _ in best], (lp, i)
      np.testing.assert_allclose([g.score for g in ours[i]], [s for s, _, _ in best], atol=1e-5)
      for g, (_, y, lps) in zip(ours[i], best):
        np.testing.assert_allclose(g.token_logprobs, lps, atol=1e-5)
        assert g.finished == (y[-1] == EOS)
  # Diverse beam search with one group is beam search (same compile, same numbers).
  c = _cfg(max_new_tokens=n, num_beams=80, num_return_sequences=R, early_stopping="never")
  one = run_config(lm, params, prompts, c, [EOS], PAD)
  c.strategy, c.num_beam_groups = "diverse_beam", 1
  assert [(g.output_ids, g.score) for g in run_config(lm, params, prompts, c, [EOS], PAD)
          ] == [(g.output_ids, g.score) for g in one]


def test_diverse_beam_invariants(tiny):
  """Three groups of one beam, no EOS (one compile for both lambdas: a traced value)."""
  lm, params = tiny
  prompts, n = [[2, 3, 4], [3]], 5
  c = _cfg(strategy="diverse_beam", max_new_tokens=n, num_beams=3, num_beam_groups=3,
           num_return_sequences=3)
  run = lambda lam: _rows(run_config(lm, params, prompts, _cfg(
      **{**c.to_dict(), "diversity_penalty": lam}), [], PAD), 2)
  # lambda = 0: the groups are identical.
  for x in run(0.0):
    assert x[0].output_ids == x[1].output_ids == x[2].output_ids
    assert x[0].score == x[1].score == x[2].score
  # A large lambda: at every step the groups choose pairwise different tokens (V = 5 >= 3
  # leaves alternatives), so none pays the penalty in its augmented score.
  for x in run(1e3):
    assert all(len(g.output_ids) == n for g in x)
    for t in range(n):
      assert len({g.output_ids[t] for g in x}) == 3
    assert min(g.score for g in x) > -1e2


# -------------------------------------------------------------------------- sampling


def test_beam_sample_is_seeded_and_batch_invariant(tiny):
  lm, params = tiny
  prompts = [[2, 3, 4], [3], [4, 4], [2]]
  c = _cfg(do_sample=True, temperature=1.5, top_k=4, max_new_tokens=6, num_return_sequences=2)
  ids = lambda out: [g.output_ids for g in out]
  a = run_config(lm, params, prompts, c, [EOS], PAD)
  assert ids(a) == ids(run_config(lm, params, prompts, c, [EOS], PAD))
  reseeded = [ids(run_config(lm, params, prompts, _cfg(**{**c.to_dict(), "seed": s}),
                                      [EOS], PAD)) for s in (1, 2)]
  assert any(r != ids(a) for r in reseeded)
  # A prompt's samples depend on its row id and the seed, not on the rest of the batch.
  other = run_config(lm, params, [prompts[2], [3, 3, 3], prompts[0], [4]], c, [EOS], PAD,
                              row_ids=[2, 7, 0, 9])
  assert ids(other[0:2]) == ids(a[4:6]) and ids(other[4:6]) == ids(a[0:2])
  np.testing.assert_array_equal([g.score for g in other[0:2] + other[4:6]],
                                [g.score for g in a[4:6] + a[0:2]])


def test_beam_sample_draws_candidates_without_replacement():
  """One step with 2 beams: the 2 finished hypotheses are the first 2 of 4 draws without
  replacement from softmax(log p), so their (unordered) pair has the Plackett-Luce law."""
  V, n = 4, 3000
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(V, V)).astype(np.float32))
  res = beam.beam_search(BigramLM(V), table, jnp.full((n, 1), 2, jnp.int32),
                         jnp.ones((n,), jnp.int32), runner.row_keys(7, range(n)),
                         jnp.asarray([-1], jnp.int32), num_beams=2, num_return_sequences=2,
                         do_sample=True, max_new_tokens=1, cache_len=2, pad_id=PAD)
  toks = np.sort(np.asarray(res.tokens)[:, :, 0], axis=1)
  p = np.asarray(jax.nn.softmax(table[2]), np.float64)
  pairs = list(itertools.combinations(range(V), 2))
  expected = np.array([p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b]) for a, b in pairs]) * n
  observed = np.array([np.sum((toks[:, 0] == a) & (toks[:, 1] == b)) for a, b in pairs])
  chi2 = float(((observed - expected) ** 2 / expected).sum())
  assert observed.sum() == n
  assert chi2 < 20.5, chi2  # 5 degrees of freedom: the 0.999 quantile is 20.5
  # Ranked by score: the better of the two draws first.
  lp = np.asarray(jax.nn.log_softmax(table[2]))
  assert np.all(np.asarray(res.scores)[:, 0] >= np.asarray(res.scores)[:, 1])
  np.testing.assert_allclose(np.asarray(res.scores)[:, 0], lp[np.asarray(res.tokens)[:, 0, 0]],
                             atol=1e-6)


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize("bad", [
    dict(num_beams=1),
    dict(num_beams=4, num_return_sequences=5),
    dict(early_stopping="sometimes"),
    dict(early_stopping=1),
    dict(length_penalty=float("nan")),
    dict(num_beam_groups=2),
    dict(diversity_penalty=0.5),
    dict(do_sample=True, temperature=0.0),
    dict(strategy="diverse_beam", num_beams=6, num_beam_groups=4),
    dict(strategy="diverse_beam", num_beams=4, num_beam_groups=2, diversity_penalty=-1.0),
    dict(strategy="diverse_beam", num_beams=4, num_beam_groups=2, do_sample=True),
])
def test_bad_configs_raise(bad):
  with pytest.raises(GenerationError):
    settings_from_config(_cfg(**bad))


def test_configs_are_valid():
  from configs import beam as beam_config
  from configs import diverse_beam as diverse_config
  for module, name in ((beam_config, "beam"), (diverse_config, "diverse_beam")):
    c = module.get_config()
    assert c.strategy == name
    settings_from_config(c)
    c.early_stopping = "never"  # the field takes HF's three values (also from the command line)
    settings_from_config(c)

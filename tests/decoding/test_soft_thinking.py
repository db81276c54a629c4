"""Stochastic soft thinking (decoding/soft_thinking.py): the Gumbel-max and Dirichlet
identities of the soft weights, the limits that reduce it to greedy decoding and to ancestral
sampling, the thinking phases (end marker, budget, answer), ragged batches, seeding and the
config checks. Tiny random transformers (they take `embeds`), a few seconds each."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import generate as generate_config
from decoding import registry
from decoding.cli import settings_from_config
from decoding.errors import GenerationError
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.sampling import Sample
from decoding.soft_thinking import SoftThinking, soft_weights
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params
from tests.helpers import chi2_pvalue, target

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAD, EOS = 0, 1
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15], [3, 3]]


@pytest.fixture(scope="module")
def tiny():
  c = tiny_config(vocab_size=40, num_layers=2)
  # Weights scaled up from the initialization's 0.02 so that greedy decoding does not just
  # repeat the last token (the marker tests need varied text).
  params = jax.tree.map(lambda x: 8.0 * x, init_params(c, jax.random.PRNGKey(0)))
  return target(TransformerLM(c), params, [EOS], PAD)


def all_thinking(n: int, **kw) -> SoftThinking:
  """Settings that think for every step but the last, with no end marker."""
  return SoftThinking(max_new_tokens=n, max_think_tokens=n - 1, think_end="", **kw)


def draws(z, n, variant, **kw):
  """n soft tokens of the one logits row z [V], one key per draw."""
  z = jnp.broadcast_to(jnp.asarray(z, jnp.float32), (n, len(z)))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(n))
  args = dict(max_topk=z.shape[1], work=z.shape[1], alpha=4.0, tau=0.5)
  return jax.jit(lambda z, k: soft_weights(z, k, variant, **{**args, **kw}))(z, keys)


# ------------------------------------------------------------------ soft weights


def test_gumbel_max_tokens_follow_p():
  z = np.log(np.asarray([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  _, _, token, _ = draws(z, 40000, "gumbel")
  counts = np.bincount(np.asarray(token), minlength=6)
  assert chi2_pvalue(counts, np.exp(z)) > 1e-3, counts


def test_gumbel_softmax_weights_sum_to_one_and_become_one_hot_as_tau_goes_to_zero():
  z = np.log(np.asarray([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  mean_max = []
  for tau in (2.0, 0.5, 0.1, 1e-8):
    ids, w, token, _ = draws(z, 2000, "gumbel", tau=tau)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, atol=1e-5)
    # the recorded token is the argmax of the weights
    np.testing.assert_array_equal(np.take_along_axis(
        np.asarray(ids), np.asarray(w).argmax(-1)[:, None], 1)[:, 0], np.asarray(token))
    mean_max.append(float(w.max(-1).mean()))
  assert mean_max == sorted(mean_max), mean_max
  assert mean_max[-1] == 1.0


def test_dirichlet_weights_average_to_p():
  p = np.asarray([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  for alpha in (1.0, 4.0):
    ids, w, token, _ = draws(np.log(p), 20000, "dirichlet", alpha=alpha)
    dense = np.zeros((w.shape[0], 6))
    np.put_along_axis(dense, np.asarray(ids), np.asarray(w), 1)
    np.testing.assert_allclose(dense.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(dense.mean(0), p, atol=0.01)
    assert np.all(np.asarray(token) == np.asarray(ids)[:, 0])  # argmax of the weights


def test_kept_components_are_the_top_weights_renormalized():
  p = np.asarray([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  ids, w, token, _ = draws(np.log(p), 1, "vanilla", max_topk=3)
  np.testing.assert_array_equal(np.asarray(ids[0]), [0, 1, 2])
  np.testing.assert_allclose(np.asarray(w[0]), p[:3] / p[:3].sum(), rtol=1e-5)
  assert int(token[0]) == 0
  z = np.log(p).copy()
  z[2:] = -np.inf  # two survivors, three components: the third weighs nothing
  ids, w, _, zk = draws(z, 1, "gumbel", max_topk=3)
  assert float(w[0, 2]) == 0.0 and float(zk[0, 2]) == -np.inf


# ------------------------------------------------------------- limits of the method


def test_vanilla_with_top1_filtering_is_greedy_decoding(tiny):
  greedy = generate(tiny, PROMPTS, Greedy(max_new_tokens=10))
  soft = generate(tiny, PROMPTS, all_thinking(10, soft_variant="vanilla", soft_top_k=1,
                                              top_k=1))
  for g, s in zip(greedy, soft):
    assert g.output_ids == s.output_ids
    np.testing.assert_allclose(g.token_logprobs, s.token_logprobs, atol=1e-6)
    assert s.extras["think_tokens"] == min(9, len(s.output_ids))


def test_gumbel_at_tiny_tau_reproduces_ancestral_sampling_with_the_same_keys(tiny):
  """Same seed, so the same step keys: the Gumbel noise of a thinking step is the noise
  `categorical` adds, and at tau -> 0 the soft token is the sampled token's embedding."""
  warpers = dict(temperature=0.8, top_k=12, top_p=0.9)
  sample = generate(tiny, PROMPTS, Sample(max_new_tokens=12, **warpers), seed=3)
  soft = generate(tiny, PROMPTS, all_thinking(
      12, soft_variant="gumbel", gumbel_temperature=1e-8, soft_temperature=0.8, soft_top_k=12,
      soft_top_p=0.9, soft_max_topk=12, **warpers), seed=3)
  for a, b in zip(sample, soft):
    assert a.output_ids == b.output_ids
    np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


# ---------------------------------------------------------------- thinking phases


def first_new_ngram(ids, m, start):
  """The first j >= start where ids[j-m+1 : j+1] does not occur earlier in ids, else None."""
  for j in range(max(start, m - 1), len(ids)):
    gram = ids[j - m + 1:j + 1]
    if all(ids[k:k + m] != gram for k in range(j - m + 1)):
      return j
  return None


@pytest.mark.parametrize("m", [1, 2])
def test_thinking_stops_at_the_end_marker_and_the_answer_follows(tiny, m):
  """Top-1 vanilla thinking is greedy, so an m-token marker taken from the greedy output is
  written at a known step; a top-1 answer then continues greedily."""
  n, budget = 12, 8
  for p, g in zip(PROMPTS, generate(tiny, PROMPTS, Greedy(max_new_tokens=n))):
    greedy = g.output_ids
    j = first_new_ngram(greedy, m, 2)
    if j is not None and j + 1 < budget:
      break
  else:
    pytest.fail("no greedy output with a marker to take")
  s = SoftThinking(max_new_tokens=n, max_think_tokens=budget, think_end=greedy[j - m + 1:j + 1],
                   soft_variant="vanilla", soft_top_k=1, top_k=1)
  out = generate(tiny, [p], s)[0]
  assert out.output_ids == greedy
  assert out.extras == {"think_tokens": j + 1, "think_ended": True}


def test_thinking_stops_at_the_budget_then_the_marker_is_forced(tiny):
  n, budget, marker = 12, 4, [38, 39]
  s = SoftThinking(max_new_tokens=n, max_think_tokens=budget, think_end=marker,
                   soft_variant="vanilla", soft_top_k=1, top_k=1, think_start=[30])
  out = generate(tiny, PROMPTS[:2], s)
  for p, o in zip(PROMPTS[:2], out):
    ids = o.output_ids
    assert ids[0] == 30 and ids[1 + budget:3 + budget] == marker
    assert o.extras == {"think_tokens": budget, "think_ended": False}
    # thinking = greedy after the start marker; the answer = greedy after the forced marker
    think = generate(tiny, [p + [30]], Greedy(max_new_tokens=budget))[0].output_ids
    assert ids[1:1 + budget] == think
    answer = generate(tiny, [p + ids[:3 + budget]], Greedy(max_new_tokens=n - 3 - budget))
    assert ids[3 + budget:] == answer[0].output_ids
    assert o.processed_logprobs[0] == 0.0 and o.processed_logprobs[1 + budget] == 0.0


@pytest.mark.parametrize("variant", ["vanilla", "dirichlet", "gumbel"])
def test_ragged_batch_equals_each_row_alone(tiny, variant):
  s = SoftThinking(max_new_tokens=12, max_think_tokens=6, think_end=[7, 8],
                   soft_variant=variant, soft_top_k=8, soft_max_topk=4)
  together = generate(tiny, PROMPTS, s, seed=5)
  for i, p in enumerate(PROMPTS):
    alone = generate(tiny, [p], s, seed=5, row_ids=[i])[0]
    assert alone.output_ids == together[i].output_ids, (variant, i)
    assert alone.extras == together[i].extras
    # the batch changes the float rounding of the model (large logits here), not the tokens
    np.testing.assert_allclose(alone.token_logprobs, together[i].token_logprobs, rtol=1e-3,
                               atol=2e-3)


def test_same_seed_same_output_other_seed_other_output(tiny):
  s = SoftThinking(max_new_tokens=10, max_think_tokens=6, think_end=[7])
  a, b = (generate(tiny, PROMPTS, s, seed=1) for _ in range(2))
  c = generate(tiny, PROMPTS, s, seed=2)
  assert [g.output_ids for g in a] == [g.output_ids for g in b]
  assert [g.output_ids for g in a] != [g.output_ids for g in c]


def test_several_samples_per_prompt_are_the_seeded_rows(tiny):
  s = SoftThinking(max_new_tokens=8, max_think_tokens=5, think_end=[7], num_return_sequences=3)
  out = generate(tiny, PROMPTS[:2], s, seed=4)
  assert len(out) == 6
  first = generate(tiny, PROMPTS[:2], s.replace(num_return_sequences=1), seed=4)
  assert [out[0].output_ids, out[3].output_ids] == [g.output_ids for g in first]


# ------------------------------------------------------------------------- config


def test_the_command_line_config_maps_to_the_defaults():
  cfg = generate_config.get_config()
  cfg.strategy = "soft_thinking"
  assert settings_from_config(cfg) == SoftThinking()
  own = importlib.import_module("configs.soft_thinking").get_config()
  assert settings_from_config(own) == SoftThinking()
  cfg.soft_variant, cfg.think_end = "dirichlet", " answer is"
  assert settings_from_config(cfg) == SoftThinking(soft_variant="dirichlet",
                                                   think_end=" answer is")
  assert registry.strategy_of(SoftThinking()).name == "soft_thinking"


@pytest.mark.parametrize("fields,message", [
    (dict(soft_variant="gumble"), "did you mean 'gumbel'"),
    (dict(gumbel_temperature=0.0), "gumbel_temperature must be a number > 0"),
    (dict(dirichlet_alpha=-1.0), "dirichlet_alpha must be a number > 0"),
    (dict(soft_top_p=1.5), "soft_top_p must be a number in (0, 1]"),
    (dict(soft_max_topk=0), "soft_max_topk must be an integer >= 1"),
    (dict(max_new_tokens=32, max_think_tokens=32),
     "max_think_tokens must be an integer in [1, 31]"),
    (dict(think_end=[3, -1]), "think_end must be a string or a list of token ids"),
    (dict(think_start=3), "think_start must be a string or a list of token ids"),
])
def test_bad_values_are_errors_before_anything_runs(fields, message):
  with pytest.raises(GenerationError) as e:
    SoftThinking(**fields)
  assert message in str(e.value)


def test_bad_markers_are_errors_before_compiling(tiny):
  with pytest.raises(GenerationError, match="leaves no answer"):
    generate(tiny, PROMPTS, SoftThinking(max_new_tokens=8, max_think_tokens=6,
                                         think_end=[3, 4]))
  with pytest.raises(GenerationError, match="outside the vocabulary"):
    generate(tiny, PROMPTS, SoftThinking(max_new_tokens=8, max_think_tokens=4, think_end=[40]))
  with pytest.raises(GenerationError, match="needs a tokenizer"):
    generate(tiny, PROMPTS, SoftThinking(max_new_tokens=8, max_think_tokens=4))
  cfg = generate_config.get_config()
  cfg.strategy, cfg.soft_top_k = "sample", 5
  with pytest.raises(GenerationError, match="soft_top_k does not apply to strategy 'sample'"):
    settings_from_config(cfg)


@pytest.mark.slow
@pytest.mark.usefixtures("smollm_gguf")
def test_command_line_runs_soft_thinking_on_smollm2():
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.strategy=soft_thinking", "--config.max_new_tokens=24",
         "--config.max_think_tokens=12", "--config.think_end= answer is",
         "--prompt=What is 2 + 3? Finish with 'The answer is' and the number."]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip()

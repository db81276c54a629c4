"""SCMoE (decoding/scmoe.py) on tiny random MoE models: beta = 0 is greedy under the strong
routing, every chosen token lies in the plausible set and maximises the contrast score there
(brute force over the vocabulary), a weak routing equal to the strong one gives greedy, the
sampled mode draws softmax(score), and bad settings or a dense model are refused."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import generate as generate_config
from decoding.cli import settings_from_config
from decoding.errors import GenerationError
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.scmoe import SCMoE, contrast_lm, contrast_scores
from models.config import tiny_config
from models.lm import TransformerLM, load_model
from models.moe import Routing
from models.transformer import init_params
from tests.helpers import chi2_pvalue, target

RNG = np.random.default_rng(0)
CFG = tiny_config(vocab_size=24, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  moe_experts=4, moe_intermediate_size=16, num_layers=2)
# router and expert weights large enough that the two routings disagree often
PARAMS = jax.tree.map(lambda x: x * 12.0, init_params(CFG, jax.random.PRNGKey(0)))
LM = TransformerLM(CFG)
PROMPTS = [list(map(int, RNG.integers(2, 24, n))) for n in (3, 7, 5, 2)]


def _routed(routing: Routing) -> TransformerLM:
  return dataclasses.replace(LM, config=CFG.replace(moe_routing=routing))


def _outputs(lm, settings, **kw):
  return [g.output_ids for g in generate(target(lm, PARAMS, eos_ids=(1,)), PROMPTS, settings,
                                         **kw)]


def test_beta_zero_is_greedy_under_the_strong_routing():
  greedy = _outputs(_routed(Routing("top_k", 2)), Greedy(max_new_tokens=10))
  assert _outputs(LM, SCMoE(scmoe_beta=0.0, max_new_tokens=10)) == greedy


def test_a_weak_routing_equal_to_the_strong_one_gives_greedy():
  """Strong top-1 against weak rank 0 is the same routing: scores (1 + beta) z - beta z."""
  greedy = _outputs(_routed(Routing("top_k", 1)), Greedy(max_new_tokens=10))
  s = SCMoE(scmoe_beta=0.7, scmoe_strong_top_k=1, scmoe_weak_rank=0, max_new_tokens=10)
  assert _outputs(LM, s) == greedy


def _step_logits(lm, seq):
  toks = jnp.asarray([seq])
  return np.asarray(lm(PARAMS, toks, jnp.arange(len(seq))[None], None).logits[0],
                    np.float64)


@pytest.mark.parametrize("beta,alpha", [(0.5, 0.1), (0.9, 0.01)])
def test_every_token_is_the_best_contrast_score_inside_the_plausible_set(beta, alpha):
  """Teacher-forcing each output through both routings (no cache): at every step the chosen
  token is in V_head = {v: z_s(v) >= log alpha + max z_s} and has the highest
  (1 + beta) z_s - beta z_w there, computed here in float64; and the output differs from
  greedy somewhere (the contrast does something)."""
  s = SCMoE(scmoe_beta=beta, scmoe_alpha=alpha, max_new_tokens=8)
  outs = _outputs(LM, s)
  strong, weak = _routed(Routing("top_k", 2)), _routed(Routing("rank_k", 2))
  greedy = _outputs(strong, Greedy(max_new_tokens=8))
  for prompt, out in zip(PROMPTS, outs):
    seq = prompt + out
    zs, zw = _step_logits(strong, seq), _step_logits(weak, seq)
    for t, tok in enumerate(out):
      i = len(prompt) - 1 + t
      head = zs[i] >= zs[i].max() + np.log(alpha) - 1e-5
      assert head[tok], (t, tok)
      score = np.where(head, (1 + beta) * zs[i] - beta * zw[i], -np.inf)
      assert score[tok] >= score.max() - 1e-4, (t, tok)
  assert outs != greedy


def test_contrast_scores_mask_outside_the_plausible_set():
  zs = jnp.log(jnp.asarray([[0.5, 0.3, 0.04, 0.16]]))
  zw = jnp.asarray([[3.0, -1.0, -5.0, 0.0]])
  got = np.asarray(contrast_scores(zs, zw, alpha=0.1, beta=1.0))[0]
  assert np.isneginf(got[2]) and np.isfinite(got[[0, 1, 3]]).all()  # 0.04 < 0.1 * 0.5
  np.testing.assert_allclose(got[[0, 1, 3]], 2 * np.asarray(zs)[0, [0, 1, 3]]
                             - np.asarray(zw)[0, [0, 1, 3]], rtol=1e-6)
  # the contrast picks token 1 although the strong routing prefers token 0
  assert got.argmax() == 1 and int(np.asarray(zs).argmax()) == 0


def test_sampled_first_tokens_follow_the_softmax_of_the_contrast_scores():
  prompt = PROMPTS[1]
  n = 4000
  s = SCMoE(scmoe_beta=0.5, scmoe_alpha=0.02, do_sample=True, max_new_tokens=1,
            num_return_sequences=n)
  firsts = np.asarray([g.output_ids[0] for g in generate(
      target(LM, PARAMS), [prompt], s, seed=3, batch_size=n)])
  strong, weak = _routed(Routing("top_k", 2)), _routed(Routing("rank_k", 2))
  zs = _step_logits(strong, prompt)[-1]
  zw = _step_logits(weak, prompt)[-1]
  score = np.where(zs >= zs.max() + np.log(0.02), 1.5 * zs - 0.5 * zw, -np.inf)
  p = np.exp(score - score.max())
  p /= p.sum()
  support = p > 0
  assert support.sum() >= 3  # a real distribution, not one token
  counts = np.bincount(firsts, minlength=CFG.vocab_size)
  assert counts[~support].sum() == 0
  assert chi2_pvalue(counts[support], p[support]) > 1e-3, (counts[support], p[support])


def test_the_cli_fields_map_to_the_settings():
  c = generate_config.get_config()
  c.strategy = "scmoe"
  c.scmoe_beta, c.scmoe_weak_rank = 0.3, 1
  s = settings_from_config(c.to_dict())
  assert isinstance(s, SCMoE) and s.scmoe_beta == 0.3 and s.scmoe_weak_rank == 1


def test_bad_settings_and_dense_models_are_refused_before_any_compile():
  with pytest.raises(GenerationError, match="scmoe_alpha"):
    SCMoE(scmoe_alpha=0.0)
  with pytest.raises(GenerationError, match="scmoe_beta"):
    SCMoE(scmoe_beta=-0.1)
  with pytest.raises(GenerationError, match="do_sample"):
    SCMoE(num_return_sequences=4)
  with pytest.raises(GenerationError, match="scmoe_weak_rank"):
    contrast_lm(SCMoE(scmoe_weak_rank=4), LM)
  dense = TransformerLM(tiny_config())
  with pytest.raises(GenerationError, match="no experts"):
    generate(target(dense, init_params(dense.config, jax.random.PRNGKey(0))), [[1, 2]],
             SCMoE())


@pytest.mark.slow
@pytest.mark.usefixtures("smollm_gguf")  # the shipped delta is assembled from SmolLM2's weights
def test_the_shipped_moe_loads_by_name_and_scmoe_at_beta_zero_is_its_top2_greedy():
  m = load_model("smollm2-135m-moe")
  cfg = m.lm.config
  assert (cfg.moe_experts, cfg.moe_shared_intermediate_size, cfg.moe_routing) == (
      8, 768, Routing("top_k", 2))
  prompts = [m.tokenizer.encode_chat([{"role": "user", "content": q}])
             for q in ("What is 12 plus 30?", "Name a colour.", "Write one word.")]
  t = target(m.lm, m.params, eos_ids=(2,))
  greedy = [g.output_ids for g in generate(t, prompts, Greedy(max_new_tokens=12))]
  zero = [g.output_ids for g in generate(t, prompts, SCMoE(max_new_tokens=12, scmoe_beta=0.0))]
  assert greedy == zero

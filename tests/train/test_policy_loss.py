"""GRPO / DAPO / DCPO losses and advantages (train/policy_loss.py, train/advantages.py): the
DCPO README's bound test vectors, the bound identities, where the gradient vanishes, the
aggregations, the KL estimator, and smooth advantage standardisation against a float64
re-derivation."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import tiny_config
from models.transformer import init_params
from train import advantages as adv_lib
from train import losses
from train import policy_loss as pl

README = pl.objective("dcpo", clip_low=0.16, clip_high=0.2)  # the README's example values


def bounds(q, obj=README):
  lo, hi = pl.clip_bounds(jnp.log(jnp.asarray(q, jnp.float32)), obj)
  return float(lo), float(hi)


def test_dcpo_bounds_match_the_readme_test_vectors_in_probability_space():
  lo, hi = bounds(0.9)
  assert 0.9 * lo == pytest.approx(0.69, abs=0.005)
  assert min(0.9 * hi, 1.0) == 1.0 and 0.9 * hi == pytest.approx(1.069, abs=0.005)
  lo, hi = bounds(0.01)
  assert 0.01 * lo == pytest.approx(0.005, abs=1e-6)
  assert 0.01 * hi == pytest.approx(0.05, abs=1e-6)


@pytest.mark.parametrize("q", [0.05, 0.3, 0.64, 0.9, 0.999])
def test_dcpo_bounds_solve_the_probability_change_constraint(q):
  obj = pl.objective("dcpo", max_ratio=1e6)
  lo, hi = bounds(q, obj)
  assert (hi - 1) * hi * q == pytest.approx(obj.clip_high, rel=1e-4)
  if 4 * obj.clip_low < q:
    assert (1 - lo) * lo * q == pytest.approx(obj.clip_low, rel=1e-4)
  else:  # the constraint cannot bind below: the bound is r = 0.5
    assert lo == pytest.approx(0.5)


def test_dcpo_bounds_near_q_one_and_the_cap():
  obj = pl.objective("dcpo")
  lo, hi = bounds(0.999999, obj)
  assert lo == pytest.approx(0.5 + 0.5 * np.sqrt(1 - 4 * obj.clip_low), abs=1e-4)
  assert hi == pytest.approx(0.5 + 0.5 * np.sqrt(1 + 4 * obj.clip_high), abs=1e-4)
  assert bounds(1e-6, obj)[1] == obj.max_ratio  # rare tokens: the upper bound is capped


def test_fixed_bounds_are_one_minus_and_plus_epsilon():
  lo, hi = bounds(0.3, pl.objective("dapo"))
  assert (lo, hi) == (pytest.approx(0.8), pytest.approx(1.28))


def loss_of_logp(logp, old_logp, a, obj):
  return pl.token_losses(jnp.asarray([[logp]]), jnp.asarray([[old_logp]]),
                         jnp.asarray([a]), obj)[0][0, 0]


@pytest.mark.parametrize("name", ["grpo", "dapo", "dcpo"])
def test_gradient_vanishes_for_positive_advantage_above_the_upper_bound(name):
  obj = pl.objective(name)
  old = np.log(0.3)
  lo, hi = bounds(0.3, obj)
  grad = jax.grad(loss_of_logp)
  above = old + np.log(hi) + 0.05
  assert float(grad(above, old, 1.0, obj)) == 0.0
  inside = old + np.log(hi) - 0.05
  assert float(grad(inside, old, 1.0, obj)) < 0.0  # raising p still lowers the loss
  below = old + np.log(lo) - 0.05  # negative advantage under the lower bound: clipped too
  assert float(grad(below, old, -1.0, obj)) == 0.0


def test_dual_clip_caps_the_loss_of_a_negative_advantage_at_c():
  obj = pl.objective("dapo")
  huge = float(np.log(50.0))  # ratio 50 > c = 10
  assert float(loss_of_logp(huge, 0.0, -2.0, obj)) == pytest.approx(2.0 * obj.dual_clip)
  no_dual = dataclasses.replace(obj, dual_clip=0.0)
  assert float(loss_of_logp(huge, 0.0, -2.0, no_dual)) == pytest.approx(100.0, rel=1e-5)
  _, info = pl.token_losses(jnp.asarray([[huge]]), jnp.zeros((1, 1)), jnp.asarray([-2.0]), obj)
  assert bool(info["dual_clipped"][0, 0])


def test_ratio_one_gives_the_policy_gradient_loss():
  """At π_θ = π_old the loss is −Â per token and its gradient −Â (every bound contains 1)."""
  for name in pl.PRESETS:
    obj = pl.objective(name)
    assert float(loss_of_logp(-1.2, -1.2, 0.7, obj)) == pytest.approx(-0.7)
    assert float(jax.grad(loss_of_logp)(-1.2, -1.2, 0.7, obj)) == pytest.approx(-0.7)


def test_aggregations():
  values = jnp.asarray([[1.0, 2.0, 3.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]])
  assert float(pl.aggregate(values, mask, "token-mean")) == pytest.approx(16 / 4)
  assert float(pl.aggregate(values, mask, "only-token-mean")) == pytest.approx(16 / 4)
  assert float(pl.aggregate(values, mask, "seq-mean-token-mean")) == pytest.approx((2 + 10) / 2)
  # a row with no response tokens does not count as a sequence
  padded = jnp.concatenate([mask, jnp.zeros((1, 4), mask.dtype)])
  rows = jnp.concatenate([values, jnp.ones((1, 4))])
  assert float(pl.aggregate(rows, padded, "seq-mean-token-mean")) == pytest.approx(6.0)


def test_k3_kl_is_zero_at_equality_and_unbiased():
  assert float(pl.kl_k3(jnp.asarray(-0.3), jnp.asarray(-0.3))) == 0.0
  p = np.asarray([0.5, 0.3, 0.2])
  r = np.asarray([0.2, 0.5, 0.3])
  exact = float((p * np.log(p / r)).sum())  # KL(p || r) = E_p[k3]
  k3 = pl.kl_k3(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(r)))
  assert float((p * np.asarray(k3)).sum()) == pytest.approx(exact, rel=1e-5)
  assert (np.asarray(k3) >= 0).all()


def test_bad_objectives_are_refused():
  for bad in (dict(clip_low=1.2), dict(dual_clip=0.5), dict(aggregation="mean"),
              dict(advantage="gae"), dict(max_ratio=1.0), dict(kl_coef=-1.0)):
    with pytest.raises(ValueError):
      pl.objective("dcpo", **bad)
  with pytest.raises(ValueError, match="unknown objective"):
    pl.objective("ppo")


def test_policy_loss_on_a_tiny_model_reports_mechanism_metrics():
  c = tiny_config(vocab_size=32, num_layers=1)
  params = init_params(c, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 10), 2, 32)
  mask = jnp.zeros((4, 10)).at[:, 4:].set(1.0)
  logp = losses.token_logprobs(losses.sequence_logits(params, c, tokens), tokens)
  batch = dict(tokens=tokens, mask=mask, old_logp=logp, ref_logp=logp,
               advantages=jnp.asarray([1.0, -1.0, 0.5, 0.0]))
  for name in pl.PRESETS:
    loss, m = pl.policy_loss(c, pl.objective(name))(params, batch, None)
    # at the old policy: ratio 1, nothing clipped, KL 0, loss = −mean advantage per token
    assert float(m["clip_ratio"]) == 0.0 and float(m["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(loss) == pytest.approx(-0.125, abs=1e-5)
    assert ("tokens" in m) == (name == "dapo")  # token-mean weights micro-batches by tokens
  moved = dict(batch, old_logp=logp - 1.0)  # π_θ = e·π_old on every token: ratio 2.72
  _, m = pl.policy_loss(c, pl.objective("grpo"))(params, moved, None)
  assert float(m["clip_ratio"]) == pytest.approx(0.5)  # the rows with Â > 0 are clipped


# ------------------------------------------------------------------------------ advantages


def test_group_advantages_standardise_each_group_and_zero_equal_rewards():
  r = jnp.asarray([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
  a = np.asarray(adv_lib.group_advantages(r))
  sd = np.std([1, 0, 0, 1], ddof=1)
  np.testing.assert_allclose(a[0], (np.array([1, 0, 0, 1]) - 0.5) / (sd + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(a[1], 0.0)


def reference_sas(history: list[np.ndarray], rewards: np.ndarray) -> np.ndarray:
  """DCPO's advantage of `rewards` (one group) after earlier groups `history` of the same
  prompt, in float64 from the card's formulas (running merge, then the smaller mix)."""
  mu, var, n = 0.0, 0.0, 0
  for g in history + [rewards]:
    n += 1
    m_new, s_new = g.mean(), g.std(ddof=1)
    mu_old = mu
    mu = (mu * (n - 1) + m_new) / n
    var = ((n - 1) * var + s_new ** 2 + (n - 1) / n * (m_new - mu_old) ** 2) / n
  a_new = (rewards - m_new) / s_new if s_new > 0 else np.zeros_like(rewards)
  sd = np.sqrt(var)
  a_tot = (rewards - mu) / sd if sd > 0 else np.zeros_like(rewards)
  sa_new = (n - 1) / n * a_new + a_tot / n
  sa_tot = a_new / n + (n - 1) / n * a_tot
  return np.where(np.abs(sa_new) < np.abs(sa_tot), sa_new, sa_tot)


def test_smooth_advantages_first_visit_equal_group_advantages():
  r = jnp.asarray([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.5]])
  a, stats = adv_lib.smooth_advantages(adv_lib.PromptStats.empty(5), jnp.asarray([3, 1]), r)
  np.testing.assert_allclose(a, adv_lib.group_advantages(r), atol=1e-5)
  assert stats.visits.tolist() == [0, 1, 0, 1, 0]


def test_smooth_advantages_follow_the_running_statistics_over_visits():
  rng = np.random.default_rng(0)
  groups = [rng.integers(0, 2, 6).astype(np.float64) for _ in range(5)]
  groups[3] = np.ones(6)  # identical rewards at the fourth visit
  stats = adv_lib.PromptStats.empty(2)
  for i, g in enumerate(groups):
    a, stats = adv_lib.smooth_advantages(stats, jnp.asarray([1]), jnp.asarray(g[None], jnp.float32))
    np.testing.assert_allclose(np.asarray(a[0]), reference_sas(groups[:i], g), atol=1e-5)
  history = groups[:3]
  same = reference_sas(history, groups[3])
  assert np.abs(same).min() > 0  # no dead zone: equal rewards still get a gradient


def test_smooth_advantage_of_equal_rewards_is_the_running_advantage_over_n():
  stats = adv_lib.PromptStats.empty(1)
  _, stats = adv_lib.smooth_advantages(stats, jnp.asarray([0]), jnp.asarray([[1.0, 0.0, 0.0, 0.0]]))
  a, stats = adv_lib.smooth_advantages(stats, jnp.asarray([0]), jnp.full((1, 4), 1.0))
  mu, sd = float(stats.mean[0]), float(stats.std[0])
  np.testing.assert_allclose(a[0], (1.0 - mu) / sd / 2, rtol=1e-5)  # A_total / i, i = 2
  assert float(a[0, 0]) > 0

"""Advantages of sampled responses from their scalar rewards, one group of G per prompt.

* Group standardisation (GRPO, "DeepSeekMath", Shao et al. 2024): Â = (R − mean) / (std + 1e-6)
  over the group's G rewards (Bessel-corrected std, as the reference implementations use);
  a group whose rewards are all equal gets Â = 0: no gradient from it.
* Smooth advantage standardisation (DCPO, "DCPO: Dynamic Clipping Policy Optimization",
  lime-RL 2025): each prompt keeps running statistics of every reward it has received
  (`PromptStats`, part of the training state and checkpointed). At its n-th visit the group
  statistics (μ_new, σ_new) are merged into the running ones,

      μ = (μ_old·(n − 1) + μ_new) / n,
      σ² = [(n − 1)·σ_old² + σ_new² + (n − 1)/n·(μ_new − μ_old)²] / n,

  the group's and the running standardised rewards A_new = (R − μ_new)/σ_new and
  A_total = (R − μ)/σ (each 0 where its σ is 0) are mixed two ways,
  SA_new = (n − 1)/n·A_new + 1/n·A_total and SA_total = 1/n·A_new + (n − 1)/n·A_total, and
  Â is the one of smaller magnitude. At the first visit Â is the group advantage (without
  the 1e-6); a later group with equal rewards gets Â = A_total / n, not 0.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

GROUP_EPS = 1e-6


def group_advantages(rewards: Array) -> Array:
  """GRPO advantages [P, G] of rewards [P, G] (one row per prompt)."""
  mean = rewards.mean(-1, keepdims=True)
  return (rewards - mean) / (_std(rewards) + GROUP_EPS)


def _std(rewards: Array) -> Array:
  """Bessel-corrected standard deviation over the last axis (kept), 0 for one sample."""
  G = rewards.shape[-1]
  dev = rewards - rewards.mean(-1, keepdims=True)
  return jnp.sqrt((dev ** 2).sum(-1, keepdims=True) / max(G - 1, 1))


@flax.struct.dataclass
class PromptStats:
  """Running reward statistics per prompt of the training pool (K prompts)."""
  visits: Array  # [K] int32: groups seen so far
  mean: Array  # [K] float32
  std: Array  # [K] float32

  @classmethod
  def empty(cls, num_prompts: int) -> "PromptStats":
    return cls(visits=jnp.zeros((num_prompts,), jnp.int32),
               mean=jnp.zeros((num_prompts,), jnp.float32),
               std=jnp.zeros((num_prompts,), jnp.float32))


def merge_stats(stats: PromptStats, prompt_ids: Array, rewards: Array
                ) -> tuple[PromptStats, Array, Array, Array, Array]:
  """Adds one group per prompt (rewards [P, G], prompt_ids [P], distinct) to the running
  statistics. Returns (new stats, visits n [P], group mean and std [P, 1], running mean and
  std [P, 1])."""
  n = stats.visits[prompt_ids] + 1
  nf = n.astype(jnp.float32)[:, None]
  mu_old, sd_old = stats.mean[prompt_ids][:, None], stats.std[prompt_ids][:, None]
  mu_new, sd_new = rewards.mean(-1, keepdims=True), _std(rewards)
  mu = (mu_old * (nf - 1) + mu_new) / nf
  var = ((nf - 1) * sd_old ** 2 + sd_new ** 2 + (nf - 1) / nf * (mu_new - mu_old) ** 2) / nf
  sd = jnp.sqrt(var)
  new = PromptStats(visits=stats.visits.at[prompt_ids].set(n),
                    mean=stats.mean.at[prompt_ids].set(mu[:, 0]),
                    std=stats.std.at[prompt_ids].set(sd[:, 0]))
  return new, n, mu_new, sd_new, mu, sd


def smooth_advantages(stats: PromptStats, prompt_ids: Array, rewards: Array
                      ) -> tuple[Array, PromptStats]:
  """DCPO advantages [P, G] of rewards [P, G] for prompts `prompt_ids` [P] (distinct pool
  indices), and the statistics updated with these groups."""
  new, n, mu_new, sd_new, mu, sd = merge_stats(stats, prompt_ids, rewards)
  standard = lambda m, s: jnp.where(s > 0, (rewards - m) / jnp.where(s > 0, s, 1.0), 0.0)
  a_new, a_total = standard(mu_new, sd_new), standard(mu, sd)
  w = 1.0 / n.astype(jnp.float32)[:, None]
  sa_new = (1 - w) * a_new + w * a_total
  sa_total = w * a_new + (1 - w) * a_total
  return jnp.where(jnp.abs(sa_new) < jnp.abs(sa_total), sa_new, sa_total), new

"""Clipped policy-gradient losses of reinforcement learning from verifiable rewards.

Every objective here is the PPO token loss on a response token o_t with advantage Â,
ratio r_t = π_θ(o_t) / π_old(o_t) and bounds lo_t < 1 < hi_t:

    ℓ_t = max(−Â·r_t, −Â·clip(r_t, lo_t, hi_t)),   and for Â < 0 with dual clip c:  min(ℓ_t, −Â·c)

aggregated over the response tokens of a batch, plus an optional KL penalty to a reference
policy. Three published recipes are presets of one `PolicyObjective`:

* GRPO ("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models", Shao et al. 2024): fixed bounds 1 ± 0.2, the k3 KL estimator to the initial
  policy, each response's token mean averaged over responses ("seq-mean-token-mean").
* DAPO ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", Yu et al. 2025):
  decoupled bounds 1 − 0.2 / 1 + 0.28 ("clip-higher"), dual clip c = 10, the mean over all
  response tokens ("token-mean"), dynamic sampling and the overlong reward buffer (those two
  live in the loop, `train.rl`), no KL.
* DCPO ("DCPO: Dynamic Clipping Policy Optimization", lime-RL 2025): bounds that depend on the
  old probability q = π_old(o_t), from |(r − 1)·r·q| ≤ ε,

      lo(q) = 0.5 + 0.5·sqrt(max(1 − 4ε_low/q, 0)),   hi(q) = min(0.5 + 0.5·sqrt(1 + 4ε_high/q), r_max)

  so rare tokens may move much further than likely ones; dual clip c = 10; smooth advantage
  standardisation (`train.advantages`); "only-token-mean" aggregation; no KL, no filtering.

Aggregation across gradient-accumulation micro-batches (`train.trainer` weights micro-batch
means by their "tokens" metric): token-mean reports its token count, so the update is the
mean over every response token of the batch; seq-mean-token-mean weights micro-batches
(equal numbers of responses) equally, so the update is the mean over responses; the
reference code's only-token-mean takes the token mean within each micro-batch and adds the
micro-batches without re-weighting by their token counts, and its global normalisation is
not documented: here micro-batches are weighted equally, so with one micro-batch per
update (our runs) it is the token mean of the update batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from train import losses

Array = jax.Array

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "only-token-mean")
ADVANTAGES = ("group", "smooth")


@dataclasses.dataclass(frozen=True)
class PolicyObjective:
  """One clipped objective (see the module docstring); `PRESETS` holds the three recipes."""
  name: str = "dcpo"
  clip_low: float = 0.2  # ε_low
  clip_high: float = 0.28  # ε_high
  dynamic_clip: bool = True  # DCPO's bounds from π_old; False: fixed 1 − ε_low, 1 + ε_high
  max_ratio: float = 10.0  # r_max: cap of the dynamic upper bound
  dual_clip: float = 10.0  # c > 1 for Â < 0; 0 turns it off
  kl_coef: float = 0.0  # β of the k3 KL estimator to the reference (initial) policy
  aggregation: str = "only-token-mean"
  advantage: str = "smooth"  # "group" (GRPO) | "smooth" (DCPO's running per-prompt statistics)
  dynamic_sampling: bool = False  # DAPO: keep only groups whose rewards differ
  overlong_buffer: int = 0  # DAPO: the last L_cache tokens before the limit cost reward
  overlong_penalty: float = 1.0  # the shaping reward at the limit is −overlong_penalty

  def __post_init__(self):
    if not 0 < self.clip_low < 1 or not 0 < self.clip_high:
      raise ValueError(f"clip bounds need 0 < clip_low < 1 and clip_high > 0, got "
                       f"{self.clip_low}, {self.clip_high}")
    if self.max_ratio <= 1:
      raise ValueError(f"max_ratio must exceed 1, got {self.max_ratio}")
    if self.dual_clip and self.dual_clip <= 1:
      raise ValueError(f"dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
    if self.kl_coef < 0:
      raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"unknown aggregation {self.aggregation!r}; choose from {AGGREGATIONS}")
    if self.advantage not in ADVANTAGES:
      raise ValueError(f"unknown advantage {self.advantage!r}; choose from {ADVANTAGES}")
    if self.overlong_buffer < 0 or self.overlong_penalty < 0:
      raise ValueError("overlong_buffer and overlong_penalty must be >= 0")


PRESETS = {
    "grpo": PolicyObjective("grpo", 0.2, 0.2, dynamic_clip=False, dual_clip=0.0, kl_coef=0.001,
                            aggregation="seq-mean-token-mean", advantage="group"),
    "dapo": PolicyObjective("dapo", 0.2, 0.28, dynamic_clip=False, dual_clip=10.0,
                            aggregation="token-mean", advantage="group", dynamic_sampling=True,
                            overlong_buffer=64),
    "dcpo": PolicyObjective("dcpo", 0.2, 0.28, dynamic_clip=True, dual_clip=10.0,
                            aggregation="only-token-mean", advantage="smooth"),
}


def objective(name: str, **overrides: Any) -> PolicyObjective:
  """The preset `name` ("grpo" | "dapo" | "dcpo") with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown objective {name!r}; choose from {', '.join(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def clip_bounds(old_logp: Array, obj: PolicyObjective) -> tuple[Array, Array]:
  """(lo, hi) ratio bounds per token; old_logp [...] = log π_old(o_t)."""
  if not obj.dynamic_clip:
    shape = jnp.shape(old_logp)
    return jnp.full(shape, 1.0 - obj.clip_low), jnp.full(shape, 1.0 + obj.clip_high)
  q = jnp.exp(old_logp.astype(jnp.float32))
  safe = jnp.where(q > 0, q, 1.0)
  lo = 0.5 + 0.5 * jnp.sqrt(jnp.maximum(1.0 - 4.0 * obj.clip_low / safe, 0.0))
  hi = 0.5 + 0.5 * jnp.sqrt(1.0 + 4.0 * obj.clip_high / safe)
  lo = jnp.where(q > 0, lo, 0.5)  # a token the old policy gave probability 0 (underflow)
  hi = jnp.where(q > 0, jnp.minimum(hi, obj.max_ratio), obj.max_ratio)
  return lo, hi


def token_losses(logp: Array, old_logp: Array, advantages: Array, obj: PolicyObjective
                 ) -> tuple[Array, dict[str, Array]]:
  """Clipped token losses [N, T] for log-probs [N, T] under π_θ and π_old and per-response
  advantages [N]; also boolean [N, T] maps of where the bound clipped (`clipped`) and where
  the dual clip took over (`dual_clipped`)."""
  adv = advantages[:, None].astype(jnp.float32)
  ratio = jnp.exp(logp - old_logp)
  lo, hi = clip_bounds(old_logp, obj)
  plain = -adv * ratio
  bounded = -adv * jnp.clip(ratio, lo, hi)
  loss = jnp.maximum(plain, bounded)
  clipped = bounded > plain
  dual = jnp.zeros_like(clipped)
  if obj.dual_clip:
    cap = -adv * obj.dual_clip
    dual = (adv < 0) & (loss > cap)
    loss = jnp.where(adv < 0, jnp.minimum(loss, cap), loss)
  return loss, {"clipped": clipped, "dual_clipped": dual, "ratio": ratio}


def kl_k3(logp: Array, ref_logp: Array) -> Array:
  """The k3 estimator of KL(π_θ ‖ π_ref) per sampled token: exp(d) − d − 1 with
  d = log π_ref − log π_θ (non-negative, unbiased; "Approximating KL divergence", Schulman)."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def aggregate(values: Array, mask: Array, aggregation: str) -> Array:
  """One scalar from token values [N, T] over `mask` [N, T] (see the module docstring)."""
  mask = mask.astype(jnp.float32)
  if aggregation == "seq-mean-token-mean":
    per_row = (values * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    rows = (mask.sum(-1) > 0).astype(jnp.float32)
    return (per_row * rows).sum() / jnp.maximum(rows.sum(), 1.0)
  return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def policy_loss(config: ModelConfig, obj: PolicyObjective) -> Callable:
  """`loss_fn(params, batch, key) -> (loss, metrics)` for `train.trainer.Trainer`.

  batch: tokens [N, T] (prompt + response, right-padded), mask [N, T] (1 on response tokens,
  EOS included), old_logp and ref_logp [N, T] (aligned with tokens: column t scores token t),
  advantages [N].
  """
  def loss_fn(params, batch, key):
    del key
    logits = losses.sequence_logits(params, config, batch["tokens"])
    logp = losses.token_logprobs(logits, batch["tokens"])
    mask = batch["mask"].astype(jnp.float32)
    per_token, info = token_losses(logp, batch["old_logp"], batch["advantages"], obj)
    pg = aggregate(per_token, mask, obj.aggregation)
    kl = aggregate(kl_k3(logp, batch["ref_logp"]), mask, obj.aggregation)
    loss = pg + obj.kl_coef * kl if obj.kl_coef else pg
    n = jnp.maximum(mask.sum(), 1.0)
    ent = losses.token_entropy(logits)  # position t predicts token t + 1: shift to align
    entropy = jnp.concatenate([jnp.zeros_like(ent[:, :1]), ent[:, :-1]], axis=1)
    metrics = {"pg_loss": pg, "kl": kl,
               "clip_ratio": (info["clipped"] * mask).sum() / n,
               "dual_clip_ratio": (info["dual_clipped"] * mask).sum() / n,
               "ratio_mean": (info["ratio"] * mask).sum() / n,
               "entropy": (entropy * mask).sum() / n}
    if obj.aggregation == "token-mean":  # the trainer weights micro-batches by this count
      metrics["tokens"] = mask.sum()
    else:
      metrics["response_tokens"] = mask.sum()
    return loss, metrics

  return loss_fn

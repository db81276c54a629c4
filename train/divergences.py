"""Per-position divergences between a target distribution p and a draft distribution q.

The distillation losses of DistillSpec ("DistillSpec: Improving Speculative Decoding via
Knowledge Distillation", Zhou et al., ICLR 2024). Each divergence takes the two models'
logits at the same positions, `target_logits [..., V]` (p) and `draft_logits [..., V]` (q),
and returns one value per position `[...]`:

    fkl(p, q)  = KL(p || q) = sum_v p(v) (log p(v) - log q(v))      forward KL (mode covering)
    rkl(p, q)  = KL(q || p) = sum_v q(v) (log q(v) - log p(v))      reverse KL (mode seeking)
    jsd(p, q)  = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
    tvd(p, q)  = 1/2 sum_v |p(v) - q(v)|

JSD convention (`jsd_beta`, beta in (0, 1)): beta weighs the target side. beta = 0.5 is the
symmetric Jensen-Shannon divergence (bounded by log 2). The value vanishes at beta -> 0 and
beta -> 1, but divided by its weight it tends to the KLs: jsd_beta / beta -> FKL as
beta -> 0 and jsd_beta / (1 - beta) -> RKL as beta -> 1. It is the generalized JSD of
on-policy distillation (GKD); it is finite for any supports, since m > 0 wherever p or q is.

TVD matters most for speculative decoding: with standard speculative sampling a draft token
is accepted with probability sum_v min(p(v), q(v)) = 1 - TVD(p, q).

Numerics. Everything is computed in float32 from `log_softmax` of the (optionally
temperature-scaled) logits. Logits of -inf (tokens a logits processor banned) give
probability 0; terms with a zero weight (p = 0 in KL(p || .), q = 0 in KL(q || .)) are
exactly 0 and have zero gradient (the log-probabilities are masked before they are
multiplied, so no `0 * inf` NaN reaches the value or the gradient). A KL is +inf only
where it is infinite (the weighting distribution has mass on a token the other gives
probability 0); JSD and TVD are always finite. A row whose logits are all -inf has no
distribution and is not supported.

`masked_mean` reduces per-position values to the DistillSpec loss
E_(x, y) [ (1 / |y|) sum_t D(p_t, q_t) ] (a per-sequence mean over its valid positions,
then a mean over sequences), or to a token-weighted mean.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# divergence(target_logits [..., V], draft_logits [..., V]) -> [...] float32
Divergence = Callable[[Array, Array], Array]


def log_probs(logits: Array, temperature: float = 1.0) -> Array:
  """float32 log-softmax of `logits / temperature` over the last axis."""
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  return jax.nn.log_softmax(logits, axis=-1)


def _kl_from_logp(logp_a: Array, logp_b: Array) -> Array:
  """KL(a || b) = sum_v a(v) (log a(v) - log b(v)) from float32 log-probs [..., V] -> [...]."""
  a = jnp.exp(logp_a)
  support = a > 0
  # Mask the logs before subtracting: where a(v) = 0 the term is 0 and so is its gradient.
  diff = jnp.where(support, logp_a, 0.0) - jnp.where(support, logp_b, 0.0)
  return jnp.sum(jnp.where(support, a * diff, 0.0), axis=-1)


def fkl(target_logits: Array, draft_logits: Array, temperature: float = 1.0) -> Array:
  """Forward KL(p || q) per position ([..., V], [..., V] -> [...]), float32."""
  return _kl_from_logp(log_probs(target_logits, temperature), log_probs(draft_logits, temperature))


def rkl(target_logits: Array, draft_logits: Array, temperature: float = 1.0) -> Array:
  """Reverse KL(q || p) per position ([..., V], [..., V] -> [...]), float32."""
  return _kl_from_logp(log_probs(draft_logits, temperature), log_probs(target_logits, temperature))


def jsd(target_logits: Array, draft_logits: Array, beta: float = 0.5,
        temperature: float = 1.0) -> Array:
  """Generalized Jensen-Shannon divergence JSD_beta(p, q) per position (see the module
  docstring for the convention): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p +
  (1 - beta) q, with log m computed as a logsumexp of the two log-probabilities."""
  if not 0.0 < beta < 1.0:
    raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
  logp = log_probs(target_logits, temperature)
  logq = log_probs(draft_logits, temperature)
  # log m = logaddexp(log beta + log p, log(1 - beta) + log q), -inf where p = q = 0; the
  # both-infinite entries are masked first (logaddexp's gradient is NaN at (-inf, -inf)).
  neither = jnp.isneginf(logp) & jnp.isneginf(logq)
  a = jnp.where(neither, 0.0, jnp.log(beta) + logp)
  b = jnp.where(neither, 0.0, jnp.log1p(-beta) + logq)
  logm = jnp.where(neither, -jnp.inf, jnp.logaddexp(a, b))
  return beta * _kl_from_logp(logp, logm) + (1.0 - beta) * _kl_from_logp(logq, logm)


def tvd(target_logits: Array, draft_logits: Array, temperature: float = 1.0) -> Array:
  """Total variation distance 1/2 sum_v |p(v) - q(v)| per position, in [0, 1], float32."""
  p = jnp.exp(log_probs(target_logits, temperature))
  q = jnp.exp(log_probs(draft_logits, temperature))
  return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def acceptance_probability(target_logits: Array, draft_logits: Array,
                           temperature: float = 1.0) -> Array:
  """sum_v min(p(v), q(v)) per position: the probability that speculative sampling accepts
  a draft token drawn from q (= 1 - TVD(p, q))."""
  p = jnp.exp(log_probs(target_logits, temperature))
  q = jnp.exp(log_probs(draft_logits, temperature))
  return jnp.sum(jnp.minimum(p, q), axis=-1)


DIVERGENCES = {"fkl": fkl, "rkl": rkl, "jsd": jsd, "tvd": tvd}


def get(name: str, temperature: float = 1.0, beta: float = 0.5) -> Divergence:
  """The divergence `name` (fkl | rkl | jsd | tvd) as `(target_logits, draft_logits) -> [...]`,
  with its temperature (applied to both distributions) and, for jsd, beta bound."""
  if name not in DIVERGENCES:
    raise ValueError(f"unknown divergence {name!r}; choose from {sorted(DIVERGENCES)}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if name == "jsd":
    if not 0.0 < beta < 1.0:
      raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    return lambda t, d: jsd(t, d, beta=beta, temperature=temperature)
  fn = DIVERGENCES[name]
  return lambda t, d: fn(t, d, temperature=temperature)


def masked_mean(values: Array, mask: Array, per_sequence: bool = True) -> Array:
  """Mean of per-position `values [B, T]` over the positions where `mask [B, T]` > 0.

  per_sequence=True (the DistillSpec loss): each row's weighted mean over its valid
  positions, then the mean over the rows that have any (rows without valid positions are
  left out); False: one token-weighted mean over the whole batch. Positions with mask 0
  do not contribute, even when their value is inf or NaN.
  """
  mask = mask.astype(jnp.float32)
  values = jnp.where(mask > 0, values.astype(jnp.float32), 0.0)
  if not per_sequence:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1e-9)
  row_w = jnp.sum(mask, axis=-1)
  row_mean = jnp.sum(values * mask, axis=-1) / jnp.maximum(row_w, 1e-9)
  has = (row_w > 0).astype(jnp.float32)
  return jnp.sum(row_mean * has) / jnp.maximum(jnp.sum(has), 1.0)

"""Sparse Mixture-of-Experts feed-forward block (Mixtral style) with per-call routing.

A router (a [D, E] linear map) scores the E experts of each token; the softmax of those
scores gives router probabilities p [..., E]. A routing rule turns p into combination
weights w [..., E], and the block's output is sum_e w_e * expert_e(x), each expert a SwiGLU
MLP (down(silu(gate x) * up x)) of its own ("Mixtral of Experts", Jiang et al., 2024).

Routing rules (`Routing`, static, part of `ModelConfig.moe_routing`, so a second routing of
the same weights is `TransformerLM(config.replace(moe_routing=...))`, one compile each):

* ``top_k``: the k most probable experts, weights renormalised over them (Mixtral, k = 2);
* ``rank_k``: only the expert at 0-based rank k of the sorted probabilities, weight 1
  (the weak activation of "Unchosen Experts Can Contribute Too: Unleashing MoE Models'
  Power by Self-Contrast", Shi et al., 2024; rank 0 is top-1 routing);
* ``expert``: one fixed expert (index k), weight 1, whatever the router says;
* ``all``: every expert with weight 1. An MoE made by splitting a dense MLP's hidden units
  into experts then computes the dense MLP again (up to the order of the final sum);
* ``contrast``: the first half of the batch rows routed ``top_k`` (k), the second half
  ``rank_k`` (`weak_rank`): both activations of self-contrast decoding in one call.

Ties among router probabilities are broken by the lower expert index (a stable sort), so
every rule is deterministic.

The computation is dense over experts: every expert runs on every token and unselected
experts get weight 0. That is exactly the sparse block's function (no capacity limit, no
dropped tokens, ragged batches need nothing special) at E/k times the FLOPs of a sparse
dispatch; for the models this project builds (a dense MLP split into experts) it costs what
the dense MLP costs. Expert weights are [E, D, F] (gate, up) and [E, F, D] (down), named like
the dense MLP's projections, so the LayerCast recipe stores them in bf16 and the sharding
rules split each expert's hidden units over the mesh's `model` axis (every device holds a
slice of every expert, as for the dense MLP); the router stays replicated.

The router's logits are sown as the `intermediates` collection `router_logits` (one entry
per layer) for the auxiliary load-balancing loss (`load_balancing_loss`) in training.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ROUTING_KINDS = ("top_k", "rank_k", "expert", "all", "contrast")
TOP_K_WEIGHTS = ("sum_one", "mean_one")


@dataclasses.dataclass(frozen=True)
class Routing:
  """How router probabilities become expert weights (see the module docstring).

  k: experts kept (`top_k`, >= 1), 0-based rank (`rank_k`), expert index (`expert`);
  ignored by `all`."""
  kind: str = "top_k"
  k: int = 2
  weak_rank: int = 2  # `contrast` only: the rank-k routing of the second half of the rows

  def __post_init__(self):
    if self.kind not in ROUTING_KINDS:
      raise ValueError(f"routing kind must be one of {ROUTING_KINDS}, got {self.kind!r}")
    if self.kind == "contrast" and self.weak_rank < 0:
      raise ValueError(f"contrast routing needs a 0-based weak_rank >= 0, got {self.weak_rank}")
    if self.kind in ("top_k", "contrast") and self.k < 1:
      raise ValueError(f"top_k routing keeps k >= 1 experts, got k={self.k}")
    if self.kind in ("rank_k", "expert") and self.k < 0:
      raise ValueError(f"{self.kind} routing needs a 0-based index k >= 0, got k={self.k}")

  def check(self, num_experts: int) -> None:
    """Raises if `k` does not fit `num_experts` experts."""
    limit = {"top_k": num_experts, "rank_k": num_experts - 1, "expert": num_experts - 1,
             "contrast": num_experts}
    if self.kind in limit and self.k > limit[self.kind]:
      raise ValueError(f"{self.kind} routing with k={self.k} on a model of {num_experts} "
                       f"experts (k <= {limit[self.kind]})")
    if self.kind == "contrast" and self.weak_rank > num_experts - 1:
      raise ValueError(f"contrast routing with weak_rank={self.weak_rank} on a model of "
                       f"{num_experts} experts (weak_rank <= {num_experts - 1})")


def expert_ranks(probs: Array) -> Array:
  """0-based rank of each expert by probability [..., E] (0 = most probable; ties: lower
  index first)."""
  order = jnp.argsort(-probs, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def routing_weights(router_logits: Array, routing: Routing, top_k_weights: str = "sum_one"
                    ) -> Array:
  """Combination weights [..., E] float32 of the experts from the router logits [..., E]
  (`contrast`: [B, ..., E], B even). `top_k_weights="mean_one"` multiplies the renormalised
  top-k weights by k (`ModelConfig.moe_top_k_weights`)."""
  if routing.kind == "contrast":
    half = router_logits.shape[0] // 2
    return jnp.concatenate([
        routing_weights(router_logits[:half], Routing("top_k", routing.k), top_k_weights),
        routing_weights(router_logits[half:], Routing("rank_k", routing.weak_rank))])
  logits = router_logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  E = probs.shape[-1]
  if routing.kind == "all":
    return jnp.ones_like(probs)
  if routing.kind == "expert":
    return jnp.broadcast_to(jax.nn.one_hot(routing.k, E, dtype=jnp.float32), probs.shape)
  ranks = expert_ranks(probs)
  if routing.kind == "rank_k":
    return (ranks == routing.k).astype(jnp.float32)
  # renormalised top-k probabilities, as a softmax over the kept logits (Mixtral's form):
  # a single kept expert then gets weight exactly 1, as in rank-0 routing
  w = jax.nn.softmax(jnp.where(ranks < routing.k, logits, -jnp.inf), axis=-1)
  return w * routing.k if top_k_weights == "mean_one" else w


def load_balancing_loss(router_logits: Array, top_k: int, mask: Array | None = None) -> Array:
  """Auxiliary load-balancing loss of "Switch Transformers" (Fedus et al., 2022) as Mixtral
  trains with it: E * sum_e f_e * P_e, where f_e is the share of (token, slot) assignments
  that top-k routing gives expert e and P_e the mean router probability of e, over the
  tokens where `mask` [...] is true. router_logits: [..., E] (layers may be stacked in the
  leading axes). Equals top_k when the load is uniform; larger when it is not."""
  logits = router_logits.astype(jnp.float32)
  E = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  chosen = (expert_ranks(probs) < top_k).astype(jnp.float32)
  m = jnp.ones(logits.shape[:-1], jnp.float32) if mask is None else jnp.broadcast_to(
      mask, logits.shape[:-1]).astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  f = (chosen * m[..., None]).reshape(-1, E).sum(0) / n
  p = (probs * m[..., None]).reshape(-1, E).sum(0) / n
  return E * jnp.sum(f * p)


class _Kernel(nn.Module):
  """One weight, stored as `<name>/kernel` like a Dense layer's."""
  shape: tuple
  dtype: Any

  @nn.compact
  def __call__(self) -> Array:
    return self.param("kernel", nn.initializers.normal(0.02), self.shape, self.dtype)


class MoEMLP(nn.Module):
  """The MoE block in place of a decoder layer's MLP (`ModelConfig.moe_experts > 0`)."""
  config: "ModelConfig"  # noqa: F821 (models.config imports nothing from here)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    E, D, F = cfg.moe_experts, x.shape[-1], cfg.expert_intermediate_size
    store = cfg.projection_dtype
    router = _Kernel((D, E), cfg.param_dtype, name="router")()
    if cfg.fused_projections:
      gate_up = _Kernel((E, D, 2 * F), store, name="gate_up_proj")()
    else:
      gate = _Kernel((E, D, F), store, name="gate_proj")()
      up = _Kernel((E, D, F), store, name="up_proj")()
      gate_up = None
    down = _Kernel((E, F, D), store, name="down_proj")()
    x = x.astype(cfg.dtype)
    # the router in float32 whatever the compute dtype: its near-ties decide the experts
    logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), router.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    self.sow("intermediates", "router_logits", logits)
    w = routing_weights(logits, cfg.moe_routing, cfg.moe_top_k_weights).astype(cfg.dtype)
    p = cfg.precision
    if gate_up is not None:
      g, u = jnp.split(jnp.einsum("...d,edf->...ef", x, gate_up.astype(cfg.dtype),
                                  precision=p), 2, axis=-1)
    else:
      g = jnp.einsum("...d,edf->...ef", x, gate.astype(cfg.dtype), precision=p)
      u = jnp.einsum("...d,edf->...ef", x, up.astype(cfg.dtype), precision=p)
    h = jax.nn.silu(g) * u * w[..., None]  # [..., E, F]: unselected experts contribute 0
    y = jnp.einsum("...ef,efd->...d", h, down.astype(cfg.dtype), precision=p)
    if cfg.moe_shared_intermediate_size:
      y = y + SharedExpert(cfg, name="shared_mlp")(x)
    return y


class SharedExpert(nn.Module):
  """The always-on expert (`moe_shared_intermediate_size` SwiGLU units, weight 1); its
  separate gate/up/down kernels are named like the dense MLP's, so LayerCast stores them in
  bf16 and the mesh splits their hidden units over `model`."""
  config: "ModelConfig"  # noqa: F821

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    D, F, store, p = x.shape[-1], cfg.moe_shared_intermediate_size, cfg.projection_dtype, cfg.precision
    gate, up = (_Kernel((D, F), store, name=n)() for n in ("gate_proj", "up_proj"))
    down = _Kernel((F, D), store, name="down_proj")()
    g = jnp.dot(x, gate.astype(cfg.dtype), precision=p)
    u = jnp.dot(x, up.astype(cfg.dtype), precision=p)
    return jnp.dot(jax.nn.silu(g) * u, down.astype(cfg.dtype), precision=p)


def experts_from_dense(gate: Array, up: Array, down: Array, assignment) -> dict:
  """Splits a dense SwiGLU MLP's hidden units into experts: unit f goes to expert
  assignment[f] >= 0, or to the shared expert where assignment[f] = -1; every routed expert
  gets the same number of units, in increasing order.
  gate, up: [..., D, F]; down: [..., F, D]; assignment: [F] ints in [-1, E) shared by the
  leading axes (e.g. stacked layers), or [L, F], one per layer of [L, D, F] weights.
  Returns {"gate_proj", "up_proj", "down_proj"} kernels [..., E, D, F_e] and [..., E, F_e, D],
  plus "shared": the same three kernels of the shared units ([..., D, S], [..., S, D]) when
  there are any. With `Routing("all")` the MoE block (shared expert included) then computes
  the dense MLP: the hidden units are independent, and the sum over experts sums every unit
  once."""
  a = np.asarray(assignment)
  if a.ndim == 2:
    parts = [experts_from_dense(gate[i], up[i], down[i], a[i]) for i in range(a.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
  F = gate.shape[-1]
  routed = a[a >= 0]
  E = int(routed.max()) + 1 if routed.size else 0
  counts = np.bincount(routed, minlength=E)
  if a.shape != (F,) or a.min() < -1 or not E or np.any(counts != counts[0]):
    raise ValueError(f"the assignment must give each routed expert the same number of the {F} "
                     f"hidden units (-1: shared); it gives {counts.tolist()} and "
                     f"{int(np.sum(a == -1))} shared")
  order = np.argsort(np.where(a < 0, E, a), kind="stable")  # routed units by expert, then shared
  mine = order[:routed.size].reshape(E, -1)  # units of expert e, increasing
  out = {"gate_proj": jnp.moveaxis(gate[..., mine], -2, -3),
         "up_proj": jnp.moveaxis(up[..., mine], -2, -3),
         "down_proj": down[..., mine, :]}
  shared = order[routed.size:]
  if shared.size:
    out["shared"] = {"gate_proj": gate[..., shared], "up_proj": up[..., shared],
                     "down_proj": down[..., shared, :]}
  return out

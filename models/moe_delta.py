"""A Mixture-of-Experts model stored as what differs from the dense model it was cut from.

The dense parent's MLP hidden units are partitioned: some form a shared expert that every
token uses, the rest are split evenly into E routed experts ("MoEfication: Transformer
Feed-forward Layers are Mixtures of Experts", Zhang et al., 2022, with the shared expert of
"DeepSeekMoE", Dai et al., 2024). Training then adds a router per layer and low-rank
updates of the expert weights. The delta holds only that, a few MB:

  assignment [L, F] int32  expert of each of the parent's hidden units (-1: shared)
  router     [L, D, E]     router kernels
  adapters                 {"gate_proj" | "up_proj" | "down_proj": {"lora_a", "lora_b"}} of the
                           routed experts ([L, E, ., r], [L, E, r, .]) and, under
                           "shared_mlp", of the shared expert

with its config {"experts", "top_k", "top_k_weights", "lora_scale"}. `assemble` rebuilds
the full model from the parent's installed weights; the artifact's manifest pins the
parent's checksum, so a delta never lands on other weights.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from models import low_rank, moe
from models.config import ModelConfig
from models.moe import Routing

KIND = "moe_delta"
CONFIG_FIELDS = ("experts", "top_k", "top_k_weights", "lora_scale")


def moe_config(dense: ModelConfig, assignment: np.ndarray, experts: int, top_k: int,
               top_k_weights: str) -> ModelConfig:
  """The MoE model's config: the parent's with the MLP split as `assignment` [L, F] says."""
  a = np.asarray(assignment)
  shared = int(np.sum(a[0] < 0))
  if a.ndim != 2 or a.shape != (dense.num_layers, dense.intermediate_size):
    raise ValueError(f"assignment must be [layers, hidden units] = [{dense.num_layers}, "
                     f"{dense.intermediate_size}], got {list(a.shape)}")
  if np.any(np.sum(a < 0, axis=1) != shared):
    raise ValueError("every layer must give the shared expert the same number of units")
  return dense.replace(moe_experts=experts,
                       moe_intermediate_size=(dense.intermediate_size - shared) // experts,
                       moe_shared_intermediate_size=shared, moe_top_k_weights=top_k_weights,
                       moe_routing=Routing("top_k", top_k))


def split_params(dense_params: dict, assignment: np.ndarray, router: Any) -> dict:
  """The MoE parameters (stacked layers, separate projections) of the dense parameters with
  their MLPs split by `assignment` [L, F] and the router kernels [L, D, E]."""
  mlp = dense_params["layers"]["mlp"]
  parts = moe.experts_from_dense(mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"],
                                 mlp["down_proj"]["kernel"], assignment)
  new_mlp = {k: {"kernel": parts[k]} for k in ("gate_proj", "up_proj", "down_proj")}
  if "shared" in parts:
    new_mlp["shared_mlp"] = {k: {"kernel": w} for k, w in parts["shared"].items()}
  new_mlp["router"] = {"kernel": jnp.asarray(router, jnp.float32)}
  layers = dict(dense_params["layers"])
  layers["mlp"] = new_mlp
  return {**dense_params, "layers": layers}


def assemble(dense_params: dict, dense_config: ModelConfig, delta: dict,
             delta_config: dict) -> tuple[ModelConfig, dict]:
  """(config, params) of the MoE model: the parent's parameters (stacked layers, separate
  projections, as `load_model(..., scan_layers=True, fused_projections=False)` gives them)
  split by the delta's assignment, with its routers and its low-rank updates merged."""
  missing = [f for f in CONFIG_FIELDS if f not in delta_config]
  if missing or "assignment" not in delta or "router" not in delta:
    raise ValueError(f"not an MoE delta: missing {missing + [k for k in ('assignment', 'router') if k not in delta]}")
  assignment = np.asarray(delta["assignment"])
  config = moe_config(dense_config, assignment, int(delta_config["experts"]),
                      int(delta_config["top_k"]), delta_config["top_k_weights"])
  params = split_params(dense_params, assignment, delta["router"])
  if delta.get("adapters"):
    layers = dict(params["layers"])
    layers["mlp"] = low_rank.merge(layers["mlp"], delta["adapters"],
                                   float(delta_config["lora_scale"]))
    params = {**params, "layers": layers}
  return config, params

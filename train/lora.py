"""LoRA adapters on the attention and MLP projections ("LoRA: Low-Rank Adaptation of
Large Language Models", Hu et al., ICLR 2022).

A targeted kernel W [.., in, out] (stacked layers add a leading [L] axis) is used as
W + (alpha / r) * A @ B with A [.., in, r] and B [.., r, out]. A starts Kaiming-uniform
(as in the reference implementation), B at zero, so training starts from the base model.
The adapters are a separate pytree that mirrors the parameter tree (only targeted
projections appear, as `{"lora_a", "lora_b"}` in place of `kernel`); the base stays
frozen because only the adapter tree is handed to the optimizer. `merge` folds the
adapters into a plain parameter tree that every decoding strategy accepts unchanged.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from models import low_rank

Array = jax.Array

# Paths end in ".../<module>/kernel"; targets name the module (regex on the module path).
ATTENTION = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj")
MLP = ("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
DEFAULT_TARGETS = ATTENTION + MLP


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _targeted(path: str, targets: Sequence[str]) -> bool:
  if not path.endswith("/kernel"):
    return False
  module = path[: -len("/kernel")]
  return any(re.search(f"(^|/){t}$", module) for t in targets)


def init(params: Any, key: Array, rank: int = 8, targets: Sequence[str] = DEFAULT_TARGETS,
         dtype=jnp.float32) -> Any:
  """Adapter tree for every kernel whose module path matches one of `targets`."""
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = [(p, x) for p, x in flat if _targeted(_path_str(p), targets)]
  missing = [t for t in targets if not any(_targeted(_path_str(p), (t,)) for p, _ in chosen)]
  if missing:  # adapting fewer projections than asked would pass unnoticed
    raise ValueError(f"no parameter matches the LoRA target(s) {tuple(missing)} (a model "
                     "loaded with fused projections has qkv_proj / gate_up_proj instead: "
                     "load it with fused_projections=False, as training does)")
  keys = jax.random.split(key, len(chosen))
  out: dict = {}
  for (path, w), k in zip(chosen, keys):
    *lead, d_in, d_out = w.shape
    bound = (1.0 / d_in) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound for fan_in = d_in
    a = jax.random.uniform(k, (*lead, d_in, rank), dtype, -bound, bound)
    b = jnp.zeros((*lead, rank, d_out), dtype)
    node = out
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path[:-1]]
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = {"lora_a": a, "lora_b": b}
  return out


def merge(params: Any, adapters: Any, alpha: float, rank: int) -> Any:
  """Base parameters with `alpha / rank * A @ B` added to each adapted kernel (merged
  kernels are float32; `Dense` casts to the compute dtype)."""
  return low_rank.merge(params, adapters, alpha / rank)


def num_params(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))

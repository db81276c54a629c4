"""Named precision modes: the whole numeric recipe of a model in one word.

  fp32       every weight stored in float32, float32 compute, dots at `precision=HIGHEST`
             (on GPUs a default-precision float32 dot may run in TF32).
  bf16       every weight stored in bfloat16 and bfloat16 compute (activations, KV cache):
             what "serving in bf16" means. Attention scores and softmax stay float32, as in
             every forward pass of `models.transformer`.
  layercast  LayerCast ("Give Me FP32 or Give Me Death? Challenges and Solutions for
             Reproducible Reasoning", Yuan et al., 2025): only the projection weights (attention
             q/k/v/o, MLP gate/up/down and their biases) are stored in bfloat16 and upcast to
             float32 just before their matmul; embeddings, the LM head and the norms stay
             float32, as do the residual stream, RoPE, softmax, the KV cache and every
             accumulation; dots at `precision=HIGHEST`. The same model as float32 with the
             projection weights rounded to bfloat16 (the reference code converts only modules
             whose name contains `proj`), at about half the parameter memory of a model whose
             parameters are mostly projections.

`recipe(name)` gives the `ModelConfig` fields of a mode; `cast_params` stores parameters the way
a config says (projection weights in `proj_dtype`, everything else in `param_dtype`).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

NUMERICS = ("fp32", "bf16", "layercast")

_RECIPES = {
    "fp32": dict(dtype=jnp.float32, param_dtype=jnp.float32, proj_dtype=None,
                 matmul_precision="highest"),
    "bf16": dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, proj_dtype=None,
                 matmul_precision="default"),
    "layercast": dict(dtype=jnp.float32, param_dtype=jnp.float32, proj_dtype=jnp.bfloat16,
                      matmul_precision="highest"),
}

# the attention and MLP projections of either layout (separate or fused), kernel or bias
_PROJECTION = re.compile(r"(^|/)(attn|mlp|shared_mlp)/(q|k|v|o|qkv|gate|up|down|gate_up)_proj/(kernel|bias)$")


def recipe(name: str) -> dict:
  """The `ModelConfig` fields (dtype, param_dtype, proj_dtype, matmul_precision) of a mode."""
  if name not in _RECIPES:
    raise ValueError(f"numerics must be one of {NUMERICS}, got {name!r}")
  return dict(_RECIPES[name])


def is_projection(path: str) -> bool:
  """Whether a parameter path ('layers_3/attn/o_proj/kernel') names a projection weight."""
  return _PROJECTION.search(path) is not None


def path_name(path) -> str:
  """A `tree_map_with_path` key path as 'a/b/c'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def cast_params(params: Any, param_dtype, proj_dtype=None) -> Any:
  """Parameters stored as a config says: projection weights in `proj_dtype` (None: in
  `param_dtype`), every other parameter in `param_dtype`."""
  proj_dtype = param_dtype if proj_dtype is None else proj_dtype
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(x, proj_dtype if is_projection(path_name(p)) else param_dtype),
      params)


def param_bytes(params: Any) -> dict[str, int]:
  """Parameter memory: {'projections', 'other', 'total'} in bytes."""
  out = {"projections": 0, "other": 0}
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    out["projections" if is_projection(path_name(p)) else "other"] += x.nbytes
  out["total"] = out["projections"] + out["other"]
  return out

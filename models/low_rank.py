"""Low-rank weight updates (the adapters of "LoRA: Low-Rank Adaptation of Large Language
Models", Hu et al., 2022) folded into a parameter tree: kernel W [..., in, out] becomes
W + scale * A @ B with A [..., in, r] and B [..., r, out] (leading axes such as stacked
layers or experts are batch axes). Training builds the adapters (`train.lora`); loading a
model stored as a delta on another (`models.moe_delta`) merges them here."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def merge(params: Any, adapters: Any, scale: float) -> Any:
  """`params` with `scale * lora_a @ lora_b` added to each kernel that `adapters` names (a
  tree mirroring `params` with `{"lora_a", "lora_b"}` in place of a module's `kernel`).
  Merged kernels are float32: rounding to a bf16 base would swallow small updates."""
  def walk(p, a):
    if isinstance(a, dict) and "lora_a" in a:
      delta = jnp.matmul(a["lora_a"].astype(jnp.float32), a["lora_b"].astype(jnp.float32))
      return {**p, "kernel": p["kernel"].astype(jnp.float32) + scale * delta}
    out = dict(p)
    for k, sub in a.items():
      out[k] = walk(p[k], sub)
    return out

  return walk(params, adapters)

"""Preallocated key/value cache with a per-row length.

The cache is a plain pytree: stacked per-layer keys and values plus the number of
valid slots in each batch row. Writing appends at `lengths[b]`; rolling back a
row (speculative rejection, Jacobi windows) is lowering its length, since slots
at or beyond `lengths[b]` are masked out of attention and overwritten later.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  k: jax.Array  # [L, B, T, Hkv, hd]
  v: jax.Array  # [L, B, T, Hkv, hd]
  lengths: jax.Array  # [B] int32, valid slots per row

  @classmethod
  def init(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> "KVCache":
    dtype = dtype or config.dtype
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch_size,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  def with_lengths(self, lengths: jax.Array) -> "KVCache":
    """Sets each row's valid length (e.g. to the true prompt length after a padded prefill)."""
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))

  def rollback(self, lengths: jax.Array) -> "KVCache":
    """Discards every slot at or beyond `lengths[b]` (never grows a row)."""
    return self.replace(lengths=jnp.minimum(self.lengths, jnp.asarray(lengths, jnp.int32)))


def write_rows(cache_layer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes `new[b]` ([S, ...]) into `cache_layer[b]` ([T, ...]) at slot `starts[b]`."""
  def one(c, n, s):
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s,) + (jnp.zeros((), s.dtype),) * (c.ndim - 1))
  return jax.vmap(one)(cache_layer, new, starts)

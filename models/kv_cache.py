"""Preallocated key/value cache with a per-row length.

The cache is a plain pytree: stacked per-layer keys and values plus the number of
valid slots in each batch row. Writing appends at `lengths[b]`; rolling back a
row (speculative rejection, Jacobi windows) is lowering its length, since slots
at or beyond `lengths[b]` are masked out of attention and overwritten later.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  """Keys and values per layer, layout [B, Hkv, T, hd] (attention reads it without a transpose).

  With stacked layers (`scan_layers=True`) `k`/`v` are arrays [L, B, Hkv, T, hd]; with
  per-layer parameters they are tuples of L arrays [B, Hkv, T, hd], so each layer's
  cache is its own buffer, updated in place.
  """
  k: Any  # [L, B, Hkv, T, hd] or tuple of L x [B, Hkv, T, hd]
  v: Any
  lengths: jax.Array  # [B] int32, valid slots per row

  @classmethod
  def init(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> "KVCache":
    dtype = dtype or config.dtype
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    if config.scan_layers:
      z = lambda: jnp.zeros((config.num_layers,) + shape, dtype)
    else:
      z = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return cls(k=z(), v=z(), lengths=jnp.zeros((batch_size,), jnp.int32))

  @property
  def _first(self) -> jax.Array:
    return self.k[0]  # layer 0 in both layouts: [B, Hkv, T, hd]

  @property
  def max_len(self) -> int:
    return self._first.shape[2]

  @property
  def batch_size(self) -> int:
    return self._first.shape[0]

  def with_lengths(self, lengths: jax.Array) -> "KVCache":
    """Sets each row's valid length (e.g. to the true prompt length after a padded prefill)."""
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))

  def take_rows(self, rows: jax.Array) -> "KVCache":
    """The cache of batch rows `rows` ([R] int32, repeats allowed): broadcasting a prompt's
    cache to its beams or samples, or reordering beams after a search step (a gather,
    nothing recomputed)."""
    take = lambda x: jnp.take(x, rows, axis=x.ndim - 4)  # leaves are [..., B, Hkv, T, hd]
    return self.replace(k=jax.tree.map(take, self.k), v=jax.tree.map(take, self.v),
                        lengths=self.lengths[rows])

  def compact(self, start: jax.Array, src: jax.Array) -> "KVCache":
    """Moves accepted token-tree entries into place: slot start[b] + 1 + j receives slot
    start[b] + src[b, j] (src: [B, D] offsets of the accepted nodes from the tree root at
    start[b]). Reads all sources before writing, so overlaps are safe. Lengths unchanged:
    follow with `rollback` to the accepted length."""
    B, D = src.shape
    T = self.max_len
    rows = jnp.arange(B)[:, None]  # [B, 1]
    from_slot = jnp.clip(start[:, None] + src, 0, T - 1)  # [B, D]
    to_slot = jnp.clip(start[:, None] + 1 + jnp.arange(D)[None], 0, T - 1)

    Hkv = self._first.shape[1]
    h = jnp.arange(Hkv)[None, :, None]

    def move_layer(x):  # [B, Hkv, T, hd]: one gather and one in-place scatter
      moved = x[rows[:, :, None], h, from_slot[:, None, :]]  # [B, Hkv, D, hd]
      return x.at[rows[:, :, None], h, to_slot[:, None, :]].set(moved)

    def move(x):
      return jax.vmap(move_layer)(x) if x.ndim == 5 else move_layer(x)
    return self.replace(k=jax.tree.map(move, self.k), v=jax.tree.map(move, self.v))

  def rollback(self, lengths: jax.Array) -> "KVCache":
    """Discards every slot at or beyond `lengths[b]` (never grows a row)."""
    return self.replace(lengths=jnp.minimum(self.lengths, jnp.asarray(lengths, jnp.int32)))


def write_rows(cache_layer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes `new[b]` ([Hkv, S, hd]) into `cache_layer[b]` ([Hkv, T, hd]) at slots starts[b]+s.

  One scatter with unique, in-bounds indices (callers validate lengths before
  compiling), which XLA performs in place.
  """
  B, Hkv, S, _ = new.shape
  b = jnp.arange(B)[:, None, None]
  h = jnp.arange(Hkv)[None, :, None]
  t = (starts[:, None] + jnp.arange(S)[None, :])[:, None, :]
  return cache_layer.at[b, h, t].set(new.astype(cache_layer.dtype), mode="promise_in_bounds",
                                     unique_indices=True)

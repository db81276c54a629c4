"""Operations whose result for one batch row does not depend on the rest of the batch.

XLA picks how to vectorize and block a reduction or a matrix product from the shapes of the
whole operation, so a row's floating-point sums are taken in an order that changes with the
batch size, the padded prompt length and the cache length (seen on XLA:CPU while building
this mode: a row of a float32 product, and a row-wise sum of squares, changed bits with the
number of rows). Greedy
decoding then flips at near-ties and a row's output depends on what it was batched with
("Give Me FP32 or Give Me Death? Challenges and Solutions for Reproducible Reasoning",
Yuan et al., 2025; "Defeating Nondeterminism in LLM Inference", He et al., Thinking Machines
Lab, 2025). The batch-invariant mode (`ModelConfig.batch_invariant`) removes every such
dependence:

* sums are pairwise trees of elementwise additions (`tree_sum`): element i of a length-2^n
  axis is always paired with the same partners, whatever the other axes, and trailing zeros
  (masked attention slots, padding) add exactly nothing, so the result is also independent
  of the cache length;
* weight products run the packed kernel on every row (`models.packed_matmul`, each output
  summed in k order per row) or, with XLA weights, as fixed-shape products of `ROW_CHUNK`
  rows at a time (`chunked_matmul`), the same compiled product whatever the batch;
* attention reads each token's keys from their cache slots, one query token at a time
  (`attend_one_token`), so a key always sits at the same index of the same sums.

The model processes one token per call in this mode (`models.transformer.forward` loops over
the new tokens), so a prompt token is computed exactly as a generated one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ROW_CHUNK = 8  # rows per fixed-shape product of `chunked_matmul`


def tree_sum(x: Array, axis: int = -1) -> Array:
  """Sum over `axis` as a pairwise tree of elementwise additions: the axis is zero-padded to
  a power of two and halved (x[:n/2] + x[n/2:]) until one element is left. The pairing of
  an element depends only on its index, and zeros appended at the end add exactly nothing,
  so the result is the same for any batch shape and any amount of trailing padding."""
  axis = axis % x.ndim
  n = x.shape[axis]
  size = 1 << max(0, (n - 1).bit_length())
  if size != n:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - n)
    x = jnp.pad(x, pad)
  while size > 1:
    size //= 2
    x = (jax.lax.slice_in_dim(x, 0, size, axis=axis)
         + jax.lax.slice_in_dim(x, size, 2 * size, axis=axis))
  return jnp.squeeze(x, axis)


def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
  """RMSNorm with the mean of squares taken by `tree_sum`."""
  x32 = x.astype(jnp.float32)
  ms = tree_sum(x32 * x32) / x.shape[-1]
  y = x32 * jax.lax.rsqrt(ms[..., None] + eps)
  return scale.astype(dtype) * y.astype(dtype)


def chunked_matmul(x: Array, w: Array, precision=None) -> Array:
  """x [..., K] @ w [K, N] as a sequence of [ROW_CHUNK, K] @ [K, N] products (rows
  zero-padded to a multiple of ROW_CHUNK): one compiled product whatever the number of rows,
  and a row's result does not depend on its position in the chunk (measured on XLA:CPU)."""
  lead, K = x.shape[:-1], x.shape[-1]
  rows = x.reshape(-1, K)
  M = rows.shape[0]
  pad = -M % ROW_CHUNK
  chunks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(-1, ROW_CHUNK, K)
  out = jax.lax.map(lambda c: jnp.dot(c, w, precision=precision), chunks)
  return out.reshape(-1, w.shape[1])[:M].reshape(*lead, w.shape[1])


def attend_one_token(q: Array, k_cache: Array, v_cache: Array, visible: Array,
                     dtype) -> Array:
  """Attention of one new token per row over its cache slots, batch-invariantly.

  q: [B, Hkv, G, hd] float32 (already scaled); k_cache, v_cache: [B, Hkv, T, hd] holding the
  new token's own key and value at its slot; visible: [B, T] bool, the slots the token sees
  (itself included). Scores, the softmax normalizer and the weighted sum of values are
  `tree_sum`s over a slot axis where slot t holds position t, so neither the batch nor the
  cache length T changes a bit of the result. Returns [B, Hkv, G, hd] in `dtype`.
  """
  k = k_cache.astype(jnp.float32)[:, :, None]  # [B, Hkv, 1, T, hd]
  scores = tree_sum(q[:, :, :, None, :] * k, axis=-1)  # [B, Hkv, G, T]
  vis = visible[:, None, None, :]
  scores = jnp.where(vis, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)  # a maximum is exact in any order
  p = jnp.where(vis, jnp.exp(scores - m), 0.0)
  denom = tree_sum(p, axis=-1)  # [B, Hkv, G]
  v = v_cache.astype(jnp.float32)[:, :, None]  # [B, Hkv, 1, T, hd]
  out = tree_sum(p[..., None] * v, axis=-2)  # [B, Hkv, G, hd]
  return (out / denom[..., None]).astype(dtype)

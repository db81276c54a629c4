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
* attention reads each token's keys from their cache slots, one query token and one row at
  a time, in fixed blocks of slots up to the last one the token sees (`attend_one_token`),
  so a key always sits at the same index of the same sums, computed by the same program.

The model processes one token per call in this mode (`models.transformer.forward` loops over
the new tokens), so a prompt token is computed exactly as a generated one.

Where it is verified: bitwise on XLA:CPU (the tests; one device and 8 x 1 / 2 x 4 meshes).
On an NVIDIA H200 (XLA:GPU, JAX 0.11.2) a row's logits stayed bitwise the same across prompt
padding and cache length, and `attend_one_token` and `chunked_matmul` alone were invariant
to the batch, but a row with 3 or 7 batch mates differed from the same row alone by about
one float32 ulp (`benchmarks/bi_shape_diag.py`, results/h200_batch_invariance_diag.txt).
The op that varies with the batch there was not found in that run. One candidate was found
afterwards on XLA:CPU: a division by a constant (RMSNorm's mean over D, the records' mean
over V) rounded differently for one row and for eight, so both are now products by the
reciprocal; whether that was the GPU's difference too has not been run there. Element-wise
fusions that the GPU compiler may contract into fused multiply-adds differently per shape
remain suspects. Treat the mode as batch-invariant on CPU only until a GPU run shows more.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ROW_CHUNK = 8  # rows per fixed-shape product of `chunked_matmul`
SLOT_BLOCK = 64  # cache slots per fixed-shape block of `attend_one_token`


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
  # times a constant rather than divided by D: XLA:CPU's vectorized division (several rows)
  # and scalar division (one row) can round differently, a product rounds the same
  ms = tree_sum(x32 * x32) * (1.0 / x.shape[-1])
  y = x32 * jax.lax.rsqrt(ms[..., None] + eps)
  return scale.astype(dtype) * y.astype(dtype)


def chunked_matmul(x: Array, w: Array, precision=None) -> Array:
  """x [..., K] @ w [K, N] as a sequence of [ROW_CHUNK, K] @ [K, N] products (rows
  zero-padded to a multiple of ROW_CHUNK): one compiled product whatever the number of rows,
  and a row's result does not depend on its position in the chunk (measured on XLA:CPU, and on
an H200 GPU at both default and HIGHEST precision)."""
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
  (itself included). Returns [B, Hkv, G, hd] in `dtype`.

  Nothing a row computes may depend on the batch or on T, and XLA:CPU compiles an
  elementwise chain such as exp(scores - max) differently for different shapes (measured at
  SmolLM2's sizes: a [1, ...] and an [8, ...] batch, or a 128- and a 512-slot cache, put up
  to 7e-5 between the logits). So every arithmetic operation runs on one fixed shape: rows
  go one at a time (`lax.map`), and a row's slots in blocks of `SLOT_BLOCK`, up to the last
  block it can see, with the softmax carried across blocks online ("Online normalizer
  calculation for softmax", Milakov and Gimelshein, 2018). Within a block the sums are
  `tree_sum`s; blocks are added in slot order. Blocks past the row's last visible slot are
  never read, so the result does not depend on the cache length, and attention costs the
  row's live length rather than the whole cache.
  """
  T = k_cache.shape[2]
  if T % SLOT_BLOCK:  # a short (scratch) cache: pad it so the block shape stays the same
    pad = ((0, 0), (0, 0), (0, -T % SLOT_BLOCK), (0, 0))
    k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    visible = jnp.pad(visible, ((0, 0), (0, -T % SLOT_BLOCK)))
  return jax.lax.map(lambda row: _attend_row(*row).astype(dtype),
                     (q, k_cache, v_cache, visible))


def _attend_row(q: Array, k: Array, v: Array, visible: Array) -> Array:
  """One row of `attend_one_token`: q [Hkv, G, hd], k, v [Hkv, T, hd], visible [T] with T a
  multiple of SLOT_BLOCK; -> [Hkv, G, hd] float32 (zeros for a row that sees nothing)."""
  Hkv, G, hd = q.shape
  last = jnp.max(jnp.where(visible, jnp.arange(visible.shape[0]), -1))
  n_blocks = (last + SLOT_BLOCK) // SLOT_BLOCK  # 0 when nothing is visible

  def block(b, carry):
    m, l, acc = carry  # running max [Hkv, G], normalizer [Hkv, G], weighted values [Hkv, G, hd]
    at = b * SLOT_BLOCK
    kb = jax.lax.dynamic_slice_in_dim(k, at, SLOT_BLOCK, axis=1).astype(jnp.float32)
    vb = jax.lax.dynamic_slice_in_dim(v, at, SLOT_BLOCK, axis=1).astype(jnp.float32)
    vis = jax.lax.dynamic_slice_in_dim(visible, at, SLOT_BLOCK)
    s = jnp.where(vis, tree_sum(q[:, :, None, :] * kb[:, None], axis=-1), -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # a maximum is exact in any order
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a block that sees nothing adds nothing
    alpha = jnp.exp(m - shift)  # exactly 1 when the maximum did not move
    p = jnp.where(vis, jnp.exp(s - shift[..., None]), 0.0)  # [Hkv, G, SLOT_BLOCK]
    l = l * alpha + tree_sum(p, axis=-1)
    acc = acc * alpha[..., None] + tree_sum(p[..., None] * vb[:, None], axis=-2)
    return m_new, l, acc

  init = (jnp.full((Hkv, G), -jnp.inf, jnp.float32), jnp.zeros((Hkv, G), jnp.float32),
          jnp.zeros((Hkv, G, hd), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, n_blocks, block, init)
  return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)

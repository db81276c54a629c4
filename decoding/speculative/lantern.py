"""LANTERN's latent-neighbour tables ("LANTERN: Accelerating Visual Autoregressive Models with
Relaxed Speculative Decoding", Jang et al., ICLR 2025).

Visual AR models spread probability over many image tokens whose codes look alike, so strict
speculative decoding rejects drafts that are "almost right". LANTERN lets a draft x borrow up to
delta of probability from its nearest codes in the VQ latent space. This module builds the
neighbour table (offline, from the codebook); the acceptance rule itself lives in the shared
verifier (`decoding.speculative.verify.latent_relaxation` and `verify_chain` with the
`decoding.speculative.acceptance.Lantern(neighbors, delta)` rule), for any chain drafter (a
draft model, an EAGLE-style head, or speculative Jacobi decoding). It is LOSSY.

What is bounded is the borrowed mass: at every verified position the draft borrows c <= delta.
With a point-mass draft (q one-hot: Jacobi's initial drafts, greedy drafts) the emitted token's
law is the target's with that mass moved from the lent neighbours onto the draft, so its total
variation from the target is exactly c <= delta. With a sampled draft the rejection residual
(the reference code's heuristic, `verify_chain`) does not keep that property, and the distance
can exceed delta: 0.17 at delta = 0.1 on one position of the test case in
tests/decoding/speculative/test_lantern.py. Over a sequence, the per-position distortions
compound.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def neighbor_table(codebook, k: int, vocab_size: int | None = None) -> Array:
  """[V, k] int32: for each code, the k other codes nearest in L2 distance between codebook
  vectors, nearest first (ties to the lower index); the code itself is never listed. Rows of
  non-code tokens (ids >= K, e.g. class tokens, when vocab_size > K) are all -1 (no
  relaxation for them)."""
  cb = np.asarray(codebook, np.float64)
  K = cb.shape[0]
  if not 1 <= k < K:
    raise ValueError(f"k must be in [1, {K - 1}] (codebook of {K}), got {k}")
  d = (cb ** 2).sum(1)[:, None] - 2.0 * cb @ cb.T + (cb ** 2).sum(1)[None]
  np.fill_diagonal(d, np.inf)  # self excluded
  order = np.lexsort((np.broadcast_to(np.arange(K), (K, K)), d), axis=1)[:, :k]
  V = vocab_size or K
  table = np.full((V, k), -1, np.int32)
  table[:K] = order
  return jnp.asarray(table)

"""Where the batch-invariant mode stops being bitwise on a backend: a two-layer model with
SmolLM2's attention shapes (9 query heads over 3 key heads, 64 wide, random weights) prefills
one prompt alone in a 128-slot cache and then with 3 or 7 batch mates, other prompt paddings
and longer caches, at HIGHEST and at the default matmul precision; then the mode's two parts
alone (one-token attention, chunked matmul) at those shapes. Prints one line per comparison:
bitwise equal or not, and the largest difference.

  python -m benchmarks.bi_shape_diag > results/<machine>_batch_invariance_diag.txt
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import batch_invariant as bi
from models import transformer
from models.config import tiny_config
from models.lm import TransformerLM


def prefill_last_logits(lm, params, rows, P, T):
  """Last-position logits [B, V] of prompts padded to P in a cache of T slots."""
  toks = np.zeros((len(rows), P), np.int32)
  for b, r in enumerate(rows):
    toks[b, :len(r)] = r
  pos = jnp.broadcast_to(jnp.arange(P)[None], (len(rows), P))
  at = jnp.asarray([[len(r) - 1] for r in rows])
  out = lm(params, jnp.asarray(toks), pos, lm.init_cache(len(rows), T), logits_at=at)
  return np.asarray(out.logits[:, 0])


def main() -> None:
  print(jax.devices()[0].device_kind, jax.default_backend(), jax.__version__)
  t0 = time.time()
  RNG = np.random.default_rng(0)
  rows = [list(RNG.integers(0, 96, n)) for n in (5, 11, 3, 16, 7, 9, 2, 13, 8, 4)]
  for prec in ("highest", "default"):
    cfg = tiny_config(vocab_size=96, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                      intermediate_size=64, num_layers=2, max_position_embeddings=1024,
                      matmul_precision=prec)
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    lm = TransformerLM(cfg.replace(batch_invariant=True))
    alone = prefill_last_logits(lm, params, rows[:1], 16, 128)[0]
    for mates, P, T in ((rows[1:8], 16, 128), ([], 16, 512), (rows[1:4], 32, 256), ([], 32, 128), (rows[1:8], 16, 512)):
      got = prefill_last_logits(lm, params, rows[:1] + mates, P, T)[0]
      print(prec, "mates", len(mates), "P", P, "T", T, "bitwise", np.array_equal(got, alone),
            "maxdiff", float(np.abs(got - alone).max()), f"{time.time()-t0:.0f}s", flush=True)
  # the parts: attention alone at SmolLM2 shapes, batch 8 vs 1, cache 128 vs 512
  q = jnp.asarray(RNG.standard_normal((8, 3, 3, 64)).astype(np.float32) * 0.3)
  k = jnp.asarray(RNG.standard_normal((8, 3, 128, 64)).astype(np.float32))
  v = jnp.asarray(RNG.standard_normal((8, 3, 128, 64)).astype(np.float32))
  vis = jnp.asarray(np.arange(128)[None] < RNG.integers(1, 78, 8)[:, None])
  out = np.asarray(bi.attend_one_token(q, k, v, vis, jnp.float32))
  pad = ((0, 0), (0, 0), (0, 384), (0, 0))
  for r in (0, 5):
    a = np.asarray(bi.attend_one_token(q[r:r+1], k[r:r+1], v[r:r+1], vis[r:r+1], jnp.float32))[0]
    l = np.asarray(bi.attend_one_token(q[r:r+1], jnp.pad(k[r:r+1], pad), jnp.pad(v[r:r+1], pad), jnp.pad(vis[r:r+1], ((0, 0), (0, 384))), jnp.float32))[0]
    print("attention row", r, "alone==batch", np.array_equal(a, out[r]), "longer==batch", np.array_equal(l, out[r]), float(np.abs(a-out[r]).max()))
  w = jnp.asarray(RNG.standard_normal((576, 64)).astype(np.float32))
  x = RNG.standard_normal((40, 576)).astype(np.float32)
  for prec in (jax.lax.Precision.HIGHEST, None):
    y = np.asarray(bi.chunked_matmul(jnp.asarray(x), w, prec))
    for M, at in ((1, 0), (3, 2), (17, 11)):
      rr = RNG.standard_normal((M, 576)).astype(np.float32); rr[at] = x[5]
      print("chunked_matmul", prec, M, np.array_equal(np.asarray(bi.chunked_matmul(jnp.asarray(rr), w, prec))[at], y[5]))
  print("total", time.time() - t0)


if __name__ == "__main__":
  main()

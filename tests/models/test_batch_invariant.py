"""Batch-invariant mode (models/batch_invariant.py): a row's logits and greedy tokens are
bitwise the same alone, in any batch, with any padding, cache length and mesh; and the mode
computes the same model as the default one up to float32 rounding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.bi_shape_diag import prefill_last_logits
from decoding.greedy import Greedy
from decoding.runner import generate
from models import batch_invariant as bi
from models import packed_matmul, transformer
from models.config import tiny_config
from models.lm import TransformerLM
from tests import REPO
from tests.helpers import target

RNG = np.random.default_rng(0)


def _tiny(kernel: str = "xla", **kw):
  """A small model whose widths are multiples of 16 (so the packed kernel applies)."""
  cfg = tiny_config(vocab_size=96, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=48, num_layers=2, scan_layers=False, **kw)
  params = transformer.unstack_layers(
      transformer.init_params(cfg.replace(scan_layers=True), jax.random.PRNGKey(0)), 2)
  params = transformer.fuse_projections(params)
  cfg = cfg.replace(fused_projections=True)
  if kernel == "packed":
    params = transformer.pack_params(params)
    cfg = cfg.replace(matmul_kernel="packed")
  return cfg, params


def test_tree_sum_is_a_sum_and_ignores_batch_shape_and_trailing_zeros():
  x = RNG.standard_normal((13, 300)).astype(np.float32) * 100
  s = np.asarray(bi.tree_sum(jnp.asarray(x)))
  np.testing.assert_allclose(s, x.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-3)
  alone = np.asarray(bi.tree_sum(jnp.asarray(x[3:4])))[0]
  padded = np.asarray(bi.tree_sum(jnp.asarray(np.pad(x, ((0, 0), (0, 700))))))[3]
  assert alone == s[3] == padded
  # over a leading axis too
  np.testing.assert_array_equal(np.asarray(bi.tree_sum(jnp.asarray(x.T), axis=0)), s)


@pytest.mark.parametrize("jit", [False, True])
def test_rms_norm_rows_do_not_depend_on_the_number_of_rows(jit):
  """Eagerly, XLA:CPU once divided the sum of squares of 8 rows by D differently from one
  row's (1 ulp); the mean is now a product by 1/D."""
  f = lambda x, s: bi.rms_norm(x, s, 1e-5, jnp.float32)
  f = jax.jit(f) if jit else f
  scale = jnp.asarray(RNG.normal(size=576).astype(np.float32))
  for seed in range(8):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(8, 576)) * 3, jnp.float32)
    many = np.asarray(f(x, scale))
    for r in range(8):
      np.testing.assert_array_equal(many[r], np.asarray(f(x[r:r + 1], scale))[0])
  want = np.asarray(x) / np.sqrt((np.asarray(x, np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(many, want * np.asarray(scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", [jax.lax.Precision.HIGHEST, None])
def test_chunked_matmul_is_the_product_and_a_row_does_not_depend_on_its_batch(precision):
  """At HIGHEST the product is float32's; at the default precision (TF32 on recent GPUs) it
  is only checked for batch invariance."""
  w = jnp.asarray(RNG.standard_normal((96, 80)).astype(np.float32))
  x = RNG.standard_normal((40, 96)).astype(np.float32) * 5
  y = np.asarray(bi.chunked_matmul(jnp.asarray(x), w, precision))
  if precision is not None:
    np.testing.assert_allclose(y, x @ np.asarray(w), rtol=1e-4, atol=1e-4)
  for M, at in ((1, 0), (3, 2), (17, 11)):
    rows = RNG.standard_normal((M, 96)).astype(np.float32)
    rows[at] = x[5]
    assert np.array_equal(np.asarray(bi.chunked_matmul(jnp.asarray(rows), w, precision))[at],
                          y[5])


def test_one_token_attention_is_softmax_attention_and_a_row_ignores_batch_and_cache_length():
  """SmolLM2's attention shapes (3 key heads, 3 queries each, 64-wide heads): the result is
  softmax attention over the visible slots, and a row's bits are the same alone, among 8
  rows and in a cache four times longer (the shapes at which XLA:CPU's fused exp once
  rounded per batch). A row that sees nothing gets zeros."""
  Hkv, G, hd, T, live = 3, 3, 64, 128, 77
  q = jnp.asarray(RNG.standard_normal((8, Hkv, G, hd)).astype(np.float32) * 0.3)
  k = jnp.asarray(RNG.standard_normal((8, Hkv, T, hd)).astype(np.float32))
  v = jnp.asarray(RNG.standard_normal((8, Hkv, T, hd)).astype(np.float32))
  visible = jnp.asarray(np.arange(T)[None] < RNG.integers(1, live + 1, 8)[:, None])
  visible = visible.at[2].set(False)
  out = np.asarray(bi.attend_one_token(q, k, v, visible, jnp.float32))
  s = np.einsum("bkgd,bktd->bkgt", np.asarray(q, np.float64), np.asarray(k, np.float64))
  s = np.where(np.asarray(visible)[:, None, None], s, -np.inf)
  with np.errstate(invalid="ignore"):  # row 2 sees nothing: its reference is NaN, unused
    p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bkgt,bktd->bkgd", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64))
  ok = np.arange(8) != 2
  np.testing.assert_allclose(out[ok], want[ok], rtol=1e-5, atol=1e-5)
  assert not out[2].any()
  pad = ((0, 0), (0, 0), (0, 3 * T), (0, 0))
  for r in (0, 5):
    alone = bi.attend_one_token(q[r:r + 1], k[r:r + 1], v[r:r + 1], visible[r:r + 1],
                                jnp.float32)
    longer = bi.attend_one_token(q[r:r + 1], jnp.pad(k[r:r + 1], pad), jnp.pad(v[r:r + 1], pad),
                                 jnp.pad(visible[r:r + 1], ((0, 0), (0, 3 * T))), jnp.float32)
    assert np.array_equal(np.asarray(alone)[0], out[r])
    assert np.array_equal(np.asarray(longer)[0], out[r])


@pytest.mark.parametrize("kernel", ["xla", "packed"])
def test_batch_invariant_mode_computes_the_same_model(kernel):
  if kernel == "packed" and packed_matmul.unavailable_reason():
    pytest.skip(packed_matmul.unavailable_reason())
  # HIGHEST: on a GPU the default-precision float32 dot runs in TF32, a different model
  cfg, params = _tiny(kernel, matmul_precision="highest")
  ref, lm = TransformerLM(cfg), TransformerLM(cfg.replace(batch_invariant=True))
  toks = jnp.asarray(RNG.integers(0, 96, (3, 9)))
  pos = jnp.broadcast_to(jnp.arange(9)[None], (3, 9))
  tree = jnp.asarray(np.tril(RNG.random((9, 9)) > 0.4) | np.eye(9, dtype=bool))
  for mask in (None, tree[None]):
    a = ref(params, toks, pos, ref.init_cache(3, 16), attn_mask=mask)
    b = lm(params, toks, pos, lm.init_cache(3, 16), attn_mask=mask)
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(b.cache.lengths), np.asarray(a.cache.lengths))
  # a following step on each cache, and a cache-free (scoring) pass
  step = jnp.asarray([[1], [2], [3]])
  a2 = ref(params, step, jnp.full((3, 1), 9), a.cache)
  b2 = lm(params, step, jnp.full((3, 1), 9), b.cache)
  np.testing.assert_allclose(np.asarray(b2.logits), np.asarray(a2.logits), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lm(params, toks, pos, None).logits),
                             np.asarray(ref(params, toks, pos, None).logits), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("kernel", ["xla", "packed"])
def test_a_rows_logits_are_bitwise_the_same_alone_batched_padded_and_in_a_longer_cache(kernel):
  if kernel == "packed" and packed_matmul.unavailable_reason():
    pytest.skip(packed_matmul.unavailable_reason())
  cfg, params = _tiny(kernel)
  lm = TransformerLM(cfg.replace(batch_invariant=True))
  rows = [list(RNG.integers(0, 96, n)) for n in (5, 11, 3, 16, 7, 9, 2, 13, 8, 4)]
  alone = prefill_last_logits(lm, params, rows[:1], 8, 16)[0]
  for mates, P, T in ((rows[1:4], 16, 32), (rows[1:], 16, 64), ([], 32, 128)):
    got = prefill_last_logits(lm, params, rows[:1] + mates, P, T)[0]
    assert np.array_equal(got, alone), (len(mates), P, T)


def test_a_rows_logits_are_bitwise_the_same_at_smollm2_attention_shapes():
  """Two layers with SmolLM2's attention (9 query heads over 3 key heads, 64 wide): a row
  alone in a 128-slot cache, among 8 rows, and alone in 256- and 512-slot caches gives the
  same logits bit for bit (before attention ran on fixed slot blocks one row at a time, the
  fused exp of XLA:CPU rounded differently for each of these)."""
  cfg = tiny_config(vocab_size=96, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                    intermediate_size=64, num_layers=2, max_position_embeddings=1024)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  lm = TransformerLM(cfg.replace(batch_invariant=True))
  rows = [list(RNG.integers(0, 96, n)) for n in (5, 11, 3, 16, 7, 9, 2, 13, 8, 4)]
  alone = prefill_last_logits(lm, params, rows[:1], 16, 128)[0]
  for mates, P, T in ((rows[1:8], 16, 128), ([], 16, 512), (rows[1:4], 32, 256)):
    got = prefill_last_logits(lm, params, rows[:1] + mates, P, T)[0]
    assert np.array_equal(got, alone), (len(mates), P, T)


def test_greedy_tokens_do_not_depend_on_batch_size_or_mates():
  cfg, params = _tiny("xla")
  t = target(TransformerLM(cfg.replace(batch_invariant=True)), params, eos_ids=(1,), pad_id=0)
  prompts = [list(RNG.integers(2, 96, n)) for n in RNG.integers(1, 20, 32)]
  s = Greedy(max_new_tokens=12)
  runs = {bs: [g.output_ids for g in generate(t, prompts, s, batch_size=bs)]
          for bs in (1, 4, 16)}
  assert runs[4] == runs[1] and runs[16] == runs[1]
  # a prompt alone (its own, shorter padding and cache) against its row in the full run
  assert [g.output_ids for g in generate(t, prompts[7:8], s)][0] == runs[1][7]


MESH_SCRIPT = textwrap.dedent("""
    import dataclasses, json
    import jax, numpy as np
    from decoding.greedy import Greedy
    from decoding.runner import generate
    from decoding.strategy import Target
    from models import sharding, transformer
    from models.config import tiny_config
    from models.lm import TransformerLM
    assert len(jax.devices()) == 8
    cfg = tiny_config(vocab_size=96, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=48, num_layers=2, scan_layers=False,
                      fused_projections=True, batch_invariant=True)
    params = transformer.fuse_projections(transformer.unstack_layers(transformer.init_params(
        cfg.replace(scan_layers=True, fused_projections=False), jax.random.PRNGKey(0)), 2))
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(2, 96, n))) for n in rng.integers(1, 20, 16)]
    s = Greedy(max_new_tokens=10)
    out = {}
    for data, model in ((1, 1), (2, 4), (8, 1), (1, 8)):
      mesh = sharding.make_mesh(data, model)
      p = sharding.shard_params(params, mesh, column_only=True)
      lm = TransformerLM(cfg, mesh=mesh)
      g = generate(Target(lm, p, (1,), 0), prompts, s, batch_size=8,
                   shard=lambda a: sharding.shard_batch(a, mesh))
      out[f"{data}x{model}"] = [[x.output_ids, x.token_logprobs] for x in g]
    print(json.dumps(out))
""")

# SmolLM2, batch-invariant, in one recipe (formatted in), on three meshes: one batch of 16
# prompts of mixed lengths, 8 tokens. Short prompts (under 30 tokens) because the mode reads a
# prompt one token per layer pass and the 2 x 4 mesh runs slowly on simulated devices.
SMOLLM_MESH_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from decoding.greedy import Greedy
    from decoding.runner import generate
    from decoding.strategy import Target
    from models import sharding
    from models.lm import load_model
    from tests.models.test_batch_invariant import _smollm_prompts
    assert len(jax.devices()) == 8
    m = load_model("smollm2-135m-instruct", numerics="{numerics}", batch_invariant=True)
    prompts = _smollm_prompts(m.tokenizer, 16, max_len=30)
    out = {{}}
    for data, model in ((1, 1), (8, 1), (2, 4)):
      mesh = sharding.make_mesh(data, model)
      p = sharding.shard_params(m.params, mesh, column_only=True)
      lm = m.lm.__class__(m.lm.config, mesh=mesh)
      g = generate(Target(lm, p, (m.tokenizer.eos_id,), m.tokenizer.pad_id), prompts,
                   Greedy(max_new_tokens=8), batch_size=16,
                   shard=lambda a: sharding.shard_batch(a, mesh))
      out[f"{{data}}x{{model}}"] = [[x.output_ids, x.token_logprobs] for x in g]
    print(json.dumps(out))
""")


def _tokens_per_mesh(script: str) -> dict:
  """Runs `script` on 8 simulated CPU devices; its last line: {mesh: tokens per prompt}."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same_on_meshes(out: dict, bitwise_on_data_meshes: bool = True) -> None:
  """The same tokens on every mesh; with `bitwise_on_data_meshes`, on data-only meshes
  (`models.sharding.rows_per_device`) the same log-probabilities, bit for bit (JSON keeps a
  float's shortest exact repr), else equal to 1e-4."""
  ref = out["1x1"]
  for mesh, rows in out.items():
    assert [tokens for tokens, _ in rows] == [tokens for tokens, _ in ref], mesh
    if mesh.endswith("x1") and bitwise_on_data_meshes:
      assert rows == ref, mesh
    for (_, lp), (_, lp_ref) in zip(rows, ref):
      np.testing.assert_allclose(lp, lp_ref, atol=1e-4, err_msg=mesh)


@pytest.mark.slow
def test_greedy_tokens_are_the_same_on_every_mesh():
  _assert_same_on_meshes(_tokens_per_mesh(MESH_SCRIPT))


@pytest.mark.slow
@pytest.mark.usefixtures("smollm_gguf")
@pytest.mark.parametrize("numerics", ["fp32", "layercast"])
def test_smollm2_greedy_is_the_same_on_one_device_8x1_and_2x4(numerics):
  """16 prompts of mixed lengths in one batch: the same tokens on 1 x 1, 8 x 1 and 2 x 4, and
  on 8 x 1 (each device holding two rows of the batch) the single device's log-probabilities
  bit for bit."""
  _assert_same_on_meshes(_tokens_per_mesh(SMOLLM_MESH_SCRIPT.format(numerics=numerics)))


@pytest.mark.parametrize("jit", [False, True])
def test_invariant_records_do_not_depend_on_the_number_of_rows(jit):
  """The decoding records' log-softmax and entropy in the batch-invariant mode: every row's
  values are the same bits alone and among 8 rows (V = 576, where XLA:CPU's own reduction,
  and its division of 8 rows by V, are seen to change with the rows), over several draws,
  eagerly and compiled; and they equal jax.nn.log_softmax to rounding."""
  from decoding import records

  def stats(z):
    logp = records.log_softmax(z, invariant=True)
    return (logp,) + tuple(records.distribution_stats(logp, invariant=True))
  f = jax.jit(stats) if jit else stats
  for seed in range(6):
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=(8, 576)) * 3, jnp.float32)
    many = [np.asarray(a) for a in f(logits)]
    for r in range(8):
      one = [np.asarray(a)[0] for a in f(logits[r:r + 1])]
      for m, o in zip(many, one):
        np.testing.assert_array_equal(m[r], o, err_msg=f"seed {seed} row {r}")
    np.testing.assert_allclose(many[0], np.asarray(jax.nn.log_softmax(logits)), atol=1e-5)
    ent_ref, mean_ref = records.distribution_stats(jnp.asarray(many[0]))
    np.testing.assert_allclose(many[1], np.asarray(ent_ref), rtol=1e-5)
    np.testing.assert_allclose(many[2], np.asarray(mean_ref), rtol=1e-5)


def test_split_k_is_refused_in_batch_invariant_mode():
  with pytest.raises(ValueError, match="split_k"):
    tiny_config(batch_invariant=True, split_k=2)


def _smollm_prompts(tok, n: int = 32, max_len: int = 60) -> list[list[int]]:
  """n prompts of mixed lengths (3 to about `max_len` tokens): arithmetic problems cut short."""
  from models.datasets import arithmetic
  probs = arithmetic.problems(n, seed=5)
  cuts = np.random.default_rng(2).integers(3, max_len, n)
  return [tok.encode(p.prompt)[:int(c)] for p, c in zip(probs, cuts)]


@pytest.mark.slow
@pytest.mark.parametrize("numerics", ["fp32", "layercast"])
def test_smollm2_greedy_is_bitwise_the_same_at_batch_1_4_16(smollm_gguf, numerics):
  """32 prompts of mixed lengths: identical tokens and log-probabilities, bit for bit, at
  batch sizes 4 and 16, and every fourth prompt decoded alone (batch 1) equals its row in the
  batch of 16 (the packed kernel where it runs, else XLA)."""
  from models.lm import load_model
  kernel = "xla" if packed_matmul.unavailable_reason() else "packed"
  m = load_model("smollm2-135m-instruct", numerics=numerics, batch_invariant=True,
                 matmul_kernel=kernel)
  prompts = _smollm_prompts(m.tokenizer)
  t = target(m.lm, m.params, eos_ids=(m.tokenizer.eos_id,), pad_id=m.tokenizer.pad_id)
  s = Greedy(max_new_tokens=16)
  def run(rows, bs):
    return [(g.output_ids, list(map(float, g.token_logprobs)))
            for g in generate(t, rows, s, batch_size=bs)]
  batched = run(prompts, 16)
  assert run(prompts, 4) == batched
  # Batch 1 on a quarter of the prompts (lengths across the range): each alone is its own
  # batch, so the whole list would cost 32 decodes for no further shape.
  alone = prompts[1::4]
  assert sorted(map(len, alone)) != [len(alone[0])] * len(alone)
  assert run(alone, 1) == batched[1::4]

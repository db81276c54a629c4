"""The packed-panel CPU matmul kernel (`models.packed_matmul`) and the `matmul_kernel="packed"`
model layout: the kernel against `jnp.dot`, rows independent of the batch, and a packed model
computing the same logits, greedy tokens and speculative outputs as the XLA layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.speculative import dyspec, loop, model_drafter
from decoding.speculative.eagle import EagleDrafter
from decoding import token_loop
from models import eagle_head, packed_matmul as pm, sharding, transformer
from models.config import tiny_config
from models.lm import TransformerLM, load_model, save_lm
from tests.helpers import processor_of, row_keys

pytestmark = pytest.mark.skipif(pm.unavailable_reason() is not None,
                                reason=str(pm.unavailable_reason()))


def _rand(shape, seed, scale=1.0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape) * scale, jnp.float32)


@pytest.mark.parametrize("K,N", [(37, 48), (64, 16), (200, 96)])
@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, 11, 16, 33, 64, 65, 150])
def test_kernel_equals_the_float64_product_to_float32_round_off(M, K, N):
  x, w = _rand((M, K), 0), _rand((K, N), 1)
  y = np.asarray(pm.packed_matmul(x, pm.pack(w)))
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  xla_err = np.abs(np.asarray(jnp.dot(x, w)) - ref).max()
  assert y.shape == (M, N) and y.dtype == np.float32
  # in-order fp32 sums: the same error scale as XLA's own dot
  assert np.abs(y - ref).max() <= max(4 * xla_err, 1e-5 * np.abs(ref).max())


def test_a_rows_result_does_not_depend_on_the_other_rows():
  """Bitwise: row i of a 16-row call equals the same row alone, or among other rows (calls
  within the kernel's row limit)."""
  K, N = 300, 64
  w = pm.pack(_rand((K, N), 2, 0.05))
  x = _rand((16, K), 3, 30.0)  # large activations, where summation order shows
  full = np.asarray(pm.packed_matmul(x, w))
  for i in (0, 5, 6, 11, 15):
    np.testing.assert_array_equal(np.asarray(pm.packed_matmul(x[i:i + 1], w))[0], full[i])
  mixed = jnp.concatenate([x[7:9], _rand((9, K), 4), x[:1]])
  out = np.asarray(pm.packed_matmul(mixed, w))
  np.testing.assert_array_equal(out[:2], full[7:9])
  np.testing.assert_array_equal(out[-1], full[0])


def test_bfloat16_weights_are_widened_exactly():
  x, w = _rand((5, 80), 5), _rand((80, 32), 6).astype(jnp.bfloat16)
  y = np.asarray(pm.packed_matmul(x, pm.pack(w)))
  ref = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_leading_axes_jit_and_vmap_over_activations():
  w = _rand((24, 32), 7)
  wp = pm.pack(w)
  x = _rand((3, 4, 24), 8)
  ref = np.asarray(jnp.dot(x, w))
  np.testing.assert_allclose(np.asarray(jax.jit(pm.packed_matmul)(x, wp)), ref, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.vmap(pm.packed_matmul, (0, None))(x, wp)), ref,
                             rtol=1e-5, atol=1e-5)


def test_pack_and_unpack_are_inverse_and_refuse_ragged_widths():
  w = _rand((2, 9, 48), 9)  # a leading (stacked layers) axis is kept
  wp = pm.pack(w)
  assert wp.shape == (2, 3, 9, 16)
  np.testing.assert_array_equal(np.asarray(pm.unpack(wp)), np.asarray(w))
  np.testing.assert_array_equal(np.asarray(wp[1, 2, :, 5]), np.asarray(w[1, :, 2 * 16 + 5]))
  with pytest.raises(ValueError, match="multiple of 16"):
    pm.pack(_rand((4, 20), 0))


def test_differentiation_is_refused_with_a_clear_error():
  wp = pm.pack(_rand((8, 16), 0))
  with pytest.raises(NotImplementedError, match="inference only"):
    jax.grad(lambda x: pm.packed_matmul(x, wp).sum())(_rand((2, 8), 1))


def test_mismatched_shapes_are_refused_before_running():
  with pytest.raises(ValueError, match="do not match"):
    pm.packed_matmul(_rand((2, 9), 0), pm.pack(_rand((8, 16), 1)))


# ------------------------------------------------------------------ the packed model layout

def _cfg(**kw):
  # hidden 16, q 16 and MLP 32 columns are packed; k/v (8 columns) stay [K, N]
  base = dict(vocab_size=32, intermediate_size=32, num_layers=3)
  base.update(kw)
  return tiny_config(**base)


def _models(scan: bool, fused: bool, qkv_bias=False, tie=True):
  cfg = _cfg(qkv_bias=qkv_bias, tie_word_embeddings=tie)
  params = jax.tree.map(lambda x: 3 * x, transformer.init_params(cfg, jax.random.PRNGKey(0)))
  if not scan:
    params = transformer.unstack_layers(params, cfg.num_layers)
  if fused:
    params = transformer.fuse_projections(params)
  cfg = cfg.replace(scan_layers=scan, fused_projections=fused)
  packed_cfg = cfg.replace(matmul_kernel="packed")
  return (TransformerLM(cfg), params), (TransformerLM(packed_cfg), transformer.pack_params(params))


@pytest.mark.parametrize("scan,fused,qkv_bias,tie", [(False, True, False, True),
                                                     (True, False, True, False),
                                                     (False, False, True, True)])
def test_a_packed_model_computes_the_same_logits_and_cache(scan, fused, qkv_bias, tie):
  (lm, params), (plm, pparams) = _models(scan, fused, qkv_bias, tie)
  tokens = jnp.asarray([[3, 1, 4, 1, 5], [9, 2, 6, 5, 30]])
  pos = jnp.broadcast_to(jnp.arange(5)[None], (2, 5))
  a = lm(params, tokens, pos, lm.init_cache(2, 8))
  b = plm(pparams, tokens, pos, plm.init_cache(2, 8))
  np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(b.cache.v)[0]),
                             np.asarray(jax.tree.leaves(a.cache.v)[0]), rtol=1e-5, atol=1e-5)
  leaves = jax.tree_util.tree_leaves_with_path(pparams)
  shapes = {jax.tree_util.keystr(p): x.shape for p, x in leaves}
  assert shapes["['embed']['table']"] == (2, 16, 16)  # [V/16, D, 16]
  np.testing.assert_array_equal(  # and back, bit for bit
      np.asarray(jax.tree.leaves(transformer.unpack_params(pparams, plm.config))[0]),
      np.asarray(jax.tree.leaves(params)[0]))


def test_packed_init_gives_packed_shapes():
  cfg = _cfg(scan_layers=False, fused_projections=True, matmul_kernel="packed")
  params = transformer.init_params(cfg, jax.random.PRNGKey(1))
  assert params["embed"]["table"].shape == (2, 16, 16)
  assert params["layers_0"]["mlp"]["gate_up_proj"]["kernel"].shape == (4, 16, 16)
  assert params["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (1, 32, 16)


def _ragged(B, P, V, seed):
  rng = np.random.RandomState(seed)
  return (jnp.asarray(rng.randint(0, V, (B, P)), jnp.int32),
          jnp.asarray(rng.randint(1, P + 1, (B,)), jnp.int32))


def test_packed_greedy_and_speculative_decoding_give_the_xla_layouts_tokens():
  """Greedy tokens equal across layouts, and every drafter on the packed target (self-draft
  chain, DySpec tree, EAGLE tree reading the packed LM head) reproduces the packed greedy."""
  (lm, params), (plm, pparams) = _models(scan=False, fused=True)
  prompts, lens = _ragged(4, 8, 32, seed=3)
  eos = jnp.asarray([-1], jnp.int32)
  proc = processor_of({}, [])
  common = dict(processor=proc, pad_id=0, max_new_tokens=16, cache_len=64)
  greedy = lambda m, p: token_loop.decode(m, p, prompts, lens, row_keys(4), eos,
                                          select=token_loop.greedy_select, **common)
  ref, packed = greedy(lm, params), greedy(plm, pparams)
  np.testing.assert_array_equal(packed.tokens, ref.tokens)
  head = eagle_head.EagleHead(eagle_head.HeadConfig(plm.config))
  hparams = eagle_head.init_head_params(head, jax.random.PRNGKey(1))
  for drafter, dparams in [(model_drafter.ModelDrafter(plm, 3, self_layers=1), None),
                           (dyspec.DySpecDrafter(plm, tree_budget=6, max_depth=4, max_children=2,
                                                 self_layers=2), None),
                           (EagleDrafter(head, tree=True, tree_budget=8, max_depth=4,
                                         max_children=2), {"head": hparams})]:
    res = loop.speculative_decode(plm, pparams, drafter, dparams, prompts, lens, row_keys(4),
                                  eos, sample=False, **common)
    np.testing.assert_array_equal(res.tokens, packed.tokens, err_msg=type(drafter).__name__)


def test_a_packed_model_saves_as_plain_matrices_and_loads_in_either_kernel(tmp_path):
  (lm, params), (plm, pparams) = _models(scan=False, fused=True)
  save_lm(str(tmp_path / "m"), plm.config, pparams)
  plain = load_model(str(tmp_path / "m"), matmul_kernel="xla")
  packed = load_model(str(tmp_path / "m"), matmul_kernel="packed")
  assert plain.params["embed"]["table"].shape == (16, 32)
  assert packed.config.matmul_kernel == "packed"
  np.testing.assert_array_equal(np.asarray(packed.params["embed"]["table"]),
                                np.asarray(pparams["embed"]["table"]))


def test_packed_settings_that_cannot_work_are_refused():
  with pytest.raises(ValueError, match="float32"):
    _cfg(matmul_kernel="packed", dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="split_k"):
    _cfg(matmul_kernel="packed", split_k=2)
  with pytest.raises(ValueError, match="matmul_kernel must be one of"):
    _cfg(matmul_kernel="pakced")
  _, (plm, pparams) = _models(scan=False, fused=True)
  with pytest.raises(ValueError, match="one CPU device"):
    sharding.shard_params(pparams, sharding.make_mesh(1, 1))


def test_smollm2_packed_gives_the_same_greedy_tokens_and_logits(smollm, prompt_ids):
  """The real model in the packed layout: the greedy continuation of a ragged batch of raw and
  chat prompts equals the XLA layout's, with the same log-probabilities (within 2e-3)."""
  import ml_collections
  from tests.helpers import run_config
  plm = TransformerLM(smollm.config.replace(matmul_kernel="packed"))
  pparams = transformer.pack_params(smollm.params)
  prompts = [prompt_ids[0], prompt_ids[1], prompt_ids[6]]
  eos, pad = [smollm.tokenizer.eos_id], smollm.tokenizer.pad_id
  c = ml_collections.ConfigDict(dict(strategy="greedy", max_new_tokens=24, batch_size=4))
  ref = run_config(smollm.lm, smollm.params, prompts, c, eos, pad)
  out = run_config(plm, pparams, prompts, c, eos, pad)
  assert [o.output_ids for o in out] == [r.output_ids for r in ref]
  for o, r in zip(out, ref):
    np.testing.assert_allclose(o.token_logprobs, r.token_logprobs, atol=2e-3)

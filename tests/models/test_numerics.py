"""Precision recipes (models/numerics.py): LayerCast is float32 with the projection weights
rounded to bfloat16, and each recipe stores its parameters in the bytes it says."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import numerics, transformer
from models.config import tiny_config
from models.lm import TransformerLM, load_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _round_projections(params):
  """float32 parameters with only the projection weights rounded to bfloat16 (and kept float32):
  the reference LayerCast must equal."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (x.astype(jnp.bfloat16).astype(jnp.float32)
                    if numerics.is_projection(numerics.path_name(p)) else x), params)


def test_projection_paths_are_the_attention_and_mlp_weights_only():
  for layer in ("layers", "layers_7"):
    for block, names in (("attn", ("q", "k", "v", "o", "qkv")),
                         ("mlp", ("gate", "up", "down", "gate_up"))):
      for n in names:
        for kind in ("kernel", "bias"):
          assert numerics.is_projection(f"{layer}/{block}/{n}_proj/{kind}")
  for other in ("embed/table", "lm_head/kernel", "final_norm/scale", "layers_0/attn_norm/scale",
                "layers_0/mlp_norm/scale", "layers/attn/o_projection/kernel"):
    assert not numerics.is_projection(other)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_layercast_logits_equal_fp32_with_only_projections_rounded_to_bf16(fused, tied):
  cfg = tiny_config(num_layers=3, qkv_bias=True, tie_word_embeddings=tied, scan_layers=False)
  params = transformer.unstack_layers(transformer.init_params(cfg.replace(scan_layers=True),
                                                              jax.random.PRNGKey(3)), 3)
  if fused:
    params = transformer.fuse_projections(params)
    cfg = cfg.replace(fused_projections=True)
  r = numerics.recipe("layercast")
  lc_cfg = cfg.replace(**r)
  lc_params = numerics.cast_params(params, r["param_dtype"], r["proj_dtype"])
  for p, x in jax.tree_util.tree_flatten_with_path(lc_params)[0]:
    want = jnp.bfloat16 if numerics.is_projection(numerics.path_name(p)) else jnp.float32
    assert x.dtype == want, numerics.path_name(p)
  ref_cfg = cfg.replace(**numerics.recipe("fp32"))
  tokens = jnp.asarray([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])
  pos = jnp.broadcast_to(jnp.arange(6)[None], (2, 6))
  lm, ref = TransformerLM(lc_cfg), TransformerLM(ref_cfg)
  a = lm(lc_params, tokens, pos, lm.init_cache(2, 8))
  b = ref(_round_projections(params), tokens, pos, ref.init_cache(2, 8))
  assert a.cache.k[0].dtype == jnp.float32  # the KV cache stays float32
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
  # and it is not the unrounded float32 model (the rounding is real)
  c = ref(params, tokens, pos, ref.init_cache(2, 8))
  assert not np.array_equal(np.asarray(a.logits), np.asarray(c.logits))


def test_layercast_initialises_projections_in_bf16_and_the_rest_in_fp32():
  cfg = tiny_config(tie_word_embeddings=False).replace(**numerics.recipe("layercast"))
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = numerics.path_name(p)
    assert x.dtype == (jnp.bfloat16 if numerics.is_projection(name) else jnp.float32), name


def test_param_bytes_follow_the_recipe():
  cfg = tiny_config(tie_word_embeddings=False)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  n_proj = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if numerics.is_projection(numerics.path_name(p)))
  n_all = sum(x.size for x in jax.tree.leaves(params))
  for name, (proj_bytes, other_bytes) in {"fp32": (4, 4), "bf16": (2, 2),
                                          "layercast": (2, 4)}.items():
    r = numerics.recipe(name)
    b = numerics.param_bytes(numerics.cast_params(params, r["param_dtype"], r["proj_dtype"]))
    assert b["projections"] == proj_bytes * n_proj
    assert b["other"] == other_bytes * (n_all - n_proj)


def test_unknown_numerics_and_mixed_fields_are_errors():
  with pytest.raises(ValueError, match="numerics must be one of"):
    numerics.recipe("fp16")
  with pytest.raises(ValueError, match="give one or the other"):
    load_model("smollm2-135m-instruct", numerics="layercast", dtype="float32")


def test_smollm2_layercast_is_fp32_with_projections_rounded(smollm, prompt_ids):
  """On the real checkpoint: logits of load_model(numerics='layercast') equal the float32
  model's with its projection weights rounded to bf16, and its parameter bytes are about
  0.61 of float32 (SmolLM2-135M's tied 49152 x 576 embedding is 21% of its parameters)."""
  lc = load_model("smollm2-135m-instruct", numerics="layercast")
  assert lc.lm.config.proj_dtype == jnp.bfloat16 and lc.lm.config.dtype == jnp.float32
  ids = prompt_ids[0]
  tokens = jnp.asarray([ids])
  pos = jnp.arange(len(ids))[None]
  a = lc.lm(lc.params, tokens, pos, lc.lm.init_cache(1, 32))
  ref_lm = smollm.lm
  b = ref_lm(_round_projections(smollm.params), tokens, pos, ref_lm.init_cache(1, 32))
  np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), rtol=0, atol=1e-5)
  full, half = numerics.param_bytes(smollm.params), numerics.param_bytes(lc.params)
  assert half["projections"] * 2 == full["projections"] and half["other"] == full["other"]
  assert 0.5 < half["total"] / full["total"] < 0.65

"""Layer layouts and fused projections compute the same model (tiny configs, no checkpoint)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import artifacts, transformer
from models.config import tiny_config
from models.lm import TransformerLM, load_model, save_lm


def _leaves_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _layout(cfg, params, scan: bool, fused: bool):
  """(lm, params) of the scanned, unfused `params` in another layout."""
  if not scan:
    params = transformer.unstack_layers(params, cfg.num_layers)
  if fused:
    params = transformer.fuse_projections(params)
  return TransformerLM(cfg.replace(scan_layers=scan, fused_projections=fused)), params


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("scan", [True, False])
def test_fused_projections_compute_the_same_logits_and_cache(scan, qkv_bias):
  cfg = tiny_config(qkv_bias=qkv_bias, num_layers=3)
  params = transformer.init_params(cfg, jax.random.PRNGKey(1))
  tokens = jnp.asarray([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
  pos = jnp.broadcast_to(jnp.arange(5)[None], (2, 5))
  ref_lm, ref_params = _layout(cfg, params, scan, fused=False)
  lm, fused = _layout(cfg, params, scan, fused=True)
  a = ref_lm(ref_params, tokens, pos, ref_lm.init_cache(2, 8))
  b = lm(fused, tokens, pos, lm.init_cache(2, 8))
  np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(b.cache.k)[0]),
                             np.asarray(jax.tree.leaves(a.cache.k)[0]), rtol=1e-5, atol=1e-6)
  block = fused["layers" if scan else "layers_0"]
  assert set(block["attn"]) == {"qkv_proj", "o_proj"}
  assert set(block["mlp"]) == {"gate_up_proj", "down_proj"}


@pytest.mark.parametrize("scan", [True, False])
def test_unfusing_restores_the_separate_projections_bit_for_bit(scan):
  cfg = tiny_config(qkv_bias=True)
  params = transformer.init_params(cfg, jax.random.PRNGKey(2))
  lm, fused = _layout(cfg, params, scan, fused=True)
  _, separate = _layout(cfg, params, scan, fused=False)
  _leaves_equal(transformer.unfuse_projections(fused, lm.config), separate)


def test_a_fused_model_is_saved_with_separate_projections(tmp_path):
  cfg = tiny_config()
  params = transformer.init_params(cfg, jax.random.PRNGKey(3))
  lm, fused = _layout(cfg, params, scan=False, fused=True)
  save_lm(str(tmp_path / "export"), lm.config, fused)
  _, manifest = artifacts.read_manifest(str(tmp_path / "export"), "lm")
  assert manifest["config"]["model"]["fused_projections"] is False
  back = load_model(str(tmp_path / "export"), scan_layers=True, fused_projections=False)
  _leaves_equal(back.params, params)  # stored stacked, projections separate
  again = load_model(str(tmp_path / "export"))  # the default layout: per layer, fused
  assert again.config.fused_projections and not again.config.scan_layers
  _leaves_equal(again.params, fused)

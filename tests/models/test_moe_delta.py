"""An MoE model stored as a delta on its dense parent (models/moe_delta.py): the split with a
shared expert computes the parent exactly, the delta round-trips through an artifact folder
into `load_model` in every layout, and a delta is refused on other weights or when its file
was changed."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import artifacts, moe, moe_delta, registry, transformer
from models.config import tiny_config
from models.lm import load_model, save_lm
from models.moe import Routing

RNG = np.random.default_rng(0)
E, SHARED = 4, 8  # 24 hidden units: 8 shared + 4 experts of 4


def _assignment(layers: int, units: int = 24) -> np.ndarray:
  return np.stack([RNG.permutation(np.concatenate([np.full(SHARED, -1),
                                                   np.repeat(np.arange(E), (units - SHARED) // E)]))
                   for _ in range(layers)]).astype(np.int32)


def _forward(params, cfg, toks):
  pos = jnp.broadcast_to(jnp.arange(toks.shape[1])[None], toks.shape)
  return np.asarray(transformer.forward(params, cfg, toks, pos, None).logits)


def _delta(dense_cfg, rank=2):
  L, D = dense_cfg.num_layers, dense_cfg.hidden_size
  F = (dense_cfg.intermediate_size - SHARED) // E
  small = lambda *shape: (0.1 * RNG.normal(size=shape)).astype(np.float32)
  adapters = {"gate_proj": {"lora_a": small(L, E, D, rank), "lora_b": small(L, E, rank, F)},
              "down_proj": {"lora_a": small(L, E, F, rank), "lora_b": small(L, E, rank, D)},
              "shared_mlp": {"up_proj": {"lora_a": small(L, D, rank),
                                         "lora_b": small(L, rank, SHARED)}}}
  return {"assignment": _assignment(L), "router": small(L, D, E), "adapters": adapters}


CONFIG = {"experts": E, "top_k": 2, "top_k_weights": "mean_one", "lora_scale": 1.5}


def test_a_split_with_a_shared_expert_at_weight_one_computes_the_dense_model():
  dense = tiny_config()
  params = transformer.init_params(dense, jax.random.PRNGKey(0))
  a = _assignment(dense.num_layers)
  cfg = moe_delta.moe_config(dense, a, E, 2, "mean_one")
  assert (cfg.moe_shared_intermediate_size, cfg.moe_intermediate_size) == (SHARED, 4)
  split = moe_delta.split_params(params, a, RNG.normal(size=(2, 16, E)))
  toks = jnp.asarray(RNG.integers(0, 32, (2, 9)))
  want = _forward(params, dense, toks)
  np.testing.assert_allclose(_forward(split, cfg.replace(moe_routing=Routing("all")), toks),
                             want, rtol=1e-5, atol=1e-6)
  fused = transformer.fuse_projections(split)  # the decoding layout keeps it
  np.testing.assert_allclose(
      _forward(fused, cfg.replace(moe_routing=Routing("all"), fused_projections=True), toks),
      want, rtol=1e-5, atol=1e-6)
  assert np.abs(_forward(split, cfg, toks) - want).max() > 1e-3  # top-2 is another model


def test_mean_one_top_k_weights_sum_to_k_and_top1_is_the_rank0_expert_at_weight_one():
  logits = jnp.asarray(RNG.normal(size=(5, 7, E)).astype(np.float32))
  for k in (1, 2, 3):
    w = np.asarray(moe.routing_weights(logits, Routing("top_k", k), "mean_one"))
    np.testing.assert_allclose(w.sum(-1), k, rtol=1e-6)
    np.testing.assert_allclose(w, k * np.asarray(moe.routing_weights(logits, Routing("top_k", k))),
                               rtol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(moe.routing_weights(logits, Routing("top_k", 1), "mean_one")),
      np.asarray(moe.routing_weights(logits, Routing("rank_k", 0))))
  with pytest.raises(ValueError, match="moe_top_k_weights"):
    tiny_config(moe_experts=E, moe_top_k_weights="max")
  with pytest.raises(ValueError, match="assignment"):
    moe_delta.moe_config(tiny_config(), np.zeros((2, 5), np.int32), E, 2, "mean_one")


def _parent_and_delta(tmp_path):
  dense = tiny_config()
  params = transformer.init_params(dense, jax.random.PRNGKey(1))
  parent_dir = save_lm(str(tmp_path / "parent"), dense.replace(scan_layers=True), params)
  parent = load_model(parent_dir, scan_layers=True, fused_projections=False)
  delta = _delta(dense)
  delta_dir = artifacts.save_artifact(
      str(tmp_path / "moe"), moe_delta.KIND, delta, config=CONFIG,
      target=artifacts.target_entry(parent_dir, parent.sha256, parent.lm.config),
      info={"test": True})
  return parent, delta, delta_dir


def test_a_delta_folder_loads_as_the_parent_split_routed_and_adapted(tmp_path):
  parent, delta, delta_dir = _parent_and_delta(tmp_path)
  cfg, want_params = moe_delta.assemble(parent.params, parent.lm.config, delta, CONFIG)
  toks = jnp.asarray(RNG.integers(0, 32, (3, 8)))
  want = _forward(want_params, cfg, toks)
  # the adapters count: without them the model is another one
  bare = moe_delta.split_params(parent.params, delta["assignment"], delta["router"])
  assert np.abs(_forward(bare, cfg, toks) - want).max() > 1e-3
  for scan, fused in ((True, False), (False, True)):
    m = load_model(delta_dir, scan_layers=scan, fused_projections=fused)
    assert registry.kind_of(delta_dir) == moe_delta.KIND
    c = m.lm.config
    assert (c.moe_experts, c.moe_shared_intermediate_size, c.moe_top_k_weights,
            c.moe_routing) == (E, SHARED, "mean_one", Routing("top_k", 2))
    np.testing.assert_allclose(_forward(m.params, c, toks), want, rtol=1e-5, atol=1e-5)
  assert m.sha256 == artifacts.read_manifest(delta_dir)[1]["params"]["sha256"]


def test_a_delta_is_refused_on_other_parent_weights_and_when_its_file_changed(tmp_path):
  _, _, delta_dir = _parent_and_delta(tmp_path)
  manifest_path = os.path.join(delta_dir, registry.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  good = dict(manifest)
  manifest["target"] = dict(manifest["target"], sha256="0" * 64)
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(artifacts.TargetMismatchError, match="sha256"):
    load_model(delta_dir)
  with open(manifest_path, "w") as f:
    json.dump(good, f)
  with open(os.path.join(delta_dir, artifacts.PARAMS_FILE), "ab") as f:
    f.write(b"x")
  with pytest.raises(registry.ChecksumError, match="checksum mismatch"):
    load_model(delta_dir)

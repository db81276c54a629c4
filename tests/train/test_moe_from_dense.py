"""train/moe_from_dense.py: balanced clustering of hidden units, and a split model that
reproduces the dense one under `all` routing."""
from __future__ import annotations

import jax
import numpy as np

from models import transformer
from models.config import tiny_config
from models.moe import Routing
from train.moe_from_dense import balanced_kmeans, perplexity, split_model


def test_balanced_kmeans_recovers_planted_groups_with_equal_sizes():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 20))
  labels = np.repeat(np.arange(4), 6)
  v = centres[labels] + 0.1 * rng.normal(size=(24, 20))
  perm = rng.permutation(24)
  got = balanced_kmeans(v[perm], 4)
  assert np.bincount(got).tolist() == [6] * 4
  # each found cluster is exactly one planted group
  for c in range(4):
    assert len(set(labels[perm][got == c])) == 1


def test_split_model_under_all_routing_has_the_dense_perplexity():
  cfg = tiny_config(intermediate_size=24)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  moe_cfg, moe_params, assignments = split_model(params, cfg, experts=4, router_scale=10.0)
  assert assignments.shape == (2, 24) and all(np.bincount(a).tolist() == [6] * 4
                                              for a in assignments)
  rows = np.random.default_rng(1).integers(0, 32, (4, 12)).astype(np.int32)
  dense = perplexity(params, cfg, rows)
  np.testing.assert_allclose(perplexity(moe_params, moe_cfg.replace(moe_routing=Routing("all")),
                                        rows), dense, rtol=1e-5)
  assert abs(perplexity(moe_params, moe_cfg.replace(moe_routing=Routing("top_k", 1)), rows)
             - dense) > 1e-4

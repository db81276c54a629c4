"""The MoE construction of train/moe_distill.py on tiny models: the cut puts the most important
units in the shared expert and balances the routed ones, the router is the ridge least-squares
fit, the distillation loss is zero for a student that computes the teacher, and batches are a
pure function of the step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import moe_delta, transformer
from models.config import tiny_config
from models.moe import Routing
from train import moe_distill

RNG = np.random.default_rng(0)


def test_the_cut_shares_the_most_important_units_and_balances_the_rest():
  D, F, E, S = 6, 24, 4, 8
  x = RNG.normal(size=(300, D)).astype(np.float32)
  gate, up = RNG.normal(size=(D, F)), RNG.normal(size=(D, F))
  down = RNG.normal(size=(F, D)) * np.linspace(0.1, 3.0, F)[:, None]
  a, router = moe_distill.cut_layer(x, gate.astype(np.float32), up.astype(np.float32),
                                    down.astype(np.float32), E, S, seed=0)
  h = np.asarray(jax.nn.silu(x @ gate) * (x @ up))
  importance = np.abs(h).mean(0) * np.linalg.norm(down, axis=1)
  assert set(np.flatnonzero(a == -1)) == set(np.argsort(-importance)[:S])
  assert np.bincount(a[a >= 0]).tolist() == [(F - S) // E] * E
  norms = np.stack([np.linalg.norm(h[:, a == e] @ down[a == e], axis=1) for e in range(E)], 1)
  # ridge normal equations: x^T (x r - norms) + 0.01 r = 0
  residual = x.T @ (x @ router - norms) + 1e-2 * router
  assert np.abs(residual).max() < 1e-3 * np.abs(x.T @ norms).max()


def test_the_distillation_loss_is_zero_for_a_student_that_computes_the_teacher():
  dense = tiny_config(scan_layers=True)
  # sharper than at init, so that dropping experts moves the next-token distributions
  params = jax.tree.map(lambda w: 4.0 * w, transformer.init_params(dense, jax.random.PRNGKey(0)))
  a = np.stack([RNG.permutation(np.concatenate([np.full(8, -1), np.repeat(np.arange(4), 4)]))
                for _ in range(dense.num_layers)]).astype(np.int32)
  cfg = moe_delta.moe_config(dense, a, 4, 2, "mean_one")
  student = moe_delta.split_params(params, a, RNG.normal(size=(2, 16, 4)).astype(np.float32))
  tokens = jnp.asarray(RNG.integers(0, 32, (3, 10)))
  loss_all = moe_distill.distill_loss(dense, cfg.replace(moe_routing=Routing("all")), 0.0)
  loss, metrics = loss_all({"teacher": params, "student": student}, {"tokens": tokens}, None)
  assert abs(float(metrics["kl"])) < 1e-5 and abs(float(loss)) < 1e-5
  top2 = moe_distill.distill_loss(dense, cfg, 0.5)
  loss, metrics = top2({"teacher": params, "student": student}, {"tokens": tokens}, None)
  assert float(metrics["kl"]) > 1e-3
  assert float(loss) == pytest.approx(float(metrics["kl"]) + 0.5 * float(metrics["balance"]),
                                      rel=1e-5)
  assert float(metrics["balance"]) >= 1.0 - 1e-6  # the Switch loss / k is 1 at uniform load


def test_rows_are_a_pure_function_of_the_step_and_each_epoch_a_permutation():
  rows = np.arange(20)[:, None] * np.ones((1, 3), np.int32)
  data = moe_distill.Rows(rows, 4, seed=1)
  again = moe_distill.Rows(rows, 4, seed=1)
  epoch = np.concatenate([data.batch(s)["tokens"][:, 0] for s in range(5)])
  assert sorted(epoch.tolist()) == list(range(20))
  assert all(np.array_equal(data.batch(s)["tokens"], again.batch(s)["tokens"]) for s in range(9))
  assert not np.array_equal(data.batch(0)["tokens"], data.batch(5)["tokens"])


def test_bad_arguments_are_refused_before_the_model_loads():
  with pytest.raises(ValueError, match="top_k"):
    moe_distill.main(["--top_k", "8"])
  with pytest.raises(ValueError, match="shared_fraction"):
    moe_distill.main(["--shared_fraction", "1.0"])

"""Mixture-of-Experts block (models/moe.py): routing rules, the dense computation against a
per-token sparse reference, dense-MLP equivalence of split experts, the load-balancing loss,
ragged batches, the LayerCast recipe and sharding over a mesh."""
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

from models import moe, numerics, transformer
from models.config import tiny_config
from models.moe import Routing
from tests import REPO

RNG = np.random.default_rng(0)
E, F = 4, 6


def _moe_cfg(**kw):
  return tiny_config(moe_experts=E, moe_intermediate_size=F, **kw)


def _forward(params, cfg, toks):
  pos = jnp.broadcast_to(jnp.arange(toks.shape[1])[None], toks.shape)
  return transformer.forward(params, cfg, toks, pos, None).logits


def test_routing_weights_follow_each_rule():
  logits = jnp.asarray(RNG.normal(size=(5, 7, E)).astype(np.float32))
  p = np.asarray(jax.nn.softmax(logits))
  order = np.argsort(-p, axis=-1, kind="stable")
  top2 = np.asarray(moe.routing_weights(logits, Routing("top_k", 2)))
  for idx in np.ndindex(5, 7):
    keep = order[idx][:2]
    want = np.zeros(E)
    want[keep] = p[idx][keep] / p[idx][keep].sum()  # renormalised over the two kept
    np.testing.assert_allclose(top2[idx], want, rtol=1e-6)
  for k in range(E):
    rank = np.asarray(moe.routing_weights(logits, Routing("rank_k", k)))
    np.testing.assert_array_equal(rank, np.eye(E)[order[..., k]])
    fixed = np.asarray(moe.routing_weights(logits, Routing("expert", k)))
    np.testing.assert_array_equal(fixed, np.broadcast_to(np.eye(E)[k], fixed.shape))
  np.testing.assert_array_equal(np.asarray(moe.routing_weights(logits, Routing("all"))), 1.0)
  # top-1 routing puts weight 1 on the rank-0 expert
  np.testing.assert_array_equal(np.asarray(moe.routing_weights(logits, Routing("top_k", 1))),
                                np.asarray(moe.routing_weights(logits, Routing("rank_k", 0))))


def test_tied_router_probabilities_go_to_the_lower_expert_index():
  logits = jnp.asarray([[0.0, 2.0, 2.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(moe.expert_ranks(logits))[0], [3, 0, 1, 2])
  np.testing.assert_array_equal(np.asarray(moe.routing_weights(logits, Routing("rank_k", 1))),
                                [[0, 0, 1, 0]])


def test_bad_routings_are_refused_before_any_compile():
  with pytest.raises(ValueError, match="routing kind"):
    Routing("top_p", 2)
  with pytest.raises(ValueError, match="k >= 1"):
    Routing("top_k", 0)
  with pytest.raises(ValueError, match="k=4 on a model of 4 experts"):
    _moe_cfg(moe_routing=Routing("rank_k", 4))
  with pytest.raises(ValueError, match="batch_invariant=False"):
    _moe_cfg(batch_invariant=True)


def test_block_equals_a_per_token_sparse_computation():
  """The dense-over-experts block gives, token by token, sum over the selected experts of
  weight * SwiGLU expert, computed here in float64 with only those experts."""
  cfg = _moe_cfg(num_layers=1)
  params = transformer.init_params(cfg, jax.random.PRNGKey(1))
  mlp = jax.tree.map(lambda x: np.asarray(x[0], np.float64), params["layers"]["mlp"])
  x = RNG.normal(size=(3, 5, cfg.hidden_size)).astype(np.float32)
  for routing in (Routing("top_k", 2), Routing("rank_k", 2), Routing("expert", 1)):
    c = cfg.replace(moe_routing=routing)
    got = moe.MoEMLP(c).apply({"params": jax.tree.map(lambda a: a[0],
                                                        params["layers"]["mlp"])}, x)
    for b, s in np.ndindex(3, 5):
      xt = x[b, s].astype(np.float64)
      z = xt @ mlp["router"]["kernel"]
      p = np.exp(z - z.max())
      p /= p.sum()
      ranked = np.argsort(-p, kind="stable")
      if routing.kind == "top_k":
        chosen = {int(e): p[e] / p[ranked[:2]].sum() for e in ranked[:2]}
      elif routing.kind == "rank_k":
        chosen = {int(ranked[routing.k]): 1.0}
      else:
        chosen = {routing.k: 1.0}
      want = 0
      for e, w in chosen.items():
        g, u = xt @ mlp["gate_proj"]["kernel"][e], xt @ mlp["up_proj"]["kernel"][e]
        want = want + w * ((g / (1 + np.exp(-g)) * u) @ mlp["down_proj"]["kernel"][e])
      np.testing.assert_allclose(np.asarray(got[b, s]), want, rtol=2e-5, atol=1e-6)


def _split_dense(cfg_dense, params):
  """The dense model's MLP units split into E experts by a random balanced assignment, a
  router added: (moe config, moe params)."""
  mlp = params["layers"]["mlp"]
  assignment = RNG.permutation(np.repeat(np.arange(E), cfg_dense.intermediate_size // E))
  experts = moe.experts_from_dense(mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"],
                                   mlp["down_proj"]["kernel"], assignment)
  L, D = cfg_dense.num_layers, cfg_dense.hidden_size
  new = dict(params)
  new["layers"] = dict(params["layers"])
  new["layers"]["mlp"] = {k: {"kernel": v} for k, v in experts.items()}
  new["layers"]["mlp"]["router"] = {
      "kernel": jnp.asarray(RNG.normal(size=(L, D, E)).astype(np.float32))}
  cfg = cfg_dense.replace(moe_experts=E, moe_intermediate_size=cfg_dense.intermediate_size // E)
  return cfg, new


def test_split_experts_with_every_expert_at_weight_one_compute_the_dense_model():
  dense = tiny_config(intermediate_size=24)
  params = transformer.init_params(dense, jax.random.PRNGKey(2))
  cfg, moe_params = _split_dense(dense, params)
  toks = jnp.asarray(RNG.integers(0, 32, (2, 9)))
  want = np.asarray(_forward(params, dense, toks))
  got = np.asarray(_forward(moe_params, cfg.replace(moe_routing=Routing("all")), toks))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # fusing gate and up keeps it, and so does the per-layer layout
  fused = transformer.fuse_projections(moe_params)
  np.testing.assert_allclose(
      np.asarray(_forward(fused, cfg.replace(moe_routing=Routing("all"),
                                             fused_projections=True), toks)), want,
      rtol=1e-5, atol=1e-6)
  back = transformer.unfuse_projections(fused, cfg)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, moe_params))
  # routing only part of the experts is another model
  top2 = np.asarray(_forward(moe_params, cfg, toks))
  assert np.abs(top2 - want).max() > 1e-3


def test_rank0_single_expert_routing_equals_top1_routing():
  cfg = _moe_cfg()
  params = transformer.init_params(cfg, jax.random.PRNGKey(3))
  toks = jnp.asarray(RNG.integers(0, 32, (3, 8)))
  a = _forward(params, cfg.replace(moe_routing=Routing("rank_k", 0)), toks)
  b = _forward(params, cfg.replace(moe_routing=Routing("top_k", 1)), toks)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_rows_logits_do_not_depend_on_padding_mates():
  """Routing is per token: a prompt's logits are the same alone and next to a padded row of
  another length (ragged batch), through the KV cache."""
  from models.lm import TransformerLM
  cfg = _moe_cfg()
  params = transformer.init_params(cfg, jax.random.PRNGKey(4))
  lm = TransformerLM(cfg)
  row = RNG.integers(0, 32, 6)
  alone = lm(params, jnp.asarray(row[None]), jnp.arange(6)[None], lm.init_cache(1, 16))
  batch = np.zeros((2, 6), np.int32)
  batch[0], batch[1, :3] = row, RNG.integers(0, 32, 3)
  both = lm(params, jnp.asarray(batch), jnp.broadcast_to(jnp.arange(6)[None], (2, 6)),
            lm.init_cache(2, 16))
  np.testing.assert_allclose(np.asarray(both.logits[0]), np.asarray(alone.logits[0]),
                             rtol=1e-6, atol=1e-6)


def test_load_balancing_loss_is_top_k_when_balanced_and_grows_when_collapsed():
  uniform = jnp.zeros((64, E))
  # equal probabilities: ties go to experts 0 and 1, P_e = 1/E, so E * sum f_e P_e = k
  np.testing.assert_allclose(float(moe.load_balancing_loss(uniform, 2)), 2.0, rtol=1e-6)
  balanced = jnp.asarray(np.eye(E)[np.arange(64) % E] * 4.0)
  collapsed = jnp.asarray(np.tile([8.0, 4.0, 0.0, 0.0], (64, 1)))
  lb, lc = moe.load_balancing_loss(balanced, 1), moe.load_balancing_loss(collapsed, 1)
  assert float(lc) > 3.0 > 1.1 > float(lb)
  # masked tokens do not count; the loss has a gradient for the router
  mask = jnp.arange(64) < 32
  mixed = jnp.concatenate([balanced[:32], collapsed[32:]])
  np.testing.assert_allclose(float(moe.load_balancing_loss(mixed, 1, mask)), float(lb),
                             rtol=1e-6)
  grad = jax.grad(lambda z: moe.load_balancing_loss(z, 1))(collapsed)
  assert float(jnp.abs(grad).sum()) > 0


def test_router_logits_are_sown_for_training():
  cfg = _moe_cfg()
  params = transformer.init_params(cfg, jax.random.PRNGKey(5))
  toks = jnp.asarray(RNG.integers(0, 32, (2, 5)))
  _, state = transformer.Transformer(cfg).apply(
      {"params": params}, toks, jnp.broadcast_to(jnp.arange(5)[None], (2, 5)), None,
      mutable=["intermediates"])
  (logits,) = state["intermediates"]["layers"]["mlp"]["router_logits"]
  assert logits.shape == (cfg.num_layers, 2, 5, E)


def test_layercast_stores_experts_in_bf16_and_the_router_in_fp32():
  cfg = _moe_cfg(moe_shared_intermediate_size=8, **numerics.recipe("layercast"))
  params = transformer.init_params(cfg, jax.random.PRNGKey(6))
  mlp = params["layers"]["mlp"]
  assert all(m[k]["kernel"].dtype == jnp.bfloat16 for k in ("gate_proj", "up_proj",
                                                             "down_proj")
             for m in (mlp, mlp["shared_mlp"]))
  assert mlp["router"]["kernel"].dtype == jnp.float32


MESH_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from decoding.greedy import Greedy
    from decoding.runner import generate
    from decoding.strategy import Target
    from models import sharding, transformer
    from models.config import tiny_config
    from models.lm import TransformerLM
    cfg = tiny_config(vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2,
                      head_dim=8, moe_experts=4, moe_intermediate_size=8,
                      moe_shared_intermediate_size=16, moe_top_k_weights="mean_one")
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(2, 64, n))) for n in rng.integers(2, 12, 8)]
    out, specs = {}, {}
    for data, model in ((1, 1), (2, 4), (1, 8)):
      mesh = sharding.make_mesh(data, model)
      p = sharding.shard_params(params, mesh)
      specs[f"{data}x{model}"] = str(p["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec)
      specs[f"{data}x{model} shared"] = str(
          p["layers"]["mlp"]["shared_mlp"]["down_proj"]["kernel"].sharding.spec)
      g = generate(Target(TransformerLM(cfg, mesh=mesh), p, (1,), 0), prompts,
                   Greedy(max_new_tokens=6), batch_size=8,
                   shard=lambda a: sharding.shard_batch(a, mesh))
      out[f"{data}x{model}"] = [x.output_ids for x in g]
    print(json.dumps(dict(out=out, specs=specs)))
""")


def test_sharded_moe_greedy_equals_single_device():
  """Each expert's hidden units split over the model axis (every device holds a slice of
  every expert, and of the shared expert), the router replicated: the single device's greedy
  tokens on 2 x 4 and 1 x 8."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["out"]["2x4"] == res["out"]["1x1"] == res["out"]["1x8"]
  assert res["specs"]["2x4"] == str(jax.sharding.PartitionSpec(None, None, None, "model"))
  assert res["specs"]["2x4 shared"] == str(jax.sharding.PartitionSpec(None, "model", None))


def test_contrast_routing_runs_the_strong_and_weak_routings_on_the_two_halves_of_the_batch():
  cfg = _moe_cfg()
  params = transformer.init_params(cfg, jax.random.PRNGKey(7))
  toks = jnp.asarray(RNG.integers(0, 32, (3, 6)))
  both = np.asarray(_forward(params, cfg.replace(moe_routing=Routing("contrast", 2, 1)),
                             jnp.concatenate([toks, toks])))
  strong = np.asarray(_forward(params, cfg.replace(moe_routing=Routing("top_k", 2)), toks))
  weak = np.asarray(_forward(params, cfg.replace(moe_routing=Routing("rank_k", 1)), toks))
  np.testing.assert_allclose(both[:3], strong, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(both[3:], weak, rtol=1e-5, atol=1e-6)
  assert np.abs(strong - weak).max() > 1e-3
  with pytest.raises(ValueError, match="weak_rank=4"):
    _moe_cfg(moe_routing=Routing("contrast", 2, 4))


def test_an_moe_config_survives_the_artifact_manifest():
  """Artifacts store their config as JSON (`models.checkpoint.config_to_dict`)."""
  from models.checkpoint import config_from_dict, config_to_dict
  c = _moe_cfg(moe_routing=Routing("contrast", 2, 1))
  assert config_from_dict(json.loads(json.dumps(config_to_dict(c)))) == c

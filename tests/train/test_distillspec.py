"""DistillSpec (card 21) on tiny models: divergences, the acceptance identity, KD on a toy
pair, the data sources, draft checkpoints and the training command end to end."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from decoding.errors import GenerationError
from decoding.speculative.model_drafter import load_draft_model
from decoding.strategy import Resources, Target
from models import artifacts, transformer
from models.config import tiny_config
from models.lm import LoadedModel, TransformerLM, load_self_draft, save_lm
from train import distillspec as ds, divergences as dv, losses, optim, tasks, trainer

V = 32
TARGET_CFG = tiny_config(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2)
DRAFT_CFG = tiny_config(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1)


def _init(cfg, seed):
  """Random parameters with `transformer.init_params`' tree and initializers (normal(0.02)
  weights, unit norm scales), drawn with numpy: the tree comes from tracing init_params,
  which skips compiling the Flax init for every tiny config."""
  shapes = jax.eval_shape(functools.partial(transformer.init_params, cfg), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    if path[-1].key == "scale":
      return jnp.ones(s.shape, s.dtype)
    return jnp.asarray(rng.normal(0.0, 0.02, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _logits(key, shape, scale=3.0, ban=0.2):
  """Random logits with some -inf entries (as after a processor's bans), never a whole row."""
  k1, k2 = jax.random.split(key)
  x = scale * jax.random.normal(k1, shape)
  banned = jax.random.uniform(k2, shape) < ban
  banned = banned.at[..., 0].set(False)
  return jnp.where(banned, -jnp.inf, x)


# ------------------------------------------------------------------------------ divergences


@jax.jit
def _divergence_values(p, q, shared):
  """Everything the property test checks, in one compiled program (eager ops compile one
  by one, which costs more than the checks)."""
  out = {name: dv.get(name)(p, q) for name in dv.DIVERGENCES}
  out.update({f"{name}_self": dv.get(name)(p, p) for name in dv.DIVERGENCES})
  out.update(
      accept=dv.acceptance_probability(p, q), jsd_qp=dv.jsd(q, p), jsd_02=dv.jsd(p, q, 0.2),
      jsd_08_qp=dv.jsd(q, p, 0.8), fkl_shift=dv.fkl(p, p + 5.0), fkl_shared=dv.fkl(p, shared),
      rkl_shared=dv.rkl(p, shared), fkl_shared_rev=dv.fkl(shared, p), fkl_qp=dv.fkl(q, p),
      tvd_hot=dv.tvd(shared, p, temperature=1e4))
  return out


def test_divergence_properties():
  kp, kq = jax.random.split(jax.random.key(0))
  p = _logits(kp, (64, V))
  q = _logits(kq, (64, V))
  shared = jnp.where(jnp.isinf(p), -jnp.inf, _logits(kq, (64, V), ban=0.0))  # p's support
  r = {k: np.asarray(v) for k, v in _divergence_values(p, q, shared).items()}
  assert np.all((r["tvd"] >= 0) & (r["tvd"] <= 1))
  np.testing.assert_allclose(r["accept"], 1 - r["tvd"], atol=1e-6)
  # JSD_0.5 is symmetric and bounded by log 2 (finite even where the supports differ);
  # beta swaps the roles: JSD_b(p, q) = JSD_(1-b)(q, p)
  np.testing.assert_allclose(r["jsd"], r["jsd_qp"], rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(r["jsd"]) & (r["jsd"] <= np.log(2) + 1e-6))
  np.testing.assert_allclose(r["jsd_02"], r["jsd_08_qp"], rtol=1e-5, atol=1e-7)
  # FKL = 0 iff p = q (a logit shift leaves p unchanged); RKL(p, q) = FKL(q, p)
  np.testing.assert_allclose(r["fkl_shift"], 0.0, atol=1e-5)
  assert np.all(r["fkl_shared"] > 1e-4)
  np.testing.assert_allclose(r["rkl_shared"], r["fkl_shared_rev"], rtol=1e-6)
  np.testing.assert_allclose(r["rkl"], r["fkl_qp"], rtol=1e-6)
  for name in dv.DIVERGENCES:  # never NaN; zero on identical inputs
    assert not np.any(np.isnan(r[name])), name
    np.testing.assert_allclose(r[f"{name}_self"], 0.0, atol=1e-6, err_msg=name)
  assert np.any(np.isinf(r["fkl"]))  # p has mass where q has none: KL(p || q) is infinite
  # temperature applies to both: a huge one flattens both to uniform on the shared support
  assert r["tvd_hot"].max() < 1e-3


def test_divergence_gradients_are_finite_with_banned_tokens():
  kp, kq = jax.random.split(jax.random.key(1))
  p = _logits(kp, (16, V))
  q = jnp.where(jnp.isinf(p), -jnp.inf, _logits(kq, (16, V), ban=0.0))  # processor on both
  grads = jax.jit(lambda q: {name: jax.grad(lambda x: jnp.sum(dv.get(name)(p, x)))(q)
                             for name in dv.DIVERGENCES})(q)
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.max(np.abs(np.where(np.isinf(np.asarray(q)), g, 0.0))) == 0.0, name
    assert np.max(np.abs(g)) > 0, name


def test_masked_mean_is_the_per_sequence_loss():
  v = jnp.asarray([[1.0, 3.0, jnp.inf], [2.0, 0.0, 0.0], [jnp.nan, 0.0, 0.0]])
  m = jnp.asarray([[1, 1, 0], [1, 0, 0], [0, 0, 0]], jnp.float32)
  assert float(dv.masked_mean(v, m)) == pytest.approx((2.0 + 2.0) / 2)  # row 2 has no tokens
  assert float(dv.masked_mean(v, m, per_sequence=False)) == pytest.approx(6.0 / 3)
  with pytest.raises(ValueError):
    dv.get("hellinger")
  with pytest.raises(ValueError):
    dv.get("jsd", beta=1.0)


def test_monte_carlo_acceptance_of_the_shared_verifier_matches_one_minus_tvd():
  """Single-token speculative sampling through `decoding.speculative.verify.verify_chain` accepts a
  draft token d ~ q with probability sum_v min(p, q) = 1 - TVD (DistillSpec's identity)."""
  keys = jax.random.split(jax.random.key(2), 3)
  M, S = 48, 400
  scales = jnp.linspace(0.3, 4.0, M)[:, None]
  p = _logits(keys[0], (M, 8), ban=0.1) * scales
  q = _logits(keys[1], (M, 8), ban=0.1) * scales
  q = jnp.where(jnp.all(jnp.isinf(q) | jnp.isinf(p), -1, keepdims=True), p, q)
  rate = np.asarray(ds.monte_carlo_acceptance(p, q, keys[2], S))
  expect = np.asarray(1.0 - dv.tvd(p, q))
  assert expect.min() < 0.5 < expect.max()  # a wide range of acceptance rates
  se = np.sqrt(expect * (1 - expect) / S + 1e-12)
  assert np.all(np.abs(rate - expect) < 5 * se + 1e-6), np.c_[rate, expect]
  assert abs(rate.mean() - expect.mean()) < 3 * np.sqrt(np.sum(se ** 2)) / M + 1e-3


# ------------------------------------------------------------------------------ KD on a toy pair

# Unrolled layers compile faster than a 1-2 step scan; the target's untied head is scaled
# up so its next-token distributions are peaked (entropy ~0.5 nats) and depend on context.
TARGET_CFG = TARGET_CFG.replace(tie_word_embeddings=False, scan_layers=False)
DRAFT_CFG = DRAFT_CFG.replace(scan_layers=False)
N_NEW = 16


@pytest.fixture(scope="module")
def toy_target():
  params = dict(_init(TARGET_CFG, 0))
  params["lm_head"] = {"kernel": 60.0 * params["lm_head"]["kernel"]}
  return TransformerLM(TARGET_CFG), params


def _prompts(num, seed, length=6):
  return (tasks.synthetic_sequences(num, length, V, seed=seed),
          np.full((num,), length, np.int32))


def _draft_data(batch_size, mix, refresh_every, prompts, **kw):
  return ds.DistillData(batch_size=batch_size, mix=mix, prompts=prompts[0],
                        prompt_len=prompts[1],
                        draft_sampler=ds.ContinuationSampler(TransformerLM(DRAFT_CFG), N_NEW,
                                                             [], 0, 1.0),
                        draft_params_fn=lambda tr: tr, refresh_every=refresh_every, **kw)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.slow
def test_on_policy_kd_raises_the_acceptance_rate(toy_target, divergence):
  """A few hundred DistillSpec steps on draft-generated data: 1 - E[TVD] on held-out
  prefixes, the Monte Carlo acceptance of the shared verifier and the greedy agreement
  all rise, for every divergence."""
  tlm, tparams = toy_target
  dlm = TransformerLM(DRAFT_CFG)
  trainable, assemble = ds.separate_draft(_init(DRAFT_CFG, 3))
  source = _draft_data(16, {"draft": 1.0}, 4, _prompts(128, seed=4), seed=1)
  heldout = tasks.synthetic_sequences(32, 22, V, seed=9)
  steps = 300
  opt = ml_collections.ConfigDict(dict(name="adam", learning_rate=1e-2, grad_clip=1.0))
  tr = trainer.Trainer(ds.distill_loss(tlm, dlm, divergence), optim.make_optimizer(opt, steps),
                       assemble=assemble)
  state = tr.init_state(trainable, jax.random.key(0))
  source.set_trainable(state.params)
  before = ds.expected_acceptance(tlm, tparams, dlm, trainable, heldout, mc_samples=8)
  state = tr.fit(state, tparams, source, steps, hooks=[source.hook], progress=False)
  after = ds.expected_acceptance(tlm, tparams, dlm, state.params, heldout, mc_samples=8)
  assert before["acceptance"] < 0.2 and after["acceptance"] > 0.6, (before, after)
  assert after["mc_acceptance"] > before["mc_acceptance"] + 0.4, (before, after)
  assert abs(after["mc_acceptance"] - after["acceptance"]) < 0.04, after
  assert after["greedy_agreement"] > before["greedy_agreement"] + 0.4, (before, after)


# ------------------------------------------------------------------------------ data sources


def test_join_continuations_and_mixture_rows():
  prompts = np.asarray([[5, 6, 0], [7, 0, 0]], np.int32)
  rows = ds.join_continuations(prompts, np.asarray([2, 1]), np.asarray([[1, 2], [3, 4]]),
                               np.asarray([2, 1]), pad_id=0)
  np.testing.assert_array_equal(rows["tokens"], [[5, 6, 1, 2, 0], [7, 3, 0, 0, 0]])
  np.testing.assert_array_equal(rows["gen_mask"], [[1, 1], [1, 0]])
  np.testing.assert_array_equal(ds.loss_mask_of(rows), [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]])
  assert ds.source_rows(8, {"draft": 1.0}) == {"fixed": 0, "target": 0, "draft": 8}
  assert ds.source_rows(8, {"draft": 0.5, "target": 0.25, "fixed": 0.25}) == {
      "fixed": 2, "target": 2, "draft": 4}
  assert sum(ds.source_rows(7, {"draft": 0.7, "fixed": 0.3}).values()) == 7
  with pytest.raises(ValueError):
    ds.source_rows(8, {"teacher": 1.0})


def test_distill_data_mixes_sources_and_follows_the_draft(toy_target):
  tlm, tparams = toy_target
  d0, d1 = _init(DRAFT_CFG, 5), _init(DRAFT_CFG, 6)
  prompts = _prompts(64, seed=2)
  prompts[1][::2] = 4  # ragged prompts
  fixed = tasks.synthetic_sequences(12, 6 + N_NEW, V, seed=3)
  mix = {"fixed": 0.25, "target": 0.25, "draft": 0.5}
  make = lambda: _draft_data(
      32, mix, 4, prompts, fixed_rows=fixed, target_params=tparams, seed=0,
      target_sampler=ds.ContinuationSampler(tlm, N_NEW, [], 0, 1.0))
  src = make()
  src.set_trainable(d0)
  b0 = src.batch(0)
  assert b0["tokens"].shape == (32, 6 + N_NEW) and b0["gen_mask"].shape == (32, N_NEW)
  assert b0["gen_mask"].sum() == 32 * N_NEW  # no EOS: every continuation is complete
  assert all(any(np.array_equal(r, f) for f in fixed) for r in b0["tokens"][:8])  # fixed first
  np.testing.assert_array_equal(b0["prompt_len"][:8], 6)
  np.testing.assert_array_equal(src.batch(0)["tokens"], b0["tokens"])  # a function of the step
  b1 = src.batch(1)  # same window: the next rows of the pool, nothing regenerated
  assert not np.array_equal(b1["tokens"][16:], b0["tokens"][16:])
  src.set_trainable(d1)
  old = make()
  old.set_trainable(d0)
  # within a window the pool stays (generated by d0); the next window comes from the new
  # draft: same prompts and keys, other samples
  np.testing.assert_array_equal(src.batch(3)["tokens"], old.batch(3)["tokens"])
  b4, b4_old = src.batch(4), old.batch(4)
  np.testing.assert_array_equal(b4["tokens"][:16], b4_old["tokens"][:16])  # fixed + target
  np.testing.assert_array_equal(b4["prompt_len"], b4_old["prompt_len"])
  assert not np.array_equal(b4["tokens"][16:], b4_old["tokens"][16:])  # on-policy rows moved
  assert src.generation_seconds > 0


# ------------------------------------------------------------------------------ checkpoints + run


def _target(cfg, params, sha="ab" * 32):
  """A target as `load_model` returns it (sha256: the checksum of its weights)."""
  return LoadedModel("tiny", TransformerLM(cfg), params, None, False, sha)


def test_self_draft_trains_only_layers_and_round_trips(tmp_path, monkeypatch):
  cfg = tiny_config(vocab_size=V, num_layers=4)
  tparams = _init(cfg, 7)
  dlm, trainable, assemble = ds.self_draft(TransformerLM(cfg), tparams, 2)
  assert sorted(trainable) == ["final_norm", "layers"] and dlm.config.num_layers == 2
  trained = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), trainable)
  ds.save_draft(str(tmp_path / "d"), trained, dlm, target_name="tiny", target_sha256="ab" * 32,
                target_config=cfg, info={"note": "test"})
  _, manifest = artifacts.read_manifest(str(tmp_path / "d"), "self_draft")
  assert manifest["config"] == {"num_layers": 2, "trained": ["final_norm", "layers"]}
  assert manifest["target"]["sha256"] == "ab" * 32 and manifest["info"] == {"note": "test"}
  tokens = jnp.asarray(tasks.synthetic_sequences(2, 10, V, seed=1))
  want = losses.sequence_logits(assemble(trained, tparams)["draft"], dlm.config, tokens)
  for scan in (True, False):  # the same draft from a stacked or an unstacked target
    tcfg = cfg.replace(scan_layers=scan)
    tp = tparams if scan else transformer.unstack_layers(tparams, cfg.num_layers)
    lm2, p2 = load_self_draft(str(tmp_path / "d"), _target(tcfg, tp))
    assert lm2.config.num_layers == 2 and lm2.config.scan_layers == scan
    assert p2["embed"] is tp["embed"]  # shared with the target, not copied
    np.testing.assert_allclose(losses.sequence_logits(p2, lm2.config, tokens), want, atol=1e-5)
  with pytest.raises(artifacts.TargetMismatchError, match="architecture"):
    load_self_draft(str(tmp_path / "d"), _target(cfg.replace(intermediate_size=32), tparams))
  with pytest.raises(artifacts.TargetMismatchError, match="sha256"):  # other weights
    load_self_draft(str(tmp_path / "d"), _target(cfg, tparams, sha="0" * 64))
  monkeypatch.setenv("DECODAX_DRAFTS_DIR", str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="train.distillspec"):  # named, not produced yet
    load_self_draft("distillspec-smollm2-L4", _target(cfg, tparams))


def test_draft_model_loads_self_drafts_and_separate_models_for_the_target(tmp_path):
  """The speculative strategy's `draft_model` (`model_drafter.load_draft_model`): a self-draft
  artifact is rebuilt on the target after its checksum is checked; an exported model is a
  separate draft model, which must share the target's vocabulary."""
  cfg = tiny_config(vocab_size=V, num_layers=4)
  tparams = _init(cfg, 7)
  dlm, trainable, _ = ds.self_draft(TransformerLM(cfg), tparams, 2)
  ds.save_draft(str(tmp_path / "d"), trainable, dlm, target_name="tiny",
                target_sha256="ab" * 32, target_config=cfg)
  target = lambda sha: Target(TransformerLM(cfg), tparams, sha256=sha)
  load = lambda path, sha="ab" * 32: load_draft_model(str(tmp_path / path), target(sha),
                                                      Resources())
  assert load("d")[0].config.num_layers == 2
  with pytest.raises(GenerationError, match="sha256"):
    load("d", "cd" * 32)
  with pytest.raises(GenerationError, match="checksum is unknown"):
    load("d", None)
  small = tiny_config(vocab_size=V, num_layers=1)
  save_lm(str(tmp_path / "lm"), small, _init(small, 8))
  lm, params = load("lm")
  assert lm.config.num_layers == 1 and lm.config.scan_layers
  other = tiny_config(vocab_size=2 * V, num_layers=1)
  save_lm(str(tmp_path / "other"), other, _init(other, 9))
  with pytest.raises(GenerationError, match="vocabulary"):
    load("other")


def test_training_command_end_to_end(tmp_path, monkeypatch):
  """configs/distillspec_smollm2.py on a tiny random target with synthetic prompts, fixed
  rows and on-policy rows: trains, reports before/after, saves a draft that load_self_draft
  reads back."""
  from configs import distillspec_smollm2
  from train import model_setup
  monkeypatch.setenv("DECODAX_DRAFTS_DIR", str(tmp_path / "drafts"))
  c = distillspec_smollm2.get_config()
  c.model.name, c.model.init = "tiny", "random"
  # the toy target's architecture and the other tests' shapes: compiled programs are shared
  c.model.overrides = ml_collections.ConfigDict(dict(
      vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
      tie_word_embeddings=False))
  c.model.scan_layers = False
  c.data.source = "synthetic"
  d = c.distillspec
  d.num_layers, d.prompts, d.prompt_len, d.gen_len, d.eval_gen_len = 1, "synthetic", 6, 16, 16
  d.mix = ml_collections.ConfigDict(dict(fixed=0.5, target=0.0, draft=0.5))
  d.num_train_prompts, d.num_eval_prompts, d.mc_samples, d.refresh_every = 32, 32, 0, 2
  d.save_name, d.eval_sets = "toy-L1", "sampled"
  c.data.num_train, c.num_steps, c.log_every, c.checkpoint_every = 16, 6, 2, 3
  c.optimizer.learning_rate = 1e-2
  results = ds.run(c, str(tmp_path / "run"), progress=False)
  assert set(results["before"]) == {"sampled"}
  assert results["after"]["sampled"]["positions"] == 32 * 16
  assert results["settings"]["mix"] == {"fixed": 4, "target": 0, "draft": 4}
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [2, 4, 6] and "acceptance" in records[-1]
  assert results["draft_path"] == str(tmp_path / "drafts" / "toy-L1")
  target = model_setup.build(c.model, seed=c.seed)
  lm, params = load_self_draft(results["draft_path"], target)
  assert lm.config.num_layers == 1
  rows = np.load(tmp_path / "run" / "eval_rows.npz")
  again = ds.expected_acceptance(target.lm, target.params, lm, params, rows["sampled_tokens"],
                                 rows["sampled_mask"])
  assert again["acceptance"] == pytest.approx(results["after"]["sampled"]["acceptance"],
                                              abs=1e-5)

"""The training stack on tiny models: exact resumption, accumulation, LoRA, CLI (on a
simulated device mesh: tests/train/test_trainer_mesh.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from models import transformer
from models.config import tiny_config
from tests import REPO
from train import data, lora, losses, optim, tasks, trainer

CFG = tiny_config(vocab_size=48, hidden_size=32, intermediate_size=48)
OPT = ml_collections.ConfigDict(dict(name="adamw", learning_rate=3e-3, weight_decay=0.01,
                                     grad_clip=1.0, schedule="cosine", warmup_steps=2))


def max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def setup():
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  rows = tasks.synthetic_sequences(24, 12, CFG.vocab_size, seed=0)
  return params, data.ArrayData({"tokens": rows}, batch_size=8, seed=3)


def _fit(params, source, steps, workdir=None, crash_at=None, accum=1):
  tr = trainer.Trainer(losses.next_token_loss(CFG), optim.make_optimizer(OPT, steps),
                       grad_accum=accum)
  state = tr.init_state(params, jax.random.key(5))

  def crash(step, state, metrics):
    if step == crash_at:
      raise KeyboardInterrupt  # the process dies here; only the disk survives

  try:
    return tr.fit(state, None, source, steps, workdir=workdir, checkpoint_every=3,
                  log_every=2, hooks=[crash] if crash_at else [], progress=False)
  except KeyboardInterrupt:
    return None


def test_killed_run_resumes_to_identical_parameters(setup, tmp_path):
  params, source = setup
  full = _fit(params, source, 10)
  assert _fit(params, source, 10, workdir=str(tmp_path), crash_at=8) is None  # last ckpt: 6
  resumed = _fit(params, source, 10, workdir=str(tmp_path))
  assert int(resumed.step) == 10
  for a, b in zip(jax.tree.leaves((full.params, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-exact
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == [2, 4, 6, 8, 10]  # the killed run's step-8 record was replaced
  assert max_diff(full.params, params) > 1e-3  # training did move the parameters


def test_gradient_accumulation_equals_the_full_batch(setup):
  params, source = setup
  one = _fit(params, source, 4)
  four = _fit(params, source, 4, accum=4)
  assert max_diff(one.params, four.params) < 2e-5


def test_accumulation_weights_micro_batches_by_their_tokens(setup):
  """Uneven loss masks: the accumulated update equals the full-batch token mean."""
  params, source = setup
  rows = source.arrays["tokens"][:8]
  mask = np.zeros(rows.shape, np.float32)
  for i in range(8):
    mask[i, 1:2 + i] = 1.0  # row i weights i + 1 tokens
  batch = {"tokens": rows, "loss_mask": mask}
  out = []
  for accum in (1, 4):
    tr = trainer.Trainer(losses.next_token_loss(CFG), optim.make_optimizer(OPT, 4),
                         grad_accum=accum)
    state = tr.init_state(params, jax.random.key(0))
    state, metrics = tr.train_step(state, None, batch)
    out.append((state.params, float(metrics["loss"]), float(metrics["tokens"])))
  assert abs(out[0][1] - out[1][1]) < 1e-5
  assert out[0][2] == out[1][2] == mask.sum()  # counts add up over micro-batches
  assert max_diff(out[0][0], out[1][0]) < 2e-5


def test_loss_goes_down(setup):
  params, source = setup
  tr = trainer.Trainer(losses.next_token_loss(CFG), optim.make_optimizer(OPT, 60))
  state = tr.init_state(params, jax.random.key(0))
  batches = data.eval_batches({"tokens": source.arrays["tokens"]}, 8)
  before = tr.evaluate(state, None, batches)["loss"]
  state = tr.fit(state, None, source, 60, progress=False)
  after = tr.evaluate(state, None, batches)["loss"]
  assert after < before - 1.0, (before, after)


def test_lora_starts_at_the_base_and_only_adapters_train(setup):
  params, source = setup
  # A frozen head with 0.02-scale embeddings caps the logits near zero; give the base a
  # usable head so low-rank updates of the projections can move the loss.
  params = {**params, "embed": {"table": params["embed"]["table"] * 25}}
  adapters = lora.init(params, jax.random.key(1), rank=4)
  merged = lora.merge(params, adapters, alpha=8.0, rank=4)
  assert max_diff(merged, params) == 0.0  # B starts at zero
  assert len(jax.tree.leaves(adapters)) == 2 * 7  # q, k, v, o, gate, up, down: A and B each
  a = adapters["layers"]["attn"]["q_proj"]["lora_a"]
  assert a.shape == (CFG.num_layers, CFG.hidden_size, 4)  # stacked layers
  frozen = jax.tree.map(jnp.copy, params)
  opt = ml_collections.ConfigDict(dict(name="adamw", learning_rate=3e-2))
  tr = trainer.Trainer(losses.next_token_loss(CFG), optim.make_optimizer(opt, 20),
                       assemble=lambda ad, base: lora.merge(base, ad, 8.0, 4))
  state = tr.init_state(adapters, jax.random.key(0))
  batches = data.eval_batches({"tokens": source.arrays["tokens"]}, 8)
  before = tr.evaluate(state, frozen, batches)["loss"]
  state = tr.fit(state, frozen, source, 20, progress=False)
  assert tr.evaluate(state, frozen, batches)["loss"] < before - 0.2
  assert max_diff(state.params, adapters) > 0
  # Only targeted kernels differ after merging; norms and embeddings are the base's.
  trained = lora.merge(params, state.params, 8.0, 4)
  assert max_diff(trained["layers"]["mlp"]["down_proj"],
                  params["layers"]["mlp"]["down_proj"]) > 0


def test_mixture_picks_each_loss_at_its_rate():
  calls = {"a": lambda p, b, k: (b["x"].sum(), {"v": b["x"].sum()}),
           "b": lambda p, b, k: (-b["x"].sum(), {"w": b["x"].sum()})}
  fn = jax.jit(losses.mixture(calls, {"a": 0.25, "b": 0.75}))
  batch = {"a": {"x": jnp.ones(3)}, "b": {"x": jnp.ones(3)}}
  picks = [int(fn(None, batch, jax.random.key(i))[1]["branch"]) for i in range(400)]
  assert abs(np.mean(picks) - 0.75) < 0.07
  loss, m = fn(None, batch, jax.random.key(0))
  assert set(m) == {"a/v", "b/w", "branch", "tokens"}
  assert float(loss) == (3.0 if int(m["branch"]) == 0 else -3.0)
  untaken = "b/w" if int(m["branch"]) == 0 else "a/v"
  assert np.isnan(float(m[untaken]))  # not computed this step, so not averaged into logs


@pytest.mark.parametrize("bad, msg", [
    (dict(name="adagrad"), "unknown optimizer"),
    (dict(schedule="step"), "unknown schedule"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(grad_clip=-1.0), "grad_clip"),
])
def test_bad_optimizer_config(bad, msg):
  cfg = ml_collections.ConfigDict(dict(OPT) | bad)
  with pytest.raises(ValueError, match=msg):
    optim.make_optimizer(cfg, 10)


def test_schedule_warmup_then_cosine():
  sched = optim.make_schedule(OPT, 12)
  assert float(sched(0)) == 0.0
  assert abs(float(sched(2)) - 3e-3) < 1e-9
  assert float(sched(11)) < 3e-3 * 0.05


def _main(workdir, *overrides):
  cmd = [sys.executable, "-m", "train.main", "--config=configs/train_tiny.py",
         f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.usefixtures("smollm_gguf")  # the CLI reads its tokenizer
def test_cli_trains_and_exports_a_model_the_decoding_cli_loads(tmp_path):
  """`python -m train.main` trains and exports a checkpoint `python -m decoding.generate`
  loads. (Resuming: test_killed_run_resumes_to_identical_parameters in-process, and
  colab/02_train.ipynb through the experiment runner.)"""
  tok = "--config.model.tokenizer=smollm2-135m-instruct"
  part = _main(tmp_path / "part", tok, "--config.num_steps=4")
  assert part.returncode == 0, part.stderr[-3000:]
  from models.lm import load_model
  a = load_model(str(tmp_path / "part" / "export"))
  assert a.config.vocab_size == 49152 and a.tokenizer is not None
  records = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
  assert max(r["step"] for r in records) == 4
  gen = subprocess.run(
      [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
       f"--config.model={tmp_path / 'part' / 'export'}", "--prompt=Hello there",
       "--config.max_new_tokens=5", "--config.min_new_tokens=5"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert gen.stdout.strip()


@pytest.mark.slow
def test_cli_rejects_bad_config_before_loading(tmp_path):
  proc = _main(tmp_path, "--config.optimizer.name=adagrad")
  assert proc.returncode == 2 and "unknown optimizer" in proc.stderr
  proc = _main(tmp_path, "--config.batch_size=6", "--config.grad_accum=4")
  assert proc.returncode == 2 and "divisible" in proc.stderr


def test_resume_refuses_a_different_experiment():
  trainer.check_resumable({"fingerprint": "a", "num_steps": 4}, {"fingerprint": "a",
                                                                 "num_steps": 8})  # only longer
  with pytest.raises(trainer.ResumeError, match="different experiment"):
    trainer.check_resumable({"fingerprint": "a"}, {"fingerprint": "b"})


@pytest.mark.parametrize("field, value, msg", [
    ("task", "rl", "unknown task"),
    ("lora.alpha", -1.0, "lora.alpha"),
    ("checkpoint_every", -1, "checkpoint_every"),
    ("ditto.gamma", 1.5, "gamma"),
    ("ditto.variant", "l2", "variant"),
    ("data.seq_len", 1, "seq_len must be >= 2"),
    ("evaluate.context_len", 64, "context_len"),
])
def test_config_errors_before_loading(field, value, msg):
  from configs import ditto_smollm2
  from train import experiment
  c = ditto_smollm2.get_config()
  c.data.seq_len = 32 if field == "evaluate.context_len" else c.data.seq_len
  if field != "ditto.gamma" and field != "ditto.variant":
    c.lora.rank = 4
  node, name = c, field
  if "." in field:
    head, name = field.split(".")
    node = c[head]
  node[name] = value
  with pytest.raises(ValueError, match=msg):
    experiment.validate(c)


def test_lora_refuses_targets_that_match_nothing():
  fused = tiny_config(fused_projections=True)
  params = transformer.init_params(fused, jax.random.key(0))
  with pytest.raises(ValueError, match=r"attn/q_proj.*fused_projections=False"):
    lora.init(params, jax.random.key(1), rank=2)  # q/k/v are one qkv kernel here
  plain = transformer.init_params(tiny_config(), jax.random.key(0))
  with pytest.raises(ValueError, match="no_such_proj"):
    lora.init(plain, jax.random.key(1), rank=2, targets=("attn/q_proj", "mlp/no_such_proj"))

"""Training on a simulated 8-device CPU mesh (4 data x 2 model) gives the single-device
results: a train step on full parameters and on LoRA adapters, evaluation (`Trainer.evaluate`,
`train.evaluation.evaluate_lm`), and a run's checkpoint restored or resumed on the other layout.

Each script runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the
flag must be set before jax starts) and prints one JSON record per comparison.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from tests import REPO

pytestmark = pytest.mark.slow  # a fresh process compiles every program twice (one device, mesh)

COMMON = textwrap.dedent("""
    import json, os, shutil, sys, tempfile
    import jax, jax.numpy as jnp, ml_collections, numpy as np
    from models import sharding, transformer
    from models.config import tiny_config
    from models.lm import TransformerLM
    from train import data, evaluation, lora, losses, optim, tasks, trainer
    from train.checkpointing import Checkpointer
    assert len(jax.devices()) == 8, jax.devices()
    cfg = tiny_config(vocab_size=48, hidden_size=32, intermediate_size=48)
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    rows = tasks.synthetic_sequences(16, 12, 48, seed=0)
    src = data.ArrayData({"tokens": rows}, batch_size=8, seed=0)
    opt = ml_collections.ConfigDict(dict(name="adamw", learning_rate=3e-3, grad_clip=1.0))

    def diff(a, b):  # on the host: the two trees may live on different devices
      a, b = jax.tree.leaves(a), jax.tree.leaves(b)
      assert len(a) == len(b)
      return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
                 for x, y in zip(a, b))

    def spec(x):
      return str(x.sharding.spec) if hasattr(x.sharding, "spec") else "single"

    def emit(**record):
      print(json.dumps(record))
""")

# argv[1]: "full" (the parameters are trained) or "lora" (rank-4 adapters on a frozen base).
STEP = COMMON + textwrap.dedent("""
    use_lora = sys.argv[1] == "lora"
    out = {}
    for name, mesh in (("single", None), ("mesh", sharding.make_mesh(4, 2))):
      if use_lora:
        train_p = lora.init(params, jax.random.key(1), rank=4)
        frozen, asm = params, (lambda a, b: lora.merge(b, a, 8.0, 4))
      else:
        train_p, frozen, asm = params, None, trainer.identity_assemble
      tr = trainer.Trainer(losses.next_token_loss(cfg), optim.make_optimizer(opt, 3),
                           assemble=asm, mesh=mesh, grad_accum=2)
      st = tr.init_state(train_p, jax.random.key(2))
      fz = tr.shard_params(frozen)
      for i in range(3):
        st, m = tr.train_step(st, fz, src.batch(i))
      ev = tr.evaluate(st, fz, data.eval_batches({"tokens": rows}, 8))
      base = fz if use_lora else st.params  # the weights split over the model axis
      out[name] = (st.params, float(m["loss"]), ev["loss"],
                   spec(base["layers"]["attn"]["q_proj"]["kernel"]))
    (a, la, ea, _), (b, lb, eb, q_spec) = out["single"], out["mesh"]
    emit(diff=diff(a, b), loss=[la, lb], eval_loss=[ea, eb], q_spec=q_spec,
         moved=diff(a, lora.init(params, jax.random.key(1), rank=4) if use_lora else params))
""")


def run_on_mesh(script: str, *args: str) -> list[dict]:
  """Runs `script` on 8 simulated CPU devices; returns the JSON records it printed."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]


def _check_step(rec: dict) -> None:
  assert rec["diff"] < 1e-4, rec  # Adam divides by sqrt(v): reduction-order noise grows
  assert abs(rec["loss"][0] - rec["loss"][1]) < 1e-5, rec
  assert abs(rec["eval_loss"][0] - rec["eval_loss"][1]) < 1e-5, rec
  assert rec["moved"] > 1e-4, rec  # the three steps did train
  assert "model" in rec["q_spec"], rec  # weights really were split over the model axis


def test_sharded_step_equals_single_device_step():
  """Full fine-tuning: three accumulated steps on the mesh give the single-device parameters."""
  (rec,) = run_on_mesh(STEP, "full")
  _check_step(rec)


def test_sharded_lora_step_equals_single_device_step():
  """LoRA: adapters trained against a base split over the mesh give the single-device
  adapters, loss and evaluation loss."""
  (rec,) = run_on_mesh(STEP, "lora")
  _check_step(rec)


# A run's checkpoint written on one device and read on the mesh, and the other way round.
CHECKPOINTS = COMMON + textwrap.dedent("""
    mesh = sharding.make_mesh(4, 2)
    make = lambda m: trainer.Trainer(losses.next_token_loss(cfg), optim.make_optimizer(opt, 6),
                                     mesh=m)
    single, sharded = make(None), make(mesh)
    one_dir, mesh_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    fit = lambda tr, n, wd: tr.fit(tr.init_state(params, jax.random.key(2)), None, src, n,
                                   workdir=wd, checkpoint_every=2, progress=False)
    a = fit(single, 4, one_dir)  # a run on one device, checkpoint at step 4
    other_key = jax.random.key(9)  # restoring must replace everything the template holds
    on_mesh, meta = Checkpointer(os.path.join(one_dir, "checkpoints")).restore(
        sharded.init_state(params, other_key))
    moments_q = [x for path, x in jax.tree_util.tree_flatten_with_path(on_mesh.opt_state)[0]
                 if jax.tree_util.keystr(path).endswith("['q_proj']['kernel']")]
    emit(what="restore_on_mesh", step=int(on_mesh.step), meta_step=meta["step"],
         diff=diff((a.params, a.opt_state, a.key),
                   (on_mesh.params, on_mesh.opt_state, on_mesh.key)),
         q_spec=spec(on_mesh.params["layers"]["attn"]["q_proj"]["kernel"]),
         moment_specs=sorted({spec(x) for x in moments_q}),
         num_moments=len(moments_q))

    b = fit(sharded, 4, mesh_dir)  # a run on the mesh
    on_one, _ = Checkpointer(os.path.join(mesh_dir, "checkpoints")).restore(
        single.init_state(params, other_key))
    emit(what="restore_on_one_device", step=int(on_one.step),
         diff=diff((b.params, b.opt_state, b.key), (on_one.params, on_one.opt_state, on_one.key)),
         q_spec=spec(on_one.params["layers"]["attn"]["q_proj"]["kernel"]))

    batches = data.eval_batches({"tokens": tasks.synthetic_sequences(12, 12, 48, seed=4)}, 8)
    emit(what="trainer_evaluate", single=single.evaluate(a, None, batches),
         mesh=sharded.evaluate(on_mesh, None, batches))

    held = tasks.synthetic_sequences(12, 20, 48, seed=5)
    kw = dict(context_len=8, gen_len=8, num_generations=12, batch_size=4, copy_n=4)
    emit(what="evaluate_lm",  # on the mesh: sharded weights, KV cache created on the mesh
         single=evaluation.evaluate_lm(TransformerLM(cfg), a.params, held, rows, **kw),
         mesh=evaluation.evaluate_lm(TransformerLM(cfg, mesh), on_mesh.params, held, rows, **kw))

    # resuming the one-device run on the mesh continues it as one device would
    shutil.copytree(one_dir, mesh_dir + "-resume")
    ref = fit(single, 6, one_dir)
    resumed = fit(sharded, 6, mesh_dir + "-resume")
    emit(what="resume_on_mesh", step=int(resumed.step), diff=diff(ref.params, resumed.params),
         q_spec=spec(resumed.params["layers"]["attn"]["q_proj"]["kernel"]))
""")

# `experiment.run` (what `python -m train.main` runs): a run started on one device is resumed
# with --config.mesh.data=4 --config.mesh.model=2 (the mesh is not part of the run's identity).
EXPERIMENT = COMMON + textwrap.dedent("""
    from configs import train_tiny
    from models.lm import load_model
    from train import experiment

    def config(steps, data=1, model=1):
      c = train_tiny.get_config()
      c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = steps, 2, 2, 2
      c.mesh.data, c.mesh.model = data, model
      c.evaluate.enabled = True  # before/after report: train.evaluation.evaluate_lm
      c.evaluate.context_len, c.evaluate.gen_len = 8, 8
      c.evaluate.num_generations, c.evaluate.batch_size = 8, 4
      return c

    first = tempfile.mkdtemp()
    experiment.run(config(4), first, progress=False)
    shutil.copytree(first, first + "-mesh")
    one = experiment.run(config(6), first, progress=False)  # resumed on one device
    mesh = experiment.run(config(6, 4, 2), first + "-mesh", progress=False)  # on the mesh
    exported = [load_model(os.path.join(d, "export"), scan_layers=True,
                           fused_projections=False).params for d in (first, first + "-mesh")]
    emit(what="experiment", single=one, mesh=mesh, export_diff=diff(*exported))
""")


@pytest.fixture(scope="module")
def checkpoints():
  return {r["what"]: r for r in run_on_mesh(CHECKPOINTS)}


def test_one_device_checkpoint_restores_on_a_mesh_to_the_same_state(checkpoints):
  rec = checkpoints["restore_on_mesh"]
  assert rec["step"] == rec["meta_step"] == 4
  assert rec["diff"] == 0.0, rec  # parameters, Adam moments and key, bit for bit
  assert rec["q_spec"] == str(P(None, None, "model")), rec  # placed on the mesh
  assert rec["num_moments"] == 2 and rec["moment_specs"] == [rec["q_spec"]], rec  # Adam's
  # first and second moments are sharded like their parameter


def test_mesh_checkpoint_restores_on_one_device_to_the_same_state(checkpoints):
  rec = checkpoints["restore_on_one_device"]
  assert rec["step"] == 4 and rec["diff"] == 0.0, rec
  assert "model" not in rec["q_spec"], rec


def test_evaluation_on_a_mesh_equals_single_device(checkpoints):
  """The restored state's held-out metrics: `Trainer.evaluate` (loss, accuracy, token count)
  and `evaluation.evaluate_lm` (perplexity and entropy; greedy continuations' TTR, copying
  and repetition), sharded and not."""
  ev = checkpoints["trainer_evaluate"]
  assert ev["mesh"]["tokens"] == ev["single"]["tokens"] > 0
  assert ev["mesh"] == pytest.approx(ev["single"], rel=1e-5, abs=1e-6)
  lm = checkpoints["evaluate_lm"]
  assert set(lm["mesh"]) == set(lm["single"]) >= {"perplexity", "mean_entropy", "ttr",
                                                  "copy_fraction", "rep_2"}
  assert lm["mesh"] == pytest.approx(lm["single"], rel=1e-5, abs=1e-6)


def test_one_device_run_resumed_on_a_mesh_continues_as_on_one_device(checkpoints):
  rec = checkpoints["resume_on_mesh"]
  assert rec["step"] == 6 and "model" in rec["q_spec"], rec
  assert rec["diff"] < 1e-4, rec


def test_experiment_resumed_on_a_mesh_reports_and_exports_the_one_device_results():
  """`experiment.run` from a run's step-4 checkpoint to step 6, once on one device and once
  with mesh 4 x 2: the same training records, final evaluation, before/after reports
  (`evaluate_lm`) and exported parameters."""
  (rec,) = run_on_mesh(EXPERIMENT)
  one, mesh = rec["single"], rec["mesh"]
  assert one["steps"] == mesh["steps"] == 6 and "after" in mesh
  assert mesh["final_eval"] == pytest.approx(one["final_eval"], rel=1e-5, abs=1e-6)
  assert mesh["after"] == pytest.approx(one["after"], rel=1e-4, abs=1e-6)
  assert rec["export_diff"] < 1e-4, rec

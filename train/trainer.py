"""A small, general optax trainer: jitted train step, micro-batch gradient accumulation,
periodic evaluation, console + JSONL metrics, orbax checkpoints and exact resumption,
and data/model-parallel sharding on the same `data` x `model` mesh as decoding.

    trainer = Trainer(loss_fn, optimizer, assemble=..., grad_accum=2, mesh=mesh)
    state = trainer.init_state(trainable_params, key)
    state = trainer.fit(state, frozen, data, num_steps, workdir=...)

* `loss_fn(params, batch, key) -> (loss, metrics)` (see `train.losses`); evaluation uses
  `eval_loss_fn` (default: the same loss).
* `trainable` is what the optimizer updates; `frozen` is passed through untouched
  (the base model under LoRA) and `assemble(trainable, frozen)` builds the model
  parameters the loss sees (identity for full fine-tuning, `lora.merge` for LoRA).
* `post_update(params, aux) -> params`, if given, runs after each optimizer update inside
  the jitted step, with the pytree the loss returned as `metrics["aux"]`: non-gradient
  state such as a VQ-VAE's EMA codebook (`models.vqvae`). "aux" is never logged.
* `data.batch(step)` returns the global batch of a step (`train.data`); the step's
  PRNG key is `fold_in(state.key, step)`. Both are pure functions of the step, so a run
  restored from its last checkpoint reproduces the uninterrupted run bit for bit.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from models import sharding as shd
from train.checkpointing import Checkpointer

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array  # [] int32: optimizer updates done
  params: Any  # trainable parameters
  opt_state: Any
  key: Array  # [2] uint32 raw PRNG key; step t uses fold_in(key, t)


def identity_assemble(trainable, frozen):
  """The `assemble` of full fine-tuning (the default): the model parameters are the
  trainable ones; there is nothing frozen."""
  del frozen
  return trainable


class MetricWriter:
  """Appends one JSON object per record to `path` (and nothing when `path` is None)."""

  def __init__(self, path: Optional[str]):
    self.path = path

  def truncate_after(self, step: int) -> None:
    """Drops records of steps > `step` (left by a killed run that is now resuming)."""
    if not self.path or not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
          continue
        if record.get("step", 0) <= step:
          keep.append(json.dumps(record) + "\n")
    with open(self.path, "w") as f:
      f.writelines(keep)

  def write(self, record: dict) -> None:
    if not self.path:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _to_float(tree: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


class ResumeError(ValueError):
  """The checkpoint in the workdir was written by a different experiment."""


def check_resumable(saved: dict, current: dict) -> None:
  """Refuses to resume when the run's `fingerprint` (the settings that change what is
  trained: model, data, loss, optimizer, batch) differs from the checkpoint's; warns when
  only `num_steps` changed, since a decaying schedule then differs from a fresh run."""
  if saved.get("fingerprint") != current.get("fingerprint"):
    raise ResumeError(
        "the workdir holds a checkpoint of a different experiment (its settings differ: "
        f"saved {saved.get('fingerprint')!r}, now {current.get('fingerprint')!r}); use a new "
        "--workdir or delete the old checkpoints")
  if saved.get("num_steps") != current.get("num_steps"):
    logging.warning("resuming a run planned for %s steps with num_steps=%s: the learning-rate "
                    "schedule, if it decays, differs from an uninterrupted run",
                    saved.get("num_steps"), current.get("num_steps"))


class Trainer:

  def __init__(self, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
               assemble: Callable = identity_assemble, grad_accum: int = 1, mesh=None,
               schedule: Optional[optax.Schedule] = None,
               eval_loss_fn: Optional[Callable] = None,
               post_update: Optional[Callable] = None):
    if grad_accum < 1:
      raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if post_update is not None and grad_accum > 1:
      raise ValueError("post_update needs the whole batch's aux: use grad_accum=1")
    self.post_update = post_update
    self.loss_fn = loss_fn
    self.eval_loss_fn = eval_loss_fn or loss_fn  # e.g. plain NLL when training on a mixture
    self.optimizer = optimizer
    self.assemble = assemble
    self.grad_accum = grad_accum
    self.mesh = mesh
    self.schedule = schedule
    self._train_step = None
    self._eval_step = None

  # ---- placement ------------------------------------------------------------------------------

  def shard_params(self, tree: Any) -> Any:
    """Places a parameter-shaped tree on the mesh (partition rules of `models.sharding`)."""
    if self.mesh is None or tree is None:
      return tree
    return shd.shard_params(tree, self.mesh)

  def shard_batch(self, batch: Any) -> Any:
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, batch)
    return shd.shard_batch(batch, self.mesh)

  # ---- state ----------------------------------------------------------------------------------

  def init_state(self, params: Any, key: Array) -> TrainState:
    """Optimizer state for the trainable `params` (placed on the mesh first)."""
    # a private copy: train steps donate the state's buffers, the caller keeps its arrays
    params = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(self.shard_params(params))
    opt_state = jax.jit(self.optimizer.init)(params)
    raw = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    key = jnp.asarray(raw, jnp.uint32)
    if self.mesh is not None:
      rep = NamedSharding(self.mesh, P())
      key = jax.device_put(key, rep)
      step = jax.device_put(jnp.zeros((), jnp.int32), rep)
      specs = shd.param_specs(params, self.mesh)
      opt_state = optax.tree_map_params(  # moments are sharded like their parameters
          self.optimizer, lambda x, spec: jax.device_put(x, NamedSharding(self.mesh, spec)),
          opt_state, specs, transform_non_params=lambda x: jax.device_put(x, rep))
    else:
      step = jnp.zeros((), jnp.int32)
    return TrainState(step=step, params=params, opt_state=opt_state, key=key)

  # ---- steps ----------------------------------------------------------------------------------

  def _loss_and_grads(self, trainable, frozen, batch, key):
    """Loss, metrics and gradients of one update. With `grad_accum = a > 1` the batch is cut
    into `a` strided micro-batches whose results are averaged weighted by each one's
    `tokens` metric (uniformly when a loss reports none), which equals the full-batch mean
    of a token-averaged loss; every micro-batch gets the step's key, so a random choice
    made by the loss (e.g. `losses.mixture`) is the same for the whole update."""
    def objective(tp, mb, k):
      loss, metrics = self.loss_fn(self.assemble(tp, frozen), mb, k)
      return loss, metrics

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    a = self.grad_accum
    if a == 1:
      (loss, metrics), grads = grad_fn(trainable, batch, key)
      return loss, metrics, grads

    def split(x):  # strided micro-batches: each keeps rows from every data shard
      if x.shape[0] % a:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={a}")
      return x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(split, batch)

    def run(mb):
      (loss, metrics), grads = grad_fn(trainable, mb, key)
      w = metrics.get("tokens", jnp.ones((), jnp.float32)).astype(jnp.float32)
      return loss, metrics, grads, w

    def body(acc, mb):
      loss, metrics, grads, w = run(mb)
      metrics = {k: (v if k == "tokens" else v * w) for k, v in metrics.items()}  # counts add
      new = (loss * w, metrics, jax.tree.map(lambda g: g * w, grads), w)
      return jax.tree.map(jnp.add, acc, new), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(run, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss, metrics, grads, total), _ = jax.lax.scan(body, zeros, micro)
    total = jnp.maximum(total, 1e-12)
    mean = lambda x: x / total
    metrics = {k: (v if k == "tokens" else mean(v)) for k, v in metrics.items()}
    return mean(loss), metrics, jax.tree.map(mean, grads)

  def _step_impl(self, state: TrainState, frozen: Any, batch: Any):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    loss, metrics, grads = self._loss_and_grads(state.params, frozen, batch, key)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    aux = metrics.pop("aux", None)
    if self.post_update is not None:
      params = self.post_update(params, aux)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if self.schedule is not None:
      metrics["learning_rate"] = self.schedule(state.step)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=state.key)
    return new, metrics

  def train_step(self, state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict]:
    """One optimizer update on the global batch (jitted; the old state's buffers are donated)."""
    if self._train_step is None:
      out_shardings = None
      if self.mesh is not None:
        out_shardings = (jax.tree.map(lambda x: x.sharding, state), None)
      self._train_step = jax.jit(self._step_impl, donate_argnums=0,
                                 out_shardings=out_shardings)
    return self._train_step(state, frozen, self.shard_batch(batch))

  def eval_step(self, state: TrainState, frozen: Any, batch: Any) -> dict:
    """Loss metrics on a batch without updating (key fixed, so evaluation is deterministic)."""
    if self._eval_step is None:
      def impl(params, frozen, batch):
        loss, metrics = self.eval_loss_fn(self.assemble(params, frozen), batch,
                                          jax.random.key(0))
        metrics = {k: v for k, v in metrics.items() if k != "aux"}
        return dict(metrics, loss=loss)
      self._eval_step = jax.jit(impl)
    return self._eval_step(state.params, frozen, self.shard_batch(batch))

  def evaluate(self, state: TrainState, frozen: Any, batches: Iterable[Any]) -> dict:
    """Metrics averaged over batches, weighted by each batch's `tokens` metric if present."""
    totals, weight = {}, 0.0
    for b in batches:
      m = _to_float(self.eval_step(state, frozen, b))
      w = m.get("tokens", 1.0)
      for k, v in m.items():
        totals[k] = totals.get(k, 0.0) + (v if k == "tokens" else v * w)
      weight += w
    out = {k: (v if k == "tokens" else v / max(weight, 1e-12)) for k, v in totals.items()}
    if "nll" in out:
      out["perplexity"] = float(np.exp(out["nll"]))
    return out

  # ---- the loop -------------------------------------------------------------------------------

  def fit(self, state: TrainState, frozen: Any, data: Any, num_steps: int, *,
          workdir: Optional[str] = None, eval_batches: Optional[Sequence[Any]] = None,
          eval_every: int = 0, checkpoint_every: int = 0, log_every: int = 10, keep: int = 2,
          meta: Optional[dict] = None, hooks: Sequence[Callable] = (),
          progress: bool = True) -> TrainState:
    """Trains until `num_steps` updates, resuming from `workdir/checkpoints` if present.

    Writes `workdir/metrics.jsonl` (records {"split": "train"|"eval", "step", ...}) and a
    checkpoint every `checkpoint_every` steps and at the end. `hooks` are called as
    `hook(step, state, metrics_or_None)` after every step.
    """
    ckpt = writer = None
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep)
      writer = MetricWriter(os.path.join(workdir, "metrics.jsonl"))
      if ckpt.latest_step() is not None:
        saved = ckpt.restore_meta()
        check_resumable(saved.get("extra", {}), meta or {})
        state, saved = ckpt.restore(state)
        logging.info("resumed from step %d (data position %s)", int(state.step),
                     saved.get("data_position"))
        writer.truncate_after(int(state.step))
      else:
        open(writer.path, "w").close()  # a fresh run (or one killed before its first save)
    writer = writer or MetricWriter(None)
    start = int(state.step)
    bar = None
    if progress:
      bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    window: list[dict] = []
    t0, tokens_seen = time.perf_counter(), 0.0

    def save(step):
      if ckpt is not None:
        ckpt.save(step, state, {"step": step, "data_position": step, "extra": meta or {}})

    if eval_batches and eval_every and start == 0:
      rec = {"split": "eval", "step": 0, **self.evaluate(state, frozen, eval_batches)}
      writer.write(rec)
      logging.info("eval %s", rec)
    for step in range(start, num_steps):
      state, metrics = self.train_step(state, frozen, data.batch(step))
      window.append(metrics)
      done = step + 1
      record = None
      if done % max(log_every, 1) == 0 or done == num_steps:
        vals = [_to_float(m) for m in window]
        record = {}
        for k in vals[0]:  # NaN marks a metric not computed this step (untaken mixture branch)
          xs = [v[k] for v in vals if not np.isnan(v[k])]
          if xs:
            record[k] = float(np.mean(xs))
        elapsed = time.perf_counter() - t0
        tokens_seen += sum(v.get("tokens", 0.0) for v in vals)
        record.update(split="train", step=done, steps_per_s=len(vals) / max(elapsed, 1e-9))
        if tokens_seen:
          record["tokens_per_s"] = tokens_seen / max(elapsed, 1e-9)
        t0, tokens_seen, window = time.perf_counter(), 0.0, []
        writer.write(record)
        if bar is not None:
          bar.set_postfix(loss=f"{record['loss']:.4f}")
        logging.info("step %d %s", done, {k: round(v, 5) for k, v in record.items()
                                          if isinstance(v, float)})
      if bar is not None:
        bar.update(1)
      if eval_batches and eval_every and (done % eval_every == 0 or done == num_steps):
        rec = {"split": "eval", "step": done, **self.evaluate(state, frozen, eval_batches)}
        writer.write(rec)
        logging.info("eval %s", rec)
      if checkpoint_every and done % checkpoint_every == 0 and done != num_steps:
        save(done)
      for hook in hooks:
        hook(done, state, record)
    if bar is not None:
      bar.close()
    if ckpt is not None:
      if ckpt.latest_step() != num_steps and int(state.step) == num_steps:
        save(num_steps)
      ckpt.close()
    return state


def fit_rows(loss_fn: Callable, optimizer: optax.GradientTransformation, trainable: Any,
             frozen: Any, rows: dict, *, steps: int, batch_size: int, seed: int = 0,
             assemble: Callable = identity_assemble, salt: int = 0,
             log: Optional[Callable[[int, dict], None]] = None) -> Any:
  """A short fit on in-memory rows (arrays with a leading row axis): `steps` updates, each
  on `batch_size` rows drawn without replacement by (seed, salt, step); returns the
  trainable parameters. `log(step, metrics)` after every update. For warm-ups and small
  heads, where a data pipeline, checkpoints and evaluation would be overhead."""
  trainer = Trainer(loss_fn, optimizer, assemble=assemble)
  state = trainer.init_state(trainable, jax.random.key(seed))
  n = len(next(iter(rows.values())))
  for s in range(steps):
    idx = np.random.default_rng([seed, salt, s]).choice(n, min(batch_size, n), replace=False)
    state, m = trainer.train_step(state, frozen, {k: v[idx] for k, v in rows.items()})
    if log is not None:
      log(s + 1, jax.device_get(m))
  return state.params

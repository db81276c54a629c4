"""Builds and runs one training experiment from its config (the library side of
`python -m train.main`; importable without defining command-line flags).

`run(config, workdir)` resumes from the last checkpoint in `workdir/checkpoints` if there is
one, and writes `workdir/metrics.jsonl`, `workdir/config.json`, `workdir/results.json` (the
task's before/after report, when enabled) and `workdir/export/`, an `lm` artifact folder
(`models.lm.save_lm`) that `load_model(workdir/export)` and the decoding CLI
(`--config.model=...`) read.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
from absl import logging

from models import sharding
from models.lm import save_lm
from train import ditto, lora, model_setup, optim, tasks, trainer as trainer_lib


def validate(config: Any) -> None:
  """Config errors, raised before any model is loaded or compiled."""
  optim.validate(config.optimizer)
  if config.task not in tasks.TASKS:
    raise ValueError(f"unknown task {config.task!r}; choose from {sorted(tasks.TASKS)}")
  for name in ("batch_size", "eval_batch_size", "grad_accum"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")
  if config.batch_size % config.grad_accum:
    raise ValueError(f"batch_size ({config.batch_size}) must be divisible by grad_accum "
                     f"({config.grad_accum})")
  if config.num_steps < 0 or config.num_epochs < 0 or not (config.num_steps or config.num_epochs):
    raise ValueError("set num_steps > 0 or num_epochs > 0")
  if config.lora.rank < 0:
    raise ValueError(f"lora.rank must be >= 0 (0 = full fine-tuning), got {config.lora.rank}")
  if config.data.seq_len < 2:
    raise ValueError(f"data.seq_len must be >= 2, got {config.data.seq_len}")
  if config.lora.rank and config.lora.alpha <= 0:
    raise ValueError(f"lora.alpha must be > 0, got {config.lora.alpha}")
  for name in ("log_every", "eval_every", "checkpoint_every"):
    if int(config[name]) < 0:
      raise ValueError(f"{name} must be >= 0, got {config[name]}")
  if config.task == "ditto":
    ditto.validate(config.ditto.gamma, config.ditto.variant, config.ditto.rate)
    if config.data.source != "text_corpus":
      raise ValueError("task 'ditto' needs data.source='text_corpus' (sentences of real text)")
  if config.evaluate.enabled and config.evaluate.context_len >= config.data.seq_len:
    raise ValueError(f"evaluate.context_len ({config.evaluate.context_len}) must be shorter "
                     f"than data.seq_len ({config.data.seq_len}): contexts are cut from "
                     "held-out rows")
  data = config.mesh.data
  if data < 1 or config.mesh.model < 1:
    raise ValueError("mesh.data and mesh.model must be >= 1")
  if (config.batch_size // config.grad_accum) % data:
    raise ValueError(f"the micro-batch ({config.batch_size // config.grad_accum}) must be "
                     f"divisible by mesh.data ({data})")


def run(config: Any, workdir: str, progress: bool = True) -> dict:
  """Builds model, task and trainer from the config and trains; returns the results dict."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  mesh = None
  if config.mesh.data * config.mesh.model > 1:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  model = model_setup.build(config.model, seed=config.seed)
  task = tasks.build(config, model)
  num_steps = config.num_steps or config.num_epochs * task.steps_per_epoch
  schedule = optim.make_schedule(config.optimizer, num_steps)
  optimizer = optim.make_optimizer(config.optimizer, num_steps)
  init_key, key = jax.random.split(jax.random.key(config.seed))
  if config.data.seq_len > model.config.max_position_embeddings:
    raise ValueError(f"data.seq_len={config.data.seq_len} exceeds the model's "
                     f"{model.config.max_position_embeddings} positions")
  if config.lora.rank:
    rank, alpha = config.lora.rank, config.lora.alpha
    targets = tuple(config.lora.targets)
    trainable = lora.init(model.params, init_key, rank, targets)
    assemble = lambda adapters, base: lora.merge(base, adapters, alpha, rank)
    frozen = model.params
  else:
    trainable, frozen, assemble = model.params, None, trainer_lib.identity_assemble
  trainer = trainer_lib.Trainer(task.loss_fn, optimizer, assemble=assemble,
                                grad_accum=config.grad_accum, mesh=mesh, schedule=schedule,
                                eval_loss_fn=task.eval_loss_fn)
  if frozen is not None:
    frozen = trainer.shard_params(frozen)
  logging.info("task %s: %d steps (%d per epoch), %d trainable parameters", config.task,
               num_steps, task.steps_per_epoch, lora.num_params(trainable))

  results_path = os.path.join(workdir, "results.json")
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  if task.report is not None and "before" not in results:
    t = time.perf_counter()
    results["before"] = task.report(model.params)
    logging.info("before training: %s (%.1f s)", results["before"], time.perf_counter() - t)
    with open(results_path, "w") as f:
      json.dump(results, f, indent=1)

  state = trainer.init_state(trainable, key)
  state = trainer.fit(state, frozen, task.train_data, num_steps, workdir=workdir,
                      eval_batches=task.eval_batches, eval_every=config.eval_every,
                      checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                      keep=config.keep_checkpoints, progress=progress,
                      meta={"task": config.task, "num_steps": num_steps,
                            "fingerprint": fingerprint(config)})
  final = assemble(state.params, frozen)
  results["steps"] = num_steps
  results["final_eval"] = trainer.evaluate(state, frozen, task.eval_batches)
  if task.report is not None:
    t = time.perf_counter()
    results["after"] = task.report(final)
    logging.info("after training: %s (%.1f s)", results["after"], time.perf_counter() - t)
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1)
  if config.get("export", True):
    save_lm(
        os.path.join(workdir, "export"), model.config.replace(remat=False), final,
        tokenizer_metadata=model_setup.tokenizer_metadata(model.tokenizer),
        instruct=model.instruct,
        info={"source": model.source, "task": config.task, "steps": num_steps,
              "lora": dict(config.lora) if config.lora.rank else None})
  return results


VOLATILE = ("num_steps", "num_epochs", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints", "export", "evaluate", "mesh", "eval_batch_size")


def fingerprint(config: Any) -> str:
  """sha256 (16 hex digits) of the settings that determine the trained parameters: all of
  the config except run length, logging/checkpoint cadence, evaluation and the mesh."""
  d = {k: v for k, v in config.to_dict().items() if k not in VOLATILE}
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

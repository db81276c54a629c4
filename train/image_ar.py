"""Trains the class-conditional image-token model (`models.image_ar`) with the trainer.

    python -m train.image_ar --config=configs/image_ar_fmnist.py [--workdir=DIR]

Encodes Fashion-MNIST (train and test splits, through the tfds builder) with the shipped VQ-VAE,
trains a Llama decoder on [class, codes] rows with condition dropout, and reports the test NLL
per image token (nats and bits) with the true class and with the null class (how much the
condition is worth). With `ship.enabled` the model is written as an `lm` artifact
(`models.lm.save_lm`) whose info names the tokenizer and the token layout, with the class names.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import artifacts, datasets, image_ar, registry, transformer, vqvae
from models.config import ModelConfig
from models.datasets.fashion_mnist import CLASS_NAMES
from models.lm import save_lm
from train import data as data_lib, losses, optim, script, trainer as trainer_lib


def validate(config: Any) -> None:
  optim.validate(config.optimizer)
  for name in ("batch_size", "num_steps", "num_classes"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")
  check_conditioning(config)


def check_conditioning(config: Any) -> None:
  """The condition-dropout rate is in [0, 1) and the VQ tokenizer `config.tokenizer` exists."""
  if not 0.0 <= float(config.cond_dropout) < 1.0:
    raise ValueError(f"cond_dropout must be in [0, 1), got {config.cond_dropout}")
  try:
    artifacts.read_manifest(config.tokenizer, "vq_tokenizer")
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"tokenizer {config.tokenizer!r} not found or unreadable ({e}); produce "
                     "it with python -m train.vqvae --config=configs/vqvae_fmnist.py") from e


def encode_split(tok: vqvae.VQVAE, tok_params, images: np.ndarray,
                 batch_size: int = 1000) -> np.ndarray:
  fn = jax.jit(lambda x: tok.encode(tok_params, x))
  return np.concatenate([np.asarray(fn(jnp.asarray(images[i:i + batch_size])))
                         for i in range(0, len(images), batch_size)])


def run(config: Any, workdir: str, progress: bool = True) -> dict:
  validate(config)
  t0 = time.perf_counter()
  workdir = script.prepare_workdir(config, workdir)
  tok, tok_params, _ = vqvae.load(config.tokenizer)
  layout = image_ar.ImageTokens(tok.config.codebook_size, int(config.num_classes),
                                tok.config.grid, CLASS_NAMES)  # the data is Fashion-MNIST
  rows = {}
  for split in ("train", "test"):
    arr = datasets.load_arrays("fashion_mnist", split)
    rows[split] = layout.sequences(arr["label"], encode_split(tok, tok_params, arr["image"]))
  mcfg = ModelConfig(vocab_size=layout.vocab_size, **dict(config.model))
  if mcfg.max_position_embeddings < 1 + layout.num_tokens:
    raise ValueError("model.max_position_embeddings is shorter than a sequence")
  key = jax.random.PRNGKey(int(config.seed))
  params = transformer.init_params(mcfg, key)
  nll = losses.next_token_loss(mcfg)
  schedule = optim.make_schedule(config.optimizer, int(config.num_steps))
  trainer = trainer_lib.Trainer(
      image_ar.cond_dropout_loss(nll, layout, float(config.cond_dropout)),
      optim.make_optimizer(config.optimizer, int(config.num_steps)), schedule=schedule,
      eval_loss_fn=nll)
  state = trainer.init_state(params, jax.random.fold_in(key, 1))
  data = data_lib.ArrayData({"tokens": rows["train"]}, int(config.batch_size),
                            seed=int(config.seed))
  evals = data_lib.eval_batches({"tokens": rows["test"][:int(config.num_eval)]}, 500)
  state = trainer.fit(state, None, data, int(config.num_steps), workdir=workdir,
                      eval_batches=evals, eval_every=int(config.eval_every),
                      log_every=int(config.log_every), progress=progress,
                      meta={"config": json.loads(config.to_json_best_effort())})
  params = jax.device_get(state.params)
  test = rows["test"]
  uncond = test.copy()
  uncond[:, 0] = layout.null_class
  cond_nll = trainer.evaluate(state, None, data_lib.eval_batches({"tokens": test}, 500))["nll"]
  null_nll = trainer.evaluate(state, None, data_lib.eval_batches({"tokens": uncond}, 500))["nll"]
  result = {"test_nll_per_token": cond_nll, "test_bits_per_token": cond_nll / math.log(2),
            "test_nll_per_token_null_class": null_nll, "num_test_images": len(test),
            "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
            "num_steps": int(config.num_steps), "train_seconds": time.perf_counter() - t0}
  if config.ship.enabled:
    path = registry.repo_path(config.ship.path)
    save_lm(path, mcfg, params, info={
        "image_tokens": layout.to_dict(), "tokenizer": config.tokenizer,
        "trained_with": "python -m train.image_ar --config=configs/image_ar_fmnist.py",
        **result})
    result["shipped"] = path
  return script.finish_run(result, workdir)


if __name__ == "__main__":
  script.run_script(run, validate=validate, run_name=lambda c: "image_ar_fmnist")

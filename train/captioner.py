"""Trains the image captioner (`models.captioner`) on captioned Fashion-MNIST scenes.

    python -m train.captioner --config=configs/captioner_fmnist.py [--workdir=DIR]

Renders the scenes (`models.datasets.fashion_captions`), encodes them with the shipped VQ-VAE,
and trains a Llama decoder on [codes, BOS, caption, EOS] rows (each scene once per reference
caption) with condition dropout: with probability `cond_dropout` a row's image codes all
become the null image token, so the same network learns p(caption | image) and
p(caption | no image). Reports the test NLL per caption token with the image and without it
(how much the image is worth). With `ship.enabled` the model is written as an `lm` artifact
whose info holds the token layout and the tokenizer's name.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import captioner, registry, transformer, vqvae
from models.config import ModelConfig
from models.datasets import fashion_captions
from models.lm import save_lm
from train import data as data_lib, losses, optim, script, trainer as trainer_lib
from train.image_ar import check_conditioning, encode_split


def validate(config: Any) -> None:
  optim.validate(config.optimizer)
  for name in ("batch_size", "num_steps", "train_scenes", "test_scenes", "row_length"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")
  check_conditioning(config)


def image_dropout_loss(base_loss, layout: captioner.CaptionTokens, rate: float):
  """Wraps a next-token loss: with probability `rate` a row's image codes all become the null
  image token (classifier-free guidance training, "Classifier-Free Diffusion Guidance", Ho &
  Salimans, 2022)."""
  def loss_fn(params, batch, key):
    k_drop, key = jax.random.split(key)
    tokens = batch["tokens"]
    drop = jax.random.bernoulli(k_drop, rate, (tokens.shape[0], 1))
    image = jnp.arange(tokens.shape[1])[None] < layout.image_tokens
    tokens = jnp.where(drop & image, layout.null_image, tokens)
    return base_loss(params, {**batch, "tokens": tokens}, key)
  return loss_fn


def scene_rows(layout, tok, tok_params, split: str, n: int, length: int, seed: int):
  """(rows [n * refs, length], loss mask) of `n` scenes of `split`, one row per reference."""
  _, images, refs = fashion_captions.scenes(split, n, seed)
  codes = encode_split(tok, tok_params, images)
  flat_codes = np.repeat(codes, len(refs[0]), axis=0)
  rows = layout.rows(flat_codes, [c for r in refs for c in r], length)
  return rows, layout.loss_mask(rows)


def run(config: Any, workdir: str, progress: bool = True) -> dict:
  validate(config)
  t0 = time.perf_counter()
  workdir = script.prepare_workdir(config, workdir)
  tok, tok_params, _ = vqvae.load(config.tokenizer)
  g = fashion_captions.CANVAS // (tok.config.image_size // tok.config.grid)
  layout = captioner.CaptionTokens(tok.config.codebook_size, g * g, fashion_captions.words())
  seed, length = int(config.seed), int(config.row_length)
  train_rows, train_mask = scene_rows(layout, tok, tok_params, "train",
                                      int(config.train_scenes), length, seed)
  test_rows, test_mask = scene_rows(layout, tok, tok_params, "test", int(config.test_scenes),
                                    length, seed)
  mcfg = ModelConfig(vocab_size=layout.vocab_size, **dict(config.model))
  if mcfg.max_position_embeddings < length:
    raise ValueError("model.max_position_embeddings is shorter than a row")
  key = jax.random.PRNGKey(seed)
  params = transformer.init_params(mcfg, key)
  nll = losses.next_token_loss(mcfg)
  schedule = optim.make_schedule(config.optimizer, int(config.num_steps))
  trainer = trainer_lib.Trainer(
      image_dropout_loss(nll, layout, float(config.cond_dropout)),
      optim.make_optimizer(config.optimizer, int(config.num_steps)), schedule=schedule,
      eval_loss_fn=nll)
  state = trainer.init_state(params, jax.random.fold_in(key, 1))
  data = data_lib.ArrayData({"tokens": train_rows, "loss_mask": train_mask},
                            int(config.batch_size), seed=seed)
  evals = data_lib.eval_batches({"tokens": test_rows, "loss_mask": test_mask}, 500)
  state = trainer.fit(state, None, data, int(config.num_steps), workdir=workdir,
                      eval_batches=evals, eval_every=int(config.eval_every),
                      log_every=int(config.log_every), progress=progress,
                      meta={"config": json.loads(config.to_json_best_effort())})
  params = jax.device_get(state.params)
  null_rows = np.where(np.arange(length)[None] < layout.image_tokens, layout.null_image,
                       test_rows)
  cond_nll = trainer.evaluate(state, None, evals)["nll"]
  null_nll = trainer.evaluate(state, None, data_lib.eval_batches(
      {"tokens": null_rows, "loss_mask": test_mask}, 500))["nll"]
  result = {"test_nll_per_caption_token": cond_nll,
            "test_nll_per_caption_token_without_image": null_nll,
            "num_test_rows": len(test_rows), "num_train_rows": len(train_rows),
            "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
            "num_steps": int(config.num_steps), "train_seconds": time.perf_counter() - t0}
  if config.ship.enabled:
    path = registry.repo_path(config.ship.path)
    save_lm(path, mcfg, params, info={
        "caption_tokens": layout.to_dict(), "tokenizer": config.tokenizer,
        "cond_dropout": float(config.cond_dropout), "scene_seed": seed,
        "trained_with": config.ship.trained_with or
                        "python -m train.captioner --config=configs/captioner_fmnist.py",
        **result})
    result["shipped"] = path
  return script.finish_run(result, workdir)


if __name__ == "__main__":
  script.run_script(run, validate=validate, run_name=lambda c: "captioner_fmnist")

"""Trains the VQ-VAE image tokenizer (`models.vqvae`) on Fashion-MNIST with the trainer.

    python -m train.vqvae --config=configs/vqvae_fmnist.py [--workdir=DIR]

The codebook follows EMA statistics and restarts dead codes inside the trainer's jitted step
(`Trainer(post_update=VQVAE.vq_update)`); the encoder/decoder get the optimizer. The codebook
starts from encoder outputs of the first batch. At the end: reconstruction MSE (per pixel, [0, 1]
scale) and codebook usage (codes used, perplexity of the code histogram) over the whole test
split, written to `workdir/results.json` and, with `ship.enabled`, into the shipped checkpoint's
manifest.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import datasets, registry, vqvae
from train import data as data_lib, optim, script, trainer as trainer_lib


def validate(config: Any) -> None:
  vqvae.VQConfig(**{k: (tuple(v) if k == "hidden" else v) for k, v in config.vq.items()})
  optim.validate(config.optimizer)
  for name in ("batch_size", "num_steps"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")


def model_from_config(config: Any) -> vqvae.VQVAE:
  return vqvae.VQVAE(vqvae.VQConfig(**{k: (tuple(v) if k == "hidden" else v)
                                        for k, v in config.vq.items()}))


def code_statistics(model: vqvae.VQVAE, params: dict, images: np.ndarray,
                    batch_size: int = 500) -> dict:
  """Reconstruction MSE per pixel ([0, 1] scale), codes used and the perplexity of the code
  histogram over `images` (uint8 [N, H, W, C])."""
  @jax.jit
  def run(x):
    codes = model.encode(params, x)
    recon = model.decode(params, codes)
    err = jnp.sum((recon - x.astype(jnp.float32) / 255.0) ** 2)
    return err, jnp.bincount(codes.reshape(-1), length=model.config.codebook_size)

  err, counts = 0.0, np.zeros(model.config.codebook_size, np.int64)
  for i in range(0, len(images), batch_size):
    e, c = run(jnp.asarray(images[i:i + batch_size]))
    err += float(e)
    counts += np.asarray(c)
  p = counts / counts.sum()
  nz = p[p > 0]
  return {"recon_mse": err / images[:, :, :, :].size, "codes_used": int((counts > 0).sum()),
          "codebook_size": model.config.codebook_size,
          "code_perplexity": float(np.exp(-(nz * np.log(nz)).sum())), "num_images": len(images)}


def run(config: Any, workdir: str, progress: bool = True) -> dict:
  validate(config)
  t0 = time.perf_counter()
  workdir = script.prepare_workdir(config, workdir)
  train = datasets.load_arrays("fashion_mnist", "train", features=("image",))
  test = datasets.load_arrays("fashion_mnist", "test", features=("image",))["image"]
  model = model_from_config(config)
  key = jax.random.PRNGKey(int(config.seed))
  params = model.init(key)
  # codebook from encoder outputs of a first batch (the EMA sums match: counts are 1)
  z = model.encode_features(params, jnp.asarray(train["image"][:config.batch_size]))
  z = z.reshape(-1, z.shape[-1])
  pick = jax.random.choice(jax.random.fold_in(key, 1), z.shape[0],
                           (model.config.codebook_size,), replace=False)
  params["vq"] = dict(params["vq"], codebook=z[pick], ema_sum=z[pick])
  schedule = optim.make_schedule(config.optimizer, int(config.num_steps))
  opt = optax.masked(optim.make_optimizer(config.optimizer, int(config.num_steps)),
                     vqvae.trainable_mask(params))
  trainer = trainer_lib.Trainer(model.loss, opt, schedule=schedule,
                                post_update=model.vq_update)
  state = trainer.init_state(params, jax.random.fold_in(key, 2))
  data = data_lib.ArrayData(train, int(config.batch_size), seed=int(config.seed))
  evals = data_lib.eval_batches({"image": test[:int(config.num_eval)]}, 500)
  state = trainer.fit(state, None, data, int(config.num_steps), workdir=workdir,
                      eval_batches=evals, eval_every=int(config.eval_every),
                      log_every=int(config.log_every), progress=progress,
                      meta={"config": json.loads(config.to_json_best_effort())})
  params = jax.device_get(state.params)
  stats = code_statistics(model, params, test)
  result = {"test": stats, "num_steps": int(config.num_steps),
            "train_seconds": time.perf_counter() - t0, "workdir": workdir}
  if config.ship.enabled:
    path = registry.repo_path(config.ship.path)
    vqvae.save(path, model, params, info={"trained_with": "python -m train.vqvae "
                                          "--config=configs/vqvae_fmnist.py", **result,
                                          "workdir": None})
    result["shipped"] = path
  return script.finish_run(result, workdir)


if __name__ == "__main__":
  script.run_script(run, validate=validate, run_name=lambda c: "vqvae_fmnist")

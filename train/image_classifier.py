"""Trains the Fashion-MNIST classifier (`models.image_classifier`) used by the image metrics.

    python -m train.image_classifier --config=configs/classifier_fmnist.py [--workdir=DIR]

Reports test accuracy and the FID between the train and test splits' features (the floor a
generator that matched the data distribution would reach with 10000 samples).
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np

from models import datasets, image_classifier, registry
from train import data as data_lib, optim, script, trainer as trainer_lib


def validate(config: Any) -> None:
  optim.validate(config.optimizer)
  for name in ("batch_size", "num_steps", "feature_dim"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")


def run(config: Any, workdir: str, progress: bool = True) -> dict:
  validate(config)
  t0 = time.perf_counter()
  workdir = script.prepare_workdir(config, workdir)
  train = datasets.load_arrays("fashion_mnist", "train")
  test = datasets.load_arrays("fashion_mnist", "test")
  model = image_classifier.ImageClassifier(feature_dim=int(config.feature_dim))
  key = jax.random.PRNGKey(int(config.seed))
  schedule = optim.make_schedule(config.optimizer, int(config.num_steps))
  trainer = trainer_lib.Trainer(model.loss, optim.make_optimizer(config.optimizer,
                                                                 int(config.num_steps)),
                                schedule=schedule, eval_loss_fn=model.eval_loss)
  state = trainer.init_state(model.init(key), jax.random.fold_in(key, 1))
  data = data_lib.ArrayData(train, int(config.batch_size), seed=int(config.seed))
  evals = data_lib.eval_batches(test, 500)
  state = trainer.fit(state, None, data, int(config.num_steps), workdir=workdir,
                      eval_batches=evals, eval_every=int(config.eval_every),
                      log_every=int(config.log_every), progress=progress,
                      meta={"config": json.loads(config.to_json_best_effort())})
  params = jax.device_get(state.params)
  f_test, pred = model.features_and_predictions(params, test["image"])
  f_train, _ = model.features_and_predictions(params, train["image"][:10000])
  result = {"test_accuracy": float(np.mean(pred == test["label"])),
            "fid_train10k_vs_test": image_classifier.fid(f_train, f_test),
            "num_steps": int(config.num_steps), "train_seconds": time.perf_counter() - t0}
  if config.ship.enabled:
    path = registry.repo_path(config.ship.path)
    image_classifier.save(path, model, params, info={
        "trained_with": "python -m train.image_classifier --config=configs/classifier_fmnist.py",
        **result})
    result["shipped"] = path
  return script.finish_run(result, workdir)


if __name__ == "__main__":
  script.run_script(run, validate=validate, run_name=lambda c: "classifier_fmnist")

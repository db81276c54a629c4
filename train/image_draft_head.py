"""Trains an EAGLE / FSPAD draft head for the image-token model (`models.image_ar`).

    python -m train.image_draft_head --config=configs/eagle_image_fmnist.py [--workdir=DIR]

The same head, loss and acceptance measurement as the text heads (`train.draft_head`: one
decoder layer over (target feature, next token), SmoothL1 feature regression plus the
target-distribution cross-entropy, optional feature sampling / partial alignment), here on
image sequences [class, code_1, ..., code_{g*g}]: the target's features come from one
teacher-forced pass over Fashion-MNIST training images encoded by the shipped VQ-VAE (real
images with their true class, not the target's own samples; our choice, as the text heads
train on the target's greedy answers). Held-out rows come from the test split. Every variant
in `config.variants` gets the same updates; the one with the most accepted drafts per
held-out greedy chain is shipped (`models.eagle_head.save_head`), tied to the target by its
artifact's params sha256 (`models.image_ar.ImageModel.sha256`).

At decoding time under classifier-free guidance the head runs on both streams' features and
drafts from the guided combination of its two distributions, the distribution the verifier
checks against (`decoding.image_strategies`, strategy "eagle"). So it is trained on both:
`uncond_fraction` of the training images carry the null class, as the target's own training
dropped the class.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

from models import datasets
from models import eagle_head as dh
from models import image_ar, registry
from train import draft_head as text_head
from train import script
from train.image_ar import encode_split


def validate(config: Any) -> None:
  unknown = [v for v in config.variants if v not in text_head.VARIANTS]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {sorted(text_head.VARIANTS)}")
  for name in ("num_train", "num_heldout", "num_steps", "batch_size"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")


def image_examples(model: image_ar.ImageModel, split: str, num: int,
                   uncond_fraction: float = 0.0, seed: int = 0) -> list[dict]:
  """The first `num` images of a Fashion-MNIST split as {prompt_ids: [class], answer_ids:
  codes} examples for `train.draft_head.target_arrays`; a seeded `uncond_fraction` of them
  with the null class instead (the unconditional stream of classifier-free guidance)."""
  arr = datasets.load_arrays("fashion_mnist", split)
  codes = encode_split(model.tokenizer, model.tokenizer_params, arr["image"][:num])
  labels = np.asarray(arr["label"][:num]).copy()
  if uncond_fraction > 0:
    drop = np.random.RandomState(seed).rand(len(labels)) < uncond_fraction
    labels[drop] = -1  # `ImageTokens.sequences`: -1 is the null class
  rows = model.layout.sequences(labels, codes)
  return [{"prompt_ids": [int(r[0])], "answer_ids": [int(x) for x in r[1:]]} for r in rows]


def run(config: Any, workdir: str) -> dict:
  validate(config)
  t0 = time.perf_counter()
  workdir = script.prepare_workdir(config, workdir)
  model = image_ar.load_image_model(config.model)
  lm, params = model.lm, model.params
  sha = model.weights_sha256
  entry = registry.entry_for(config.model)  # the target's registered name, if it has one
  target_name = entry.name if entry is not None else config.model
  seq_len = 1 + model.layout.num_tokens
  log = lambda s: print(s, flush=True)
  arrays = {}
  for split, num in (("train", config.num_train), ("test", config.num_heldout)):
    # held-out chains stay conditional (comparable across runs); training sees both streams
    frac = float(config.get("uncond_fraction", 0.0)) if split == "train" else 0.0
    ex = image_examples(model, split, int(num), frac, int(config.seed))
    arrays[split] = text_head.target_arrays(lm, params, ex, seq_len, int(config.feature_batch),
                                            pad_id=0, log=lambda s: None)
  feat_s = time.perf_counter() - t0
  out_w = dh.output_weights(params, dh.HeadConfig(lm.config))
  base = dh.HeadConfig(lm.config.replace(remat=False, scan_layers=False),
                       partial_fraction=float(config.partial_fraction))
  summary = {"target": target_name, "target_sha256": sha, "train_rows": int(config.num_train),
             "heldout_rows": int(config.num_heldout), "feature_seconds": feat_s,
             "variants": {}}
  trained, best = text_head.compare_variants(base, out_w, arrays["train"], arrays["test"],
                                             config, workdir, summary, log)
  if config.ship.enabled:
    head, hp = trained[best]
    res = summary["variants"][best]
    meta = {"target": target_name, "variant": best, "options": text_head.VARIANTS[best],
            "trained_by": " ".join(["python -m train.image_draft_head"] + sys.argv[1:]),
            "steps": res["steps"], "train_rows": int(config.num_train),
            "heldout_acceptance": res["heldout_acceptance_bf16"]}
    path = image_ar.repo_path(config.ship.path)
    dh.save_head(path, head, hp, meta, target_name=target_name, target_sha256=sha)
    summary["shipped"] = path
  summary["total_seconds"] = time.perf_counter() - t0
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  for name, res in summary["variants"].items():
    a = res["heldout_acceptance_bf16"]
    log(f"{name:8s} top1 {a['top1']:.3f}  E[accepted of {config.eval.depth}] "
        f"{a['expected_accepted']:.3f}  tau {a['tau']:.3f}")
  return summary


if __name__ == "__main__":
  script.run_script(run, validate=validate, run_name=lambda c: "eagle_image_fmnist",
                    print_result=False)

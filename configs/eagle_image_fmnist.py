"""EAGLE / FSPAD draft head for the Fashion-MNIST image-token model (`train.image_draft_head`).

    python -m train.image_draft_head --config=configs/eagle_image_fmnist.py

Needs checkpoints/image-ar-fmnist (configs/image_ar_fmnist.py). Target features of 10000
training images (teacher-forced, true classes), 500 test images held out for the chain
acceptance. The four variants (EAGLE, + feature sampling, + partial alignment, both) get the
same AdamW updates (batch 32 sequences = 1568 feature pairs) with EAGLE's loss (SmoothL1 +
0.1 CE over every pair, input noise U(-0.1, 0.1)); the best on held-out chains of 5 drafts
is shipped to checkpoints/eagle-image-fmnist. A tenth of the training images carry the null
class, so the head also knows the unconditional stream it drafts on under guidance.

The shipped head is the `fs` variant of a run with `--config.variants="('fs',)"` (the four-way
comparison without unconditional rows chose it; its numbers are in the README).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "checkpoints/image-ar-fmnist"
  c.num_train = 10000
  c.num_heldout = 500
  c.uncond_fraction = 0.1  # training images with the null class (the target's class dropout)
  c.feature_batch = 500
  c.partial_fraction = 0.5
  c.loss = ml_collections.ConfigDict(dict(w_cls=0.1, noise=0.1, beta=1.0, ce_pairs=0))
  c.logit_window = 0  # CE over every pair (the vocabulary is small)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-3, schedule="cosine", warmup_steps=50,
      end_lr_fraction=0.05, weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=0.5))
  c.variants = ("eagle", "fs", "pad", "fs_pad")
  c.batch_size = 32
  c.num_steps = 1500
  c.log_every = 250
  c.eval_every = 0
  c.eval = ml_collections.ConfigDict(dict(depth=5, batch_size=100, also_float32=False))
  c.ship = ml_collections.ConfigDict(dict(enabled=True, path="checkpoints/eagle-image-fmnist"))
  return c

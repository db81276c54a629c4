"""VQ-VAE image tokenizer on Fashion-MNIST (28x28 -> 7x7 = 49 tokens from a codebook of 256).

    python -m train.vqvae --config=configs/vqvae_fmnist.py

EMA codebook (decay 0.99) with dead-code restarts, commitment weight 0.25 ("Neural Discrete
Representation Learning"); Adam at 1e-3 with cosine decay. Reads Fashion-MNIST through the
project's tfds builder (Debian dataset-fashion-mnist). Writes the run to --workdir and, when
ship.enabled, the tokenizer to checkpoints/vqvae-fmnist.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.vq = ml_collections.ConfigDict(dict(
      image_size=28, channels=1, hidden=(32, 64), num_res_blocks=2, codebook_size=256,
      code_dim=16, beta=0.25, decay=0.99, epsilon=1e-5, restart_below=1.0))
  c.batch_size = 128
  c.num_steps = 2000
  c.log_every = 100
  c.eval_every = 1000
  c.num_eval = 2000  # test images in the periodic evaluation (the final one uses all 10000)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, schedule="cosine", warmup_steps=100,
      end_lr_fraction=0.1, grad_clip=1.0))
  c.ship = ml_collections.ConfigDict(dict(enabled=True, path="checkpoints/vqvae-fmnist"))
  return c

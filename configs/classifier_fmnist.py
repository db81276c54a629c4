"""The Fashion-MNIST classifier behind the image metrics (FID features, class accuracy).

    python -m train.image_classifier --config=configs/classifier_fmnist.py
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.feature_dim = 128
  c.batch_size = 128
  c.num_steps = 1500  # 3.2 epochs
  c.log_every = 100
  c.eval_every = 1000
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=100,
      end_lr_fraction=0.05, weight_decay=1e-4, grad_clip=1.0))
  c.ship = ml_collections.ConfigDict(dict(enabled=True, path="checkpoints/classifier-fmnist"))
  return c

"""Image captioner over VQ tokens of captioned Fashion-MNIST scenes, with condition dropout.

    python -m train.captioner --config=configs/captioner_fmnist.py

Needs the tokenizer (checkpoints/vqvae-fmnist). Scenes: 20000 from the Fashion-MNIST train
split (`models.datasets.fashion_captions`, seed 0), 5 reference captions each; a row is
[100 image codes, BOS, caption, EOS] and the loss scores the caption. Every image code is
replaced by the null image token with probability 0.2 (condition dropout, for classifier-free
guidance; the paper leaves the rate open, 0.1-0.2 is the usual range). A 4-layer Llama decoder
(hidden 128, 4 heads) trained with AdamW, batch 64, 3000 steps.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = "checkpoints/vqvae-fmnist"
  c.train_scenes = 20000
  c.test_scenes = 1000
  c.row_length = 120
  c.cond_dropout = 0.2
  c.model = ml_collections.ConfigDict(dict(
      hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
      intermediate_size=384, rope_theta=10000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=False, max_position_embeddings=128))
  c.batch_size = 64
  c.num_steps = 3000
  c.log_every = 100
  c.eval_every = 500
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-3, schedule="cosine", warmup_steps=100,
      end_lr_fraction=0.05, weight_decay=0.01, b1=0.9, b2=0.95, grad_clip=1.0))
  # trained_with: how the shipped model was made, when not by this file as it is
  c.ship = ml_collections.ConfigDict(dict(enabled=True, path="checkpoints/captioner-fmnist",
                                          trained_with=""))
  return c

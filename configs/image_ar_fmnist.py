"""Class-conditional AR transformer over the VQ-VAE's Fashion-MNIST tokens (LlamaGen style).

    python -m train.image_ar --config=configs/image_ar_fmnist.py

Needs the tokenizer (checkpoints/vqvae-fmnist, from configs/vqvae_fmnist.py). Sequences are
[class token, 49 codes]; the class token is dropped to the null class with probability 0.1
(for classifier-free guidance). A 4-layer Llama decoder (hidden 128, 4 heads, 0.9M parameters)
trained with AdamW for 2500 steps of 64 sequences (2.7 epochs; ~20 min on 2 CPU cores).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = "checkpoints/vqvae-fmnist"
  c.num_classes = 10
  c.cond_dropout = 0.1
  c.model = ml_collections.ConfigDict(dict(
      hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
      intermediate_size=384, rope_theta=10000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=False, max_position_embeddings=64))
  c.batch_size = 64
  c.num_steps = 2500
  c.log_every = 100
  c.eval_every = 500
  c.num_eval = 2000  # test rows in the evaluations
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-3, schedule="cosine", warmup_steps=100,
      end_lr_fraction=0.05, weight_decay=0.01, b1=0.9, b2=0.95, grad_clip=1.0))
  c.ship = ml_collections.ConfigDict(dict(enabled=True, path="checkpoints/image-ar-fmnist"))
  return c

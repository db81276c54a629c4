"""Class-conditional autoregressive image-token model in the style of LlamaGen ("Autoregressive
Model Beats Diffusion: Llama for Scalable Image Generation", Sun et al., 2024): a Llama decoder
(`models.transformer`, the same stack as the text models) over the VQ-VAE's tokens in raster
order, conditioned by a class token prefix.

Token layout (`ImageTokens`): ids 0..K-1 are the image codes, K + c is class c, and
K + num_classes is the null class used by classifier-free guidance (training replaces the class
token by it with probability `cond_dropout`). A sequence is [class, code_1, ..., code_{g*g}];
decoding starts from the one-token prompt [class] and generates g*g tokens, which must all be
codes (`code_processor` bans the class ids).

A trained model is a decodax checkpoint folder (`checkpoint.save_decodax`, read by
`models.lm.load_model`) whose `info` holds the token layout and the path of its tokenizer
(`load_image_model` reads both).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import vqvae
from models.checkpoint import repo_path
from models.lm import TransformerLM

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ImageTokens:
  codebook_size: int  # K
  num_classes: int
  grid: int  # the image is grid x grid tokens

  @property
  def null_class(self) -> int:
    return self.codebook_size + self.num_classes

  @property
  def vocab_size(self) -> int:
    return self.codebook_size + self.num_classes + 1

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid

  def class_token(self, labels) -> Array:
    """Token ids of class labels ([B] ints in [0, num_classes)); -1 means the null class."""
    labels = jnp.asarray(labels, jnp.int32)
    return jnp.where(labels < 0, self.null_class, self.codebook_size + labels)

  def prompts(self, labels) -> Array:
    """[B, 1] one-token prompts."""
    return self.class_token(labels)[:, None]

  def sequences(self, labels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Training rows [N, 1 + g*g]: class token then the codes."""
    cls = np.asarray(labels, np.int64) + self.codebook_size
    return np.concatenate([cls[:, None], np.asarray(codes)], axis=1).astype(np.int32)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def code_mask(layout: ImageTokens) -> Array:
  """[V] bool: True on image-code ids."""
  return jnp.arange(layout.vocab_size) < layout.codebook_size


def cond_dropout_loss(base_loss, layout: ImageTokens, rate: float):
  """Wraps a next-token loss: each row's class token becomes the null class with probability
  `rate` (classifier-free guidance training, "Classifier-Free Diffusion Guidance", Ho &
  Salimans, 2022)."""
  def loss_fn(params, batch, key):
    k_drop, key = jax.random.split(key)
    tokens = batch["tokens"]
    drop = jax.random.bernoulli(k_drop, rate, (tokens.shape[0],))
    tokens = tokens.at[:, 0].set(jnp.where(drop, layout.null_class, tokens[:, 0]))
    return base_loss(params, {**batch, "tokens": tokens}, key)
  return loss_fn


@dataclasses.dataclass
class ImageModel:
  lm: TransformerLM
  params: Any
  layout: ImageTokens
  tokenizer: vqvae.VQVAE
  tokenizer_params: Any
  info: dict

  def decode_images(self, codes: Array) -> np.ndarray:
    """uint8 images [B, H, W, C] from code rows [B, g*g]."""
    x = self.tokenizer.decode(self.tokenizer_params, jnp.asarray(codes))
    return np.asarray(jnp.round(x * 255.0)).astype(np.uint8)


def load_image_model(path: str = "checkpoints/image-ar-fmnist", dtype="float32") -> ImageModel:
  """The AR model folder, its token layout and its VQ-VAE tokenizer."""
  from models import checkpoint
  from models.lm import load_model
  path = repo_path(path)
  if not checkpoint.is_decodax_checkpoint(path):
    raise FileNotFoundError(f"no image model at {path!r} (train one: python -m train.image_ar "
                            "--config=configs/image_ar_fmnist.py)")
  m = load_model(path, dtype=dtype)
  info = checkpoint.load_manifest(path).get("info", {})
  if "image_tokens" not in info or "tokenizer" not in info:
    raise ValueError(f"{path}: not an image-token model (its info has no image_tokens/tokenizer)")
  layout = ImageTokens(**info["image_tokens"])
  tok, tok_params, _ = vqvae.load(repo_path(info["tokenizer"]))
  if tok.config.codebook_size != layout.codebook_size or tok.config.grid != layout.grid:
    raise ValueError(f"{path}: tokenizer {info['tokenizer']} does not match the token layout")
  return ImageModel(m.lm, m.params, layout, tok, tok_params, info)


def load_image_head(model: ImageModel, path: str = "checkpoints/eagle-image-fmnist",
                    param_dtype="float32"):
  """(EagleHead, params) of an image draft head (`train.image_draft_head`), checked against
  the sha256 of `model`'s parameters (a head only drafts well for the target it learned)."""
  from models import checkpoint, eagle_head
  return eagle_head.load_head(repo_path(path), target_sha256=checkpoint.params_sha256(
      model.params), param_dtype=param_dtype, dtype=model.lm.config.dtype)

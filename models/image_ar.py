"""Class-conditional autoregressive image-token model in the style of LlamaGen ("Autoregressive
Model Beats Diffusion: Llama for Scalable Image Generation", Sun et al., 2024): a Llama decoder
(`models.transformer`, the same stack as the text models) over the VQ-VAE's tokens in raster
order, conditioned by a class token prefix.

Token layout (`ImageTokens`): ids 0..K-1 are the image codes, K + c is class c, and
K + num_classes is the null class used by classifier-free guidance (training replaces the class
token by it with probability `cond_dropout`). A sequence is [class, code_1, ..., code_{g*g}];
decoding starts from the one-token prompt [class] and generates g*g tokens, which must all be
codes (`code_processor` bans the class ids).

A trained model is an `lm` artifact (`models.lm.save_lm`, read by `models.lm.load_model`; the
shipped one is registered as "image-ar-fmnist") whose `info` holds the token layout, with the
class names, and the name or path of its VQ tokenizer (`load_image_model` reads both).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import artifacts, checkpoint, eagle_head, registry, vqvae
from models.lm import TransformerLM, load_model
from models.registry import repo_path  # re-exported: configs name shipped folders from the root

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ImageTokens:
  codebook_size: int  # K
  num_classes: int
  grid: int  # the image is grid x grid tokens
  class_names: Sequence[str] = ()  # the name of each class (empty: unnamed)

  def __post_init__(self):
    # a tuple, so the layout stays hashable when it comes from a JSON list
    object.__setattr__(self, "class_names", tuple(self.class_names))
    if self.class_names and len(self.class_names) != self.num_classes:
      raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

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
    """Training rows [N, 1 + g*g]: class token (the null class for label -1) then the codes."""
    labels = np.asarray(labels, np.int64)
    cls = np.where(labels < 0, self.null_class, labels + self.codebook_size)
    return np.concatenate([cls[:, None], np.asarray(codes)], axis=1).astype(np.int32)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["class_names"] = list(self.class_names)
    return d


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
  """A loaded image-token model with its VQ tokenizer. `sha256` identifies its weights (the
  artifact's params sha256, what its EAGLE heads record as their target); None for a model
  put together in memory, whose heads are tied to its parameter bytes instead."""
  lm: TransformerLM
  params: Any
  layout: ImageTokens
  tokenizer: vqvae.VQVAE
  tokenizer_params: Any
  info: dict
  sha256: Optional[str] = None

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.layout.class_names

  def decode_images(self, codes: Array) -> np.ndarray:
    """uint8 images [B, H, W, C] from code rows [B, g*g]."""
    x = self.tokenizer.decode(self.tokenizer_params, jnp.asarray(codes))
    return np.asarray(jnp.round(x * 255.0)).astype(np.uint8)

  @property
  def weights_sha256(self) -> str:
    """`sha256`, else the sha256 of the parameter bytes (`checkpoint.params_sha256`)."""
    return self.sha256 or checkpoint.params_sha256(self.params)


def read_token_model(name_or_path: str, layout_key: str, what: str,
                     command: str) -> tuple[str, dict]:
  """(folder, info) of an `lm` artifact over VQ image tokens whose info holds its token layout
  under `layout_key` and its tokenizer's name; a clear error naming `command` otherwise."""
  try:
    path, _, _ = registry.resolve(name_or_path)
    _, manifest = artifacts.read_manifest(path, "lm")
  except (ValueError, FileNotFoundError) as e:
    if isinstance(e, artifacts.OutdatedFormatError):
      raise
    raise FileNotFoundError(f"no {what} at {name_or_path!r} ({e}; train one: {command})") from e
  info = manifest["info"]
  if layout_key not in info or "tokenizer" not in info:
    raise ValueError(f"{path}: holds no {what} (its info has no {layout_key}/tokenizer)")
  return path, info


def load_image_model(name_or_path: str = "image-ar-fmnist", numerics: str = "fp32") -> ImageModel:
  """The AR model (a registered name or an `lm` artifact folder) in a precision recipe
  (`models.numerics`), its token layout and its VQ-VAE tokenizer."""
  path, info = read_token_model(name_or_path, "image_tokens", "image model",
                                "python -m train.image_ar --config=configs/image_ar_fmnist.py")
  m = load_model(path, numerics=numerics)
  layout = ImageTokens(**info["image_tokens"])
  tok, tok_params, _ = vqvae.load(info["tokenizer"])
  if tok.config.codebook_size != layout.codebook_size or tok.config.grid != layout.grid:
    raise ValueError(f"{path}: tokenizer {info['tokenizer']} does not match the token layout")
  return ImageModel(m.lm, m.params, layout, tok, tok_params, info, m.sha256)


def load_image_head(model: ImageModel, name_or_path: str = "eagle-image-fmnist",
                    param_dtype="float32"):
  """(EagleHead, params) of an image draft head (`train.image_draft_head`), checked against
  `model.weights_sha256` (a head only drafts well for the target it learned)."""
  return eagle_head.load_head(name_or_path, target_sha256=model.weights_sha256,
                              param_dtype=param_dtype, dtype=model.lm.config.dtype)

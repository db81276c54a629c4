"""A VQ-VAE image tokenizer ("Neural Discrete Representation Learning", van den Oord et al.,
NeurIPS 2017) for small grey images (Fashion-MNIST), with the codebook learned by
exponential moving averages and dead codes restarted from encoder outputs.

    images [B, 28, 28, 1] in [0, 1] --encoder--> z_e [B, 7, 7, D]
        --nearest code (L2)--> codes [B, 7, 7] int32 --codebook--> z_q --decoder--> images

Training objective (per batch): ||x - dec(z_e + sg(z_q - z_e))||^2 (straight-through
estimator) + beta ||z_e - sg(z_q)||^2 (the commitment loss). The codebook gets no gradient:
after every optimizer step it follows the batch's assignments by EMA (appendix of the VQ-VAE
paper; "Generating Diverse High-Fidelity Images with VQ-VAE-2", Razavi et al., 2019):

    N_k <- g N_k + (1 - g) n_k,   m_k <- g m_k + (1 - g) sum_{i: code(i) = k} z_e(i),
    e_k = m_k / N~_k   with N~ the Laplace-smoothed counts,

and a code whose EMA count falls below `restart_below` is moved onto a random encoder output
of the batch (as in Jukebox, Dhariwal et al., 2020), so codebook usage stays healthy. These
updates run inside the trainer's jitted step (`vq_update`, a `Trainer(post_update=...)`).

Parameters: {"net": encoder/decoder weights (optimized), "vq": {"codebook" [K, D],
"ema_count" [K], "ema_sum" [K, D]} (EMA state, not optimized)}.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import artifacts

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VQConfig:
  image_size: int = 28
  channels: int = 1
  hidden: Sequence[int] = (32, 64)  # widths of the two stride-2 stages (28 -> 14 -> 7)
  num_res_blocks: int = 2
  codebook_size: int = 256  # K
  code_dim: int = 16  # D
  beta: float = 0.25  # commitment weight
  decay: float = 0.99  # EMA decay g
  epsilon: float = 1e-5  # Laplace smoothing of the EMA counts
  restart_below: float = 1.0  # EMA count under which a code is restarted (0: never)

  def __post_init__(self):
    if self.image_size % 4:
      raise ValueError(f"image_size must be a multiple of 4 (two stride-2 stages), "
                       f"got {self.image_size}")
    if len(tuple(self.hidden)) != 2:
      raise ValueError(f"hidden must list two widths, got {self.hidden!r}")
    for name in ("channels", "codebook_size", "code_dim"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f"decay must be in [0, 1), got {self.decay}")

  @property
  def grid(self) -> int:
    """Side of the token grid (image_size / 4)."""
    return self.image_size // 4

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["hidden"] = list(self.hidden)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "VQConfig":
    d = dict(d)
    d["hidden"] = tuple(d["hidden"])
    return cls(**d)


class _ResBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.width // 2, (3, 3))(nn.relu(x))
    return x + nn.Conv(self.width, (1, 1))(nn.relu(h))


class Encoder(nn.Module):
  config: VQConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, C] in [-1, 1] -> [B, H/4, W/4, D]
    c = self.config
    h = nn.relu(nn.Conv(c.hidden[0], (4, 4), strides=2)(x))
    h = nn.Conv(c.hidden[1], (4, 4), strides=2)(h)
    h = nn.Conv(c.hidden[1], (3, 3))(nn.relu(h))
    for _ in range(c.num_res_blocks):
      h = _ResBlock(c.hidden[1])(h)
    return nn.Conv(c.code_dim, (1, 1))(nn.relu(h))


class Decoder(nn.Module):
  config: VQConfig

  @nn.compact
  def __call__(self, z: Array) -> Array:  # [B, h, w, D] -> [B, 4h, 4w, C] in about [-1, 1]
    c = self.config
    h = nn.Conv(c.hidden[1], (3, 3))(z)
    for _ in range(c.num_res_blocks):
      h = _ResBlock(c.hidden[1])(h)
    h = nn.relu(nn.ConvTranspose(c.hidden[0], (4, 4), strides=(2, 2))(nn.relu(h)))
    return nn.ConvTranspose(c.channels, (4, 4), strides=(2, 2))(h)


class _Net(nn.Module):
  config: VQConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def __call__(self, x):  # used only to create both halves' parameters
    return self.decoder(self.encoder(x))

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)


def to_model_range(images: Array) -> Array:
  """uint8 [0, 255] or float [0, 1] images -> float32 in [-1, 1]."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  return x * 2.0 - 1.0


def nearest_code(z: Array, codebook: Array) -> Array:
  """Index of the nearest codebook vector (L2; ties to the lowest index): z [..., D],
  codebook [K, D] -> [...] int32."""
  flat = z.reshape(-1, z.shape[-1])
  d = (jnp.sum(flat ** 2, -1, keepdims=True) - 2.0 * flat @ codebook.T
       + jnp.sum(codebook ** 2, -1)[None])
  return jnp.argmin(d, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


@dataclasses.dataclass(frozen=True)
class VQVAE:
  """The tokenizer's functions over explicit parameters (hashable: static under jit)."""
  config: VQConfig

  @property
  def net(self) -> _Net:
    return _Net(self.config)

  def init(self, key: Array) -> dict:
    """Fresh parameters; the codebook starts as N(0, 1) vectors with EMA counts of 1."""
    c = self.config
    k1, k2 = jax.random.split(key)
    x = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
    net = jax.jit(self.net.init)(k1, x)["params"]  # one compile, not one per eager op
    codebook = jax.random.normal(k2, (c.codebook_size, c.code_dim), jnp.float32)
    return {"net": net, "vq": {"codebook": codebook,
                               "ema_count": jnp.ones((c.codebook_size,), jnp.float32),
                               "ema_sum": codebook}}

  def encode_features(self, params: dict, images: Array) -> Array:
    """z_e [B, g, g, D] of images (uint8 or [0, 1] floats, [B, H, W, C])."""
    return self.net.apply({"params": params["net"]}, to_model_range(images),
                          method=_Net.encode)

  def encode(self, params: dict, images: Array) -> Array:
    """Image tokens [B, g*g] int32 in raster order."""
    codes = nearest_code(self.encode_features(params, images), params["vq"]["codebook"])
    return codes.reshape(codes.shape[0], -1)

  def decode(self, params: dict, codes: Array) -> Array:
    """Images [B, H, W, C] in [0, 1] from tokens [B, g*g] (raster order)."""
    g = self.config.grid
    z = jnp.take(jnp.asarray(params["vq"]["codebook"]), codes.reshape(codes.shape[0], g, g), axis=0)
    x = self.net.apply({"params": params["net"]}, z, method=_Net.decode)
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)

  def reconstruct(self, params: dict, images: Array) -> Array:
    return self.decode(params, self.encode(params, images))

  # ---- training -----------------------------------------------------------------------------

  def loss(self, params: dict, batch: dict, key: Array) -> tuple[Array, dict]:
    """Reconstruction + commitment loss of `batch["image"]` (uint8 [B, H, W, C]); the
    metrics carry the EMA statistics under "aux" for `vq_update`."""
    c = self.config
    x = to_model_range(batch["image"])
    z = self.net.apply({"params": params["net"]}, x, method=_Net.encode)  # [B, g, g, D]
    codebook = jax.lax.stop_gradient(params["vq"]["codebook"])
    codes = nearest_code(z, codebook)
    zq = codebook[codes]
    z_st = z + jax.lax.stop_gradient(zq - z)
    recon = self.net.apply({"params": params["net"]}, z_st, method=_Net.decode)
    mse = jnp.mean((recon - x) ** 2)
    commit = jnp.mean(jnp.sum((z - jax.lax.stop_gradient(zq)) ** 2, -1))
    loss = mse + c.beta * commit
    flat_z = jax.lax.stop_gradient(z).reshape(-1, c.code_dim)
    onehot = jax.nn.one_hot(codes.reshape(-1), c.codebook_size, dtype=jnp.float32)
    counts = onehot.sum(0)  # [K]
    probs = counts / counts.sum()
    perplexity = jnp.exp(-jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0)))
    restart_from = flat_z[jax.random.randint(key, (c.codebook_size,), 0, flat_z.shape[0])]
    metrics = {
        "recon_mse": mse / 4.0,  # per pixel, on the [0, 1] scale
        "commitment": commit,
        "codebook_perplexity": perplexity,
        "codes_used": jnp.sum(counts > 0).astype(jnp.float32),
        "aux": {"counts": counts, "sums": onehot.T @ flat_z, "restart_from": restart_from},
    }
    return loss, metrics

  def vq_update(self, params: dict, aux: dict) -> dict:
    """The EMA codebook step and dead-code restarts (pure; runs inside the jitted step)."""
    c = self.config
    vq = params["vq"]
    g = c.decay
    count = g * vq["ema_count"] + (1.0 - g) * aux["counts"]
    sums = g * vq["ema_sum"] + (1.0 - g) * aux["sums"]
    n = count.sum()
    smoothed = (count + c.epsilon) / (n + c.codebook_size * c.epsilon) * n
    codebook = sums / smoothed[:, None]
    if c.restart_below > 0:
      dead = count < c.restart_below
      codebook = jnp.where(dead[:, None], aux["restart_from"], codebook)
      sums = jnp.where(dead[:, None], aux["restart_from"], sums)
      count = jnp.where(dead, 1.0, count)
    return {**params, "vq": {"codebook": codebook, "ema_count": count, "ema_sum": sums}}


def trainable_mask(params: dict) -> dict:
  """True on the optimized leaves (the network), False on the EMA state."""
  return {"net": jax.tree.map(lambda _: True, params["net"]),
          "vq": jax.tree.map(lambda _: False, params["vq"])}


# ---- checkpoints --------------------------------------------------------------------------------


def save(directory: str, model: VQVAE, params: dict, info: Optional[dict] = None) -> str:
  """Writes a `vq_tokenizer` artifact (`models.artifacts`): the parameters (float32), the
  VQ config and free-form info (the training run and its measured reconstruction error and
  codebook usage). Returns the folder's absolute path."""
  return artifacts.save_artifact(directory, "vq_tokenizer", params,
                                 config=model.config.to_dict(), info=info)


def load(name_or_path: str) -> tuple[VQVAE, dict, dict]:
  """(model, params, manifest) of a registered name or a `save` folder."""
  manifest, params = artifacts.load_artifact(name_or_path, "vq_tokenizer")
  return VQVAE(VQConfig.from_dict(manifest["config"])), params, manifest

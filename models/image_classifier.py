"""A small convolutional Fashion-MNIST classifier: the feature extractor of the project's FID
and the judge of class-conditional generation (accuracy on generated images for their
requested class).

FID ("GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
Heusel et al., NeurIPS 2017) is the Frechet distance between Gaussians fitted to features of
real and generated images:

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).

Inception-v3 features are the usual choice; none is installable here and 28x28 grey images are
far from ImageNet, so the features are the 128-d penultimate layer of this classifier (trained
by `train.image_classifier`). Numbers are comparable within this project only.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import artifacts

Array = jax.Array


class _CNN(nn.Module):
  num_classes: int = 10
  feature_dim: int = 128

  @nn.compact
  def __call__(self, x: Array, train: bool = False, dropout_key=None):
    """x [B, 28, 28, 1] in [0, 1] -> (logits [B, classes], features [B, feature_dim])."""
    h = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))  # 14
    h = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(h)), (2, 2), (2, 2))  # 7
    h = h.reshape(h.shape[0], -1)
    feats = nn.relu(nn.Dense(self.feature_dim)(h))
    if train:
      keep = jax.random.bernoulli(dropout_key, 0.7, feats.shape)
      feats_d = jnp.where(keep, feats / 0.7, 0.0)
    else:
      feats_d = feats
    return nn.Dense(self.num_classes)(feats_d), feats


@dataclasses.dataclass(frozen=True)
class ImageClassifier:
  num_classes: int = 10
  feature_dim: int = 128

  @property
  def net(self) -> _CNN:
    return _CNN(self.num_classes, self.feature_dim)

  def init(self, key: Array) -> dict:
    return self.net.init(key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]

  def apply(self, params: dict, images: Array) -> tuple[Array, Array]:
    """(logits, features) of images (uint8 or [0, 1] floats, [B, 28, 28, 1])."""
    x = jnp.asarray(images)
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    return self.net.apply({"params": params}, x)

  def loss(self, params: dict, batch: dict, key: Array) -> tuple[Array, dict]:
    x = batch["image"].astype(jnp.float32) / 255.0
    logits, _ = self.net.apply({"params": params}, x, train=True, dropout_key=key)
    labels = batch["label"].astype(jnp.int32)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return nll, {"nll": nll, "accuracy": acc}

  def eval_loss(self, params: dict, batch: dict, key: Array) -> tuple[Array, dict]:
    logits, _ = self.apply(params, batch["image"])
    labels = batch["label"].astype(jnp.int32)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return nll, {"nll": nll, "accuracy": acc}

  def features_and_predictions(self, params: dict, images: np.ndarray,
                               batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """([N, feature_dim] float64 features, [N] predicted classes) of uint8 images."""
    fn = jax.jit(lambda x: self.apply(params, x))
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
      chunk = np.asarray(images[i:i + batch_size])
      n = len(chunk)
      if n < batch_size:  # one shape, one compile
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, 0)])
      logits, f = fn(jnp.asarray(chunk))
      feats.append(np.asarray(f, np.float64)[:n])
      preds.append(np.asarray(jnp.argmax(logits, -1))[:n])
    return np.concatenate(feats), np.concatenate(preds)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [F], covariance [F, F]) of features [N, F] (N >= 2)."""
  f = np.asarray(features, np.float64)
  if f.shape[0] < 2:
    raise ValueError("FID needs at least 2 feature vectors per set")
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + Tr(s1) + Tr(s2) - 2 Tr((s1 s2)^(1/2)). The last trace is the sum of the
  square roots of the eigenvalues of s1 s2, which equal those of the PSD matrix
  s1^(1/2) s2 s1^(1/2) (round-off below zero is clipped), so singular covariances (dead
  ReLU features) need no special care."""
  diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
  eig = np.linalg.eigvals(np.asarray(s1, np.float64) @ np.asarray(s2, np.float64))
  tr_sqrt = float(np.sum(np.sqrt(np.clip(eig.real, 0.0, None))))
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def fid(real_features: np.ndarray, fake_features: np.ndarray) -> float:
  return frechet_distance(*gaussian_stats(real_features), *gaussian_stats(fake_features))


def save(directory: str, model: ImageClassifier, params: dict, info: Optional[dict] = None) -> str:
  """Writes an `image_classifier` artifact (`models.artifacts`): the parameters (float32),
  the classifier's sizes and free-form info (the training run and its test accuracy).
  Returns the folder's absolute path."""
  return artifacts.save_artifact(directory, "image_classifier", params,
                                 config=dataclasses.asdict(model), info=info)


def load(name_or_path: str) -> tuple[ImageClassifier, dict, dict]:
  """(model, params, manifest) of a registered name or a `save` folder."""
  manifest, params = artifacts.load_artifact(name_or_path, "image_classifier")
  return ImageClassifier(**manifest["config"]), params, manifest

"""Deterministic, resumable batch sources for the trainer.

A source is anything with `batch(step) -> dict[str, np.ndarray]` (leading axis = global
batch size): the batch is a pure function of the step, so the data position saved in a
checkpoint is the step itself and a resumed run sees exactly the batches it would have
seen. Shuffling is a fresh permutation per epoch drawn from (seed, epoch).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np


@dataclasses.dataclass
class ArrayData:
  """Epoch-wise shuffled mini-batches over in-memory arrays sharing a leading axis N.

  Batches never straddle epochs: each epoch is cut into N // batch_size batches and the
  remaining N % batch_size examples of that epoch's permutation are not used in it
  (they are in other epochs, since each epoch is reshuffled). `batch_size` must be <= N.
  """
  arrays: Mapping[str, np.ndarray]
  batch_size: int
  seed: int = 0
  shuffle: bool = True

  def __post_init__(self):
    sizes = {k: len(v) for k, v in self.arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays must share their leading dimension, got {sizes}")
    self.size = next(iter(sizes.values()))
    if not 1 <= self.batch_size <= self.size:
      raise ValueError(f"batch_size must be in [1, {self.size}] (dataset size), "
                       f"got {self.batch_size}")
    self.batches_per_epoch = self.size // self.batch_size

  def epoch_of(self, step: int) -> int:
    return step // self.batches_per_epoch

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.size)
    return np.random.default_rng([self.seed, epoch]).permutation(self.size)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(int(step), self.batches_per_epoch)
    idx = self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
    return {k: np.asarray(v[idx]) for k, v in self.arrays.items()}


@dataclasses.dataclass
class FunctionData:
  """Batches computed by `fn(step, rng)` with an rng seeded by (seed, step): generated data
  (e.g. DITTO's pseudo-repetitions) that is still a pure function of the step."""
  fn: Callable[[int, np.random.Generator], Mapping[str, np.ndarray]]
  seed: int = 0

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return dict(self.fn(int(step), np.random.default_rng([self.seed, int(step)])))


@dataclasses.dataclass
class MixedData:
  """One sub-batch per named source each step (for `losses.mixture`)."""
  sources: Mapping[str, Any]

  def batch(self, step: int) -> dict[str, Any]:
    return {name: src.batch(step) for name, src in self.sources.items()}


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Fixed, in-order evaluation batches covering every example.

  The last batch is padded to `batch_size` with copies of the first examples whose
  `loss_mask` is zero (a `loss_mask` of ones minus column 0 is created when absent), so
  all batches share one shape (one compile) and padding carries no weight.
  """
  arrays = dict(arrays)
  n = len(next(iter(arrays.values())))
  if n % batch_size and "tokens" not in arrays and "loss_mask" not in arrays:
    raise ValueError(f"{n} examples do not fill batches of {batch_size}, and without "
                     "`tokens`/`loss_mask` the padding rows cannot be given zero weight")
  if "loss_mask" not in arrays and "tokens" in arrays:
    mask = np.ones(arrays["tokens"].shape, np.float32)
    mask[:, 0] = 0.0
    arrays["loss_mask"] = mask
  out = []
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size) % n
    b = {k: np.asarray(v[idx]) for k, v in arrays.items()}
    if s + batch_size > n:
      b["loss_mask"] = b["loss_mask"].copy()
      b["loss_mask"][n - s:] = 0.0
    out.append(b)
  return out

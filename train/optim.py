"""Optimizers and learning-rate schedules from an ml_collections config.

`make_optimizer(cfg, num_steps)` chains (in this order) global-norm gradient clipping,
the optimizer (AdamW by default, with the schedule) and nothing else: gradient
accumulation is done by the trainer inside one jitted step (micro-batches summed under
`lax.scan`), so one optimizer update is always one `step` and resuming is exact.

Config fields (`cfg`): name (adamw | adam | sgd | lion), learning_rate, schedule
(constant | cosine | linear), warmup_steps, end_lr_fraction (final lr / peak for
cosine/linear decay), weight_decay, b1, b2, eps, momentum (sgd), grad_clip (0 = off).
"""
from __future__ import annotations

from typing import Any

import optax

OPTIMIZERS = ("adamw", "adam", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "linear")


def _get(cfg: Any, name: str, default):
  return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def validate(cfg: Any) -> None:
  """Raises ValueError for invalid optimizer settings (before anything is compiled)."""
  name = _get(cfg, "name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
  schedule = _get(cfg, "schedule", "constant")
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
  lr = float(_get(cfg, "learning_rate", 1e-4))
  if not lr > 0:
    raise ValueError(f"learning_rate must be > 0, got {lr}")
  if int(_get(cfg, "warmup_steps", 0)) < 0:
    raise ValueError("warmup_steps must be >= 0")
  if float(_get(cfg, "grad_clip", 0.0)) < 0:
    raise ValueError("grad_clip must be >= 0 (0 disables clipping)")
  if float(_get(cfg, "weight_decay", 0.0)) < 0:
    raise ValueError("weight_decay must be >= 0")
  if float(_get(cfg, "weight_decay", 0.0)) > 0 and name in ("adam", "sgd"):
    raise ValueError(f"weight_decay is not applied by {name!r}; use 'adamw' or 'lion'")
  frac = float(_get(cfg, "end_lr_fraction", 0.0))
  if not 0.0 <= frac <= 1.0:
    raise ValueError(f"end_lr_fraction must be in [0, 1], got {frac}")


def make_schedule(cfg: Any, num_steps: int) -> optax.Schedule:
  lr = float(_get(cfg, "learning_rate", 1e-4))
  warmup = int(_get(cfg, "warmup_steps", 0))
  schedule = _get(cfg, "schedule", "constant")
  end = lr * float(_get(cfg, "end_lr_fraction", 0.0))
  decay_steps = max(num_steps - warmup, 1)
  if schedule == "constant":
    main = optax.constant_schedule(lr)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr)
  else:
    main = optax.linear_schedule(lr, end, decay_steps)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(cfg: Any, num_steps: int) -> optax.GradientTransformation:
  validate(cfg)
  lr = make_schedule(cfg, num_steps)
  name = _get(cfg, "name", "adamw")
  b1 = float(_get(cfg, "b1", 0.9))
  b2 = float(_get(cfg, "b2", 0.99 if name == "lion" else 0.999))
  eps, wd = float(_get(cfg, "eps", 1e-8)), float(_get(cfg, "weight_decay", 0.0))
  if name == "adamw":
    opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  elif name == "adam":
    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  elif name == "lion":
    opt = optax.lion(lr, b1=b1, b2=b2, weight_decay=wd)
  else:
    opt = optax.sgd(lr, momentum=float(_get(cfg, "momentum", 0.0)) or None)
  clip = float(_get(cfg, "grad_clip", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt

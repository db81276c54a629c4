"""Strategy settings: frozen dataclasses that own their defaults and validate themselves.

Every strategy has one settings type (`Greedy`, `Sample`, `Beam`, ...), built from the field
groups below. A settings object is complete and checked the moment it exists: its
constructor rejects a misspelled field by naming the nearest valid one, and `validate`
(run from `__post_init__`) raises `GenerationError` for values the strategy cannot run
with, so nothing is compiled for a request that would fail. Field names are the flat
Hugging Face GenerationConfig names the command line uses (`decoding.cli` maps a flat
config to a settings object by name), so a field means the same thing everywhere.

Field groups (mixed into the strategies' types):
  TextSettings  max_new_tokens, the field every text strategy has;
  Penalties     min_new_tokens, repetition_penalty, no_repeat_ngram_size: processors that
                read the decoded context and apply to greedy and sampled decoding alike;
  Warpers       temperature, top_k, top_p, min_p: they reshape the distribution for sampling;
  Sampled       do_sample plus the warpers, for strategies with a greedy and a sampled mode
                (beam search, speculative decoding, images): warpers away from their
                neutral values are an error unless do_sample=True.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import numpy as np

from decoding import processors
from decoding.errors import GenerationError, nearest


def settings(cls):
  """Class decorator: a frozen dataclass whose constructor names the nearest valid field
  when given an unknown one (`Sample(top_pp=0.9)` -> "... did you mean 'top_p'?")."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  init = cls.__init__
  names = tuple(f.name for f in dataclasses.fields(cls))

  @functools.wraps(init)
  def checked_init(self, *args, **kwargs):
    for key in kwargs:
      if key not in names:
        raise GenerationError(f"{cls.__name__} has no field {key!r}{nearest(key, names)}; "
                              f"its fields: {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls)[len(args):] if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
      raise GenerationError(f"{cls.__name__} needs {', '.join(missing)}")
    init(self, *args, **kwargs)

  cls.__init__ = checked_init
  return cls


def field_names(settings_type) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(settings_type))


def _plain(v: Any) -> Any:
  return list(v) if isinstance(v, tuple) else v


# ------------------------------------------------------------------------------ checks


def is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_real(v: Any) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, (bool, np.bool_)) and math.isfinite(float(v)))


def check_int(name: str, v: Any, low: int = 1, high: float = math.inf) -> None:
  if not is_int(v) or not low <= v <= high:
    bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
    raise GenerationError(f"{name} must be an integer {bound}, got {v!r}")


def check_real(name: str, v: Any, low: float = -math.inf, high: float = math.inf, *,
               low_open: bool = False, high_open: bool = False) -> None:
  ok = is_real(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  if not ok:
    lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
    if high == math.inf:
      bound = f"> {low:g}" if low_open else f">= {low:g}"
    else:
      bound = f"in {lo}, {hi}"
    raise GenerationError(f"{name} must be a number {bound}, got {v!r}")


def check_bool(name: str, v: Any) -> None:
  if not isinstance(v, (bool, np.bool_)):
    raise GenerationError(f"{name} must be True or False, got {v!r}")


def check_choice(name: str, v: Any, choices) -> None:
  if v not in choices:
    raise GenerationError(f"unknown {name} {v!r}{nearest(str(v), choices)}; choose from "
                          f"{', '.join(map(str, choices))}")


# ------------------------------------------------------------------------------ groups


class Validated:
  """Settings objects validate themselves on construction (`validate`, extended by each
  type with `super().validate()` first) and are replaced, never mutated."""

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    pass

  def replace(self, **changes):
    """A copy with `changes` applied (validated like a new object)."""
    return dataclasses.replace(self, **changes)

  # The flat, Hugging Face-named form of the command line (`decoding.cli`). Types with
  # nested settings (a drafter's) override these three.

  @classmethod
  def flat_fields(cls) -> tuple[str, ...]:
    """The flat config fields these settings read."""
    return field_names(cls)

  @classmethod
  def from_flat(cls, fields: dict):
    """These settings from flat config fields (all of them in `flat_fields`)."""
    return cls(**fields)

  def to_flat(self) -> dict:
    """The flat config fields of these settings (JSON-able values)."""
    return {f: _plain(getattr(self, f)) for f in field_names(type(self))}


@settings
class Settings(Validated):
  """Base of every strategy's settings type."""

  # True for strategies that draw random numbers (sampling); types with a `do_sample`
  # field override `samples` per instance.
  sampling: ClassVar[bool] = False

  @property
  def samples(self) -> bool:
    """Whether decoding draws random numbers (the seed matters)."""
    return self.sampling


@settings
class TextSettings(Settings):
  """Base of the text strategies' settings."""
  max_new_tokens: int = 64

  def validate(self) -> None:
    super().validate()
    check_int("max_new_tokens", self.max_new_tokens, 1)


@settings
class Penalties(TextSettings):
  """Processors that read the row's context (`decoding.processors`)."""
  min_new_tokens: int = 0
  repetition_penalty: float = 1.0
  no_repeat_ngram_size: int = 0

  def validate(self) -> None:
    super().validate()
    check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
    check_real("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
    check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)

  def penalty_processors(self, eos_ids) -> processors.Chain:
    return processors.penalties(self.min_new_tokens, self.repetition_penalty,
                                self.no_repeat_ngram_size, eos_ids)


@settings
class Warpers(Settings):
  """The sampling warpers, applied in this order after the penalties."""
  temperature: float = 1.0
  top_k: int = 0  # 0 disables
  top_p: float = 1.0
  min_p: float = 0.0

  NEUTRAL: ClassVar[dict] = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

  def validate(self) -> None:
    super().validate()
    check_real("temperature", self.temperature, 0.0, low_open=True)
    check_int("top_k", self.top_k, 0)
    check_real("top_p", self.top_p, 0.0, 1.0, low_open=True)
    check_real("min_p", self.min_p, 0.0, 1.0)

  def warper_processors(self, min_tokens_to_keep: int = 1) -> processors.Chain:
    return processors.warpers(self.temperature, self.top_k, self.top_p, self.min_p,
                              min_tokens_to_keep)

  def warped(self) -> dict:
    """The warpers set away from their neutral values."""
    return {k: getattr(self, k) for k, v in self.NEUTRAL.items() if getattr(self, k) != v}


@settings
class Sampled(Warpers):
  """A greedy mode and, with do_sample=True, a sampled mode using the warpers."""
  do_sample: bool = False

  @property
  def samples(self) -> bool:
    return bool(self.do_sample)

  def validate(self) -> None:
    super().validate()
    check_bool("do_sample", self.do_sample)
    if not self.do_sample and self.warped():
      name, value = next(iter(self.warped().items()))
      raise GenerationError(f"{name}={value!r} only applies when sampling: set do_sample=True "
                            "(without it the warpers are not used)")


def convert(s: Settings, settings_type, **overrides):
  """A `settings_type` object with the fields it shares with `s`, then `overrides` (e.g.
  the sampling stage of best-of-N from its settings)."""
  names = set(field_names(settings_type))
  shared = {k: getattr(s, k) for k in field_names(type(s)) if k in names}
  return settings_type(**{**shared, **overrides})

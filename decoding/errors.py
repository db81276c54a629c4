"""The error every bad request raises before anything is compiled, and its spelling hints."""
from __future__ import annotations

import difflib
from typing import Iterable


class GenerationError(ValueError):
  """Invalid generation request (raised before anything is compiled)."""


def nearest(name: str, choices: Iterable[str]) -> str:
  """' (did you mean X?)' for the closest of `choices` to a misspelled `name`, else ''."""
  close = difflib.get_close_matches(str(name), sorted(set(choices)), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(what: str, name: str, choices: Iterable[str]) -> GenerationError:
  """`unknown <what> 'name' (did you mean ...?); available: ...` as a GenerationError."""
  choices = sorted(set(choices))
  return GenerationError(f"unknown {what} {name!r}{nearest(name, choices)}; available: "
                         f"{', '.join(choices)}")

"""Answer extraction for answer-based selection: text -> answer string, or None.

Extractors are chosen by name from `ANSWER_EXTRACTORS` (register your own with
`register_answer_extractor`) or passed directly to the Python functions of
`decoding.best_of_n` and `decoding.self_agreement`.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from decoding.errors import unknown

AnswerExtractor = Callable[[str], Optional[str]]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(s: str) -> str:
  """'1,200.0' -> '1200'; '-3.50' -> '-3.5'."""
  s = s.replace(",", "")
  if "." in s:
    s = s.rstrip("0").rstrip(".")
  return "0" if s in ("-0", "") else s


def last_number(text: str) -> Optional[str]:
  """The last number in the text, normalized (commas dropped, trailing .0 removed)."""
  found = _NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


def boxed(text: str) -> Optional[str]:
  """The content of the last \\boxed{...} (nested braces allowed), stripped."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, i = 0, start + len("\\boxed")
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i + 1:j].strip()
  return None


def first_line(text: str) -> Optional[str]:
  line = text.strip().split("\n", 1)[0].strip()
  return line or None


ANSWER_EXTRACTORS: dict[str, AnswerExtractor] = {
    "last_number": last_number, "boxed": boxed, "first_line": first_line}


def register_answer_extractor(name: str, fn: AnswerExtractor) -> None:
  ANSWER_EXTRACTORS[name] = fn


def get_extractor(name_or_fn) -> AnswerExtractor:
  if callable(name_or_fn):
    return name_or_fn
  if name_or_fn not in ANSWER_EXTRACTORS:
    raise unknown("answer_extractor", name_or_fn, ANSWER_EXTRACTORS)
  return ANSWER_EXTRACTORS[name_or_fn]

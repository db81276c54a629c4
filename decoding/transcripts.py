"""What speech decoding returns (`Transcript`) and the checks every audio input passes."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from decoding.errors import GenerationError
from models import audio as audio_lib


@dataclasses.dataclass
class Transcript:
  index: int  # the audio's position in the input
  text: str
  tokens: list[int]  # generated ids, end of text excluded
  score: Optional[float]  # what the strategy's `score_kind` says (None: streaming)
  rank: int = 0  # 0: best (or first sample)
  emit_seconds: Optional[list[float]] = None  # streaming: when each token was emitted

  def to_json(self, **extra) -> dict:
    out = dict(index=self.index, rank=self.rank, text=self.text, tokens=self.tokens,
               score=self.score, **extra)
    if self.emit_seconds is not None:
      out["emit_seconds"] = self.emit_seconds
    return out


def check_audio(audios: Sequence[np.ndarray], names: Optional[Sequence[str]] = None) -> None:
  """Every audio is a non-empty 1-D float array that fits one 30 s window."""
  if len(audios) == 0:
    raise GenerationError("no audio given")
  for i, a in enumerate(audios):
    name = names[i] if names is not None else f"audio {i}"
    a = np.asarray(a)
    if a.ndim != 1 or a.size == 0:
      raise GenerationError(f"{name}: expected a non-empty 1-D array of samples, got shape "
                            f"{a.shape}")
    if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
      raise GenerationError(f"{name}: samples must be finite floats")
    if a.size > audio_lib.N_SAMPLES:
      raise GenerationError(f"{name} lasts {a.size / audio_lib.SAMPLE_RATE:.1f} s; Whisper "
                            f"reads at most {audio_lib.WINDOW_SECONDS} s at once: cut it first")

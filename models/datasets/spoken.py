"""Synthesised English speech with exact word times: Jane Austen's sentences read by espeak-ng.

Source
  Sentences of Jane Austen's novels (`models.datasets.text_corpus`, Debian package
  ``r-cran-janeaustenr``), spoken by the formant synthesiser of Debian's ``espeak-ng`` (apt
  package ``espeak-ng``, 1.51 in Debian 12; no network, no model download).

Construction (deterministic for a seed)
  * Sentences of 4 to 24 words are drawn from the chapters of a split (`text_corpus` splits
    by chapter hash, so train and test never share a chapter); words keep their punctuation
    in the reference text.
  * Each word is synthesised on its own (``espeak-ng -w``), resampled to 16 kHz, and its
    leading and trailing silence (below 1% of full scale) trimmed; the words are joined with
    a short pause. A word's start and end times are therefore exact, which is what a
    forced aligner would otherwise estimate (CarelessWhisper's training labels need them).
  * Voices, speaking rates and pitches vary per utterance (`VOICES`, 130-190 words per
    minute, pitch 30-70), drawn from the seed.

Text for scoring: `normalise_text` lowercases, drops punctuation and joins hyphenated words,
so WER counts words, not Whisper's casing and punctuation choices.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional

import numpy as np

from models import audio as audio_lib
from models.datasets import text_corpus

ESPEAK = "espeak-ng"
INSTALL = "apt-get install -y --no-install-recommends espeak-ng"
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb+f2",
          "en-us+m3")
SILENCE = 0.01  # of full scale: quieter samples at a word's edges are trimmed
PAUSE_SECONDS = 0.06  # between words


@dataclasses.dataclass(frozen=True)
class Word:
  text: str
  start: float  # seconds
  end: float


@dataclasses.dataclass(frozen=True)
class Utterance:
  text: str  # the reference transcript (words joined by spaces)
  audio: np.ndarray  # [N] float32 at 16 kHz
  words: tuple[Word, ...]
  voice: str
  speed: int  # words per minute
  pitch: int

  @property
  def seconds(self) -> float:
    return self.audio.shape[0] / audio_lib.SAMPLE_RATE


def available() -> bool:
  return shutil.which(ESPEAK) is not None


def _require() -> None:
  if not available():
    raise FileNotFoundError(f"{ESPEAK} is not installed; install it with: {INSTALL}")


def synthesize_word(word: str, voice: str = "en-us", speed: int = 160, pitch: int = 50,
                    scratch: Optional[str] = None) -> np.ndarray:
  """One word as 16 kHz float32 samples, its silent edges trimmed."""
  _require()
  own = scratch is None
  scratch = tempfile.mkdtemp(prefix="spoken-") if own else scratch
  path = os.path.join(scratch, "word.wav")
  try:
    subprocess.run([ESPEAK, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)),
                    "-w", path, "--", word], check=True, capture_output=True, timeout=60)
    samples = audio_lib.read_wav(path)
  finally:
    if own:
      shutil.rmtree(scratch, ignore_errors=True)
  loud = np.flatnonzero(np.abs(samples) > SILENCE)
  return samples[loud[0]: loud[-1] + 1] if loud.size else samples[:0]


def synthesize(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50,
               pause: float = PAUSE_SECONDS) -> Utterance:
  """`text` spoken word by word, with each word's exact start and end time. A leading and a
  trailing pause frame the utterance."""
  words = text.split()
  if not words:
    raise ValueError("nothing to say: the text has no words")
  gap = np.zeros(int(round(pause * audio_lib.SAMPLE_RATE)), np.float32)
  pieces, spans, t = [gap], [], gap.size
  with tempfile.TemporaryDirectory(prefix="spoken-") as scratch:
    for w in words:
      clip = synthesize_word(w, voice, speed, pitch, scratch)
      spans.append(Word(w, t / audio_lib.SAMPLE_RATE, (t + clip.size) / audio_lib.SAMPLE_RATE))
      pieces += [clip, gap]
      t += clip.size + gap.size
  return Utterance(text=" ".join(words), audio=np.concatenate(pieces), words=tuple(spans),
                   voice=voice, speed=int(speed), pitch=int(pitch))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Col.", "Capt.")


def _split_sentences(paragraph: str) -> list[str]:
  """Sentences of a paragraph; a break after "Mr." and the like is not a sentence end."""
  out: list[str] = []
  for piece in _SENTENCE_END.split(paragraph):
    if out and out[-1].endswith(_ABBREVIATIONS):
      out[-1] += " " + piece
    else:
      out.append(piece)
  return out


def sentences(split: str = "test", min_words: int = 4, max_words: int = 24,
              source_dir: Optional[str] = None) -> list[str]:
  """Every sentence of `min_words` to `max_words` words in the split's chapters, in order
  (plain ASCII letters and punctuation only, so the synthesiser reads every word)."""
  docs = [text for name, text in text_corpus.documents(source_dir)
          if text_corpus.split_of(name) == split]
  out = []
  for doc in docs:
    for s in _split_sentences(" ".join(doc.replace("--", " ").split())):
      words = s.split()
      if min_words <= len(words) <= max_words and re.fullmatch(r"[A-Za-z ,.;:!?'\-]+", s):
        out.append(" ".join(words))
  return out


def utterances(n: int, seed: int = 0, split: str = "test") -> list[Utterance]:
  """`n` distinct sentences of the split, each with its own voice, rate and pitch."""
  pool = sentences(split)
  if n > len(pool):
    raise ValueError(f"the {split} split has {len(pool)} usable sentences, {n} asked for")
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(pool), size=n, replace=False)
  return [synthesize(pool[i], voice=VOICES[int(rng.integers(len(VOICES)))],
                     speed=int(rng.integers(130, 191)), pitch=int(rng.integers(30, 71)))
          for i in picks]


def normalise_text(text: str) -> list[str]:
  """Lowercase words without punctuation (hyphenated words joined), for word error rates."""
  text = text.lower().replace("-", "")
  return re.sub(r"[^a-z0-9' ]+", " ", text).replace("'", "").split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
  """(word edit distance, reference words) after `normalise_text`: WER = errors / words."""
  ref, hyp = normalise_text(reference), normalise_text(hypothesis)
  prev = list(range(len(hyp) + 1))
  for i, r in enumerate(ref, 1):
    cur = [i] + [0] * len(hyp)
    for j, h in enumerate(hyp, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
    prev = cur
  return prev[-1], len(ref)

"""Speech to text: Whisper transcription with the registered decoding strategies.

`transcribe(model, audios, settings)` runs offline decoding: each audio (<= 30 s, 16 kHz) as
Whisper's log-mel window, the encoder once per batch, then any strategy that decodes speech
(`decoding.registry.names("speech")`: greedy, sampling, beam search, ...) on the decoder,
bound to the batch's audio (`models.whisper.AudioContext`) behind the same model boundary the
language models have. Streaming recognition (CarelessWhisper) is `decoding.streaming`.

Command line (one JSON line per file: `text`, `tokens`, and in streaming mode the emission
time of each token):

  python -m decoding.transcribe --config=configs/transcribe.py --input=a.wav,b.wav \
      --output=out.jsonl [--config.model=whisper-base] [--config.streaming=True
      --config.chunk_ms=300]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from decoding import cli, registry
from decoding.errors import GenerationError
from decoding.greedy import Greedy
from decoding.lengths import bucket
from decoding.runner import generate
from decoding.strategy import Target
from models import audio as audio_lib
from models import registry as model_registry
from models import speech, whisper
from models.speech import SpeechModel

@dataclasses.dataclass
class Transcript:
  index: int  # the audio's position in the input
  text: str
  tokens: list[int]  # generated ids, end of text excluded
  score: float  # what the strategy's `score_kind` says
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


@functools.partial(jax.jit, static_argnums=1)
def _encode_and_bind(params, config, mel):
  states = whisper.encode(params, config, mel)
  return whisper.bind_audio(params, config, states)


def transcribe(model: SpeechModel, audios: Sequence[np.ndarray], settings=None, *,
               language: str = "en", task: str = "transcribe", suppress_tokens: bool = True,
               batch_size: int = 8, seed: int = 0, row_ids: Optional[Sequence[int]] = None,
               names: Optional[Sequence[str]] = None, progress: bool = False
               ) -> list[Transcript]:
  """Offline transcription of 16 kHz audios with a speech-capable strategy (default:
  greedy decoding, up to 224 tokens, Whisper's budget for a 30 s window). suppress_tokens:
  Whisper's decoding rules (no special symbols; no blank or end of text first). row_ids: each
  audio's identity for the PRNG of sampling strategies (default: its position), so an audio
  draws the same samples in any batch."""
  settings = Greedy(max_new_tokens=224) if settings is None else settings
  strategy = registry.strategy_of(settings)
  if not strategy.decodes("speech"):
    raise GenerationError(f"strategy {strategy.name!r} does not transcribe speech; these "
                          f"do: {', '.join(registry.names('speech'))}")
  if strategy.modality == "speech":
    raise GenerationError(f"{strategy.name!r} decodes a stream: use decoding.streaming")
  check_audio(audios, names)
  row_ids = list(range(len(audios))) if row_ids is None else [int(r) for r in row_ids]
  if len(row_ids) != len(audios):
    raise GenerationError(f"{len(row_ids)} row ids for {len(audios)} audios")
  start = model.tokenizer.start_sequence(language, task)
  decoder = model.decoder(len(start), suppress=suppress_tokens)
  R = strategy.rows_per_prompt(settings)
  out: list[Transcript] = []
  batches = range(0, len(audios), batch_size)
  for first in (tqdm(batches, desc="transcribing", unit="batch", file=sys.stderr)
                if progress else batches):
    chunk = list(range(first, min(first + batch_size, len(audios))))
    B = min(batch_size, bucket(len(chunk), minimum=1))
    rows = chunk + [chunk[0]] * (B - len(chunk))  # pad rows repeat the first audio
    mel = np.stack([audio_lib.log_mel(audios[i], model.config.n_mels) for i in rows])
    context = _encode_and_bind(model.params, model.config, jnp.asarray(mel))
    target = Target(lm=decoder, params=context, eos_ids=(model.tokenizer.eot,),
                    pad_id=model.tokenizer.eot, name=model.name, sha256=model.sha256)
    gens = generate(target, [list(start)] * len(chunk), settings, seed=seed,
                    batch_size=B * R, row_ids=[row_ids[i] for i in chunk])
    for g in gens:
      ids = [int(t) for t in g.output_ids if int(t) != model.tokenizer.eot]
      out.append(Transcript(index=chunk[g.index], text=model.tokenizer.decode(ids).strip(),
                            tokens=ids, score=float(g.score), rank=int(g.rank)))
  return out


def run(cfg, inputs: Sequence[str], output_path: Optional[str]) -> list[dict]:
  """The command: reads the WAV files, transcribes them, writes one JSON line per file."""
  if not inputs:
    raise GenerationError("give --input=a.wav[,b.wav...]")
  if output_path is None:
    raise GenerationError("give --output=FILE.jsonl")
  flat = cli.as_dict(cfg)
  settings = cli.settings_from_config(flat, "speech")
  if cfg.model not in model_registry.SPEECH_MODELS and not os.path.isdir(cfg.model):
    raise GenerationError(f"unknown speech model {cfg.model!r}: not a registered one "
                          f"({sorted(model_registry.SPEECH_MODELS)}) and no such folder")
  if cfg.streaming:
    raise GenerationError("streaming transcription (--config.streaming=True) is not built "
                          "yet: transcribe offline")
  audios = []
  for path in inputs:
    try:
      audios.append(audio_lib.read_wav(path))
    except audio_lib.AudioError as e:
      raise GenerationError(str(e)) from None
  model = speech.load_whisper(cfg.model)
  results = transcribe(model, audios, settings, language=cfg.language, task=cfg.task,
                       suppress_tokens=cfg.suppress_tokens, batch_size=int(cfg.batch_size),
                       seed=int(cfg.seed), names=list(inputs), progress=len(inputs) > 1)
  lines = [t.to_json(file=inputs[t.index]) for t in results]
  with open(output_path, "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return lines


def main() -> None:
  # flags are defined here, not at import, so importing this module never collides with
  # another command's --config / --input / --output
  config = config_flags.DEFINE_config_file("config", "configs/transcribe.py",
                                           "Transcription config file.")
  inputs = flags.DEFINE_list("input", None, "WAV files to transcribe (comma-separated)")
  output = flags.DEFINE_string("output", None, "results file: one JSON line per input")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
    try:
      lines = run(config.value, inputs.value or [], output.value)
    except (GenerationError, FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    for line in lines:
      print(f"{line['file']} [{line['rank']}]: {line['text']}")

  app.run(_main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  main()

"""Speech to text: Whisper transcription with the registered decoding strategies.

`transcribe(model, audios, settings)` runs offline decoding: each audio (<= 30 s, 16 kHz) as
Whisper's log-mel window, the encoder once per batch, then any strategy that decodes speech
(`decoding.registry.names("speech")`: greedy, sampling, beam search, ...) on the decoder,
bound to the batch's audio (`models.whisper.AudioContext`) behind the same model boundary the
language models have. The streaming strategies (CarelessWhisper: `decoding.streaming`,
`decoding.stream_beam`) run through the same call; `causal_transcribe` decodes their causal
model offline, on the whole recording.

Command line (one JSON line per file: `text`, `tokens`, and in streaming mode the emission
time of each token):

  python -m decoding.transcribe --config=configs/transcribe.py --input=a.wav,b.wav \
      --output=out.jsonl [--config.model=whisper-base] [--config.streaming=True
      --config.chunk_ms=300]
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from decoding import cli, registry, streaming
from decoding.errors import GenerationError
from decoding.greedy import Greedy
from decoding.lengths import bucket
from decoding.runner import generate
from decoding.strategy import Target
from decoding.transcripts import Transcript, check_audio
from models import audio as audio_lib
from models import speech, whisper
from models.speech import SpeechModel


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
  check_audio(audios, names)
  if strategy.modality == "speech":  # a streaming strategy (CarelessWhisper)
    return streaming.stream_transcribe(model, audios, settings, language=language, task=task,
                                       suppress_tokens=suppress_tokens, batch_size=batch_size)
  row_ids = list(range(len(audios))) if row_ids is None else [int(r) for r in row_ids]
  if len(row_ids) != len(audios):
    raise GenerationError(f"{len(row_ids)} row ids for {len(audios)} audios")
  encode = lambda rows: _encode_and_bind(model.params, model.config, jnp.asarray(
      np.stack([audio_lib.log_mel(audios[i], model.config.n_mels) for i in rows])))
  return _decode_audio(model, len(audios), encode, settings, language, task, suppress_tokens,
                       batch_size, seed, row_ids, progress)


def _decode_audio(model: SpeechModel, n: int, encode, settings, language: str, task: str,
                  suppress_tokens: bool, batch_size: int, seed: int, row_ids: Sequence[int],
                  progress: bool = False) -> list[Transcript]:
  """Any speech-capable token strategy on the decoder, batch by batch; `encode(rows)` gives
  the `AudioContext` of a batch's audios (rows: audio indices, padded to a bucket by
  repeating the first)."""
  start = model.tokenizer.start_sequence(language, task)
  decoder = model.decoder(len(start), suppress=suppress_tokens)
  R = registry.strategy_of(settings).rows_per_prompt(settings)
  eot = model.tokenizer.eot
  out: list[Transcript] = []
  batches = range(0, n, batch_size)
  for first in (tqdm(batches, desc="transcribing", unit="batch", file=sys.stderr)
                if progress else batches):
    chunk = list(range(first, min(first + batch_size, n)))
    B = min(batch_size, bucket(len(chunk), minimum=1))
    rows = chunk + [chunk[0]] * (B - len(chunk))  # pad rows repeat the first audio
    target = Target(lm=decoder, params=encode(rows), eos_ids=(eot,), pad_id=eot,
                    name=model.name, sha256=model.sha256)
    gens = generate(target, [list(start)] * len(chunk), settings, seed=seed,
                    batch_size=B * R, row_ids=[row_ids[i] for i in chunk])
    for g in gens:
      ids = [int(t) for t in g.output_ids if int(t) != eot]
      out.append(Transcript(index=chunk[g.index], text=model.tokenizer.decode(ids).strip(),
                            tokens=ids, score=float(g.score), rank=int(g.rank)))
  return out


def causal_transcribe(model: SpeechModel, audios: Sequence[np.ndarray],
                      stream: streaming.StreamGreedy, decode=None, *, language: str = "en",
                      task: str = "transcribe", suppress_tokens: bool = True,
                      batch_size: int = 8) -> list[Transcript]:
  """Offline decoding (any speech strategy, default greedy) of the causal model that
  `stream` runs: the whole recording at once through the same causal front end and
  block-causal encoder. With `stream.settle`, streaming ends with these greedy tokens."""
  decode = Greedy(max_new_tokens=stream.max_new_tokens) if decode is None else decode
  check_audio(audios)

  def encode(rows):
    plans = [streaming.plan(stream, len(audios[i])) for i in rows]
    steps = max(plans, key=len)
    mel = np.stack([audio_lib.streaming_log_mel(audios[i], steps, model.config.n_mels)
                    for i in rows])
    return streaming.encode_causal(model.params, model.config, jnp.asarray(mel),
                                   jnp.asarray([p[-1] for p in plans], jnp.int32),
                                   chunk_frames=stream.chunk_frames,
                                   first_chunks=stream.first_chunks)

  return _decode_audio(model, len(audios), encode, decode, language, task, suppress_tokens,
                       batch_size, 0, list(range(len(audios))))


def run(cfg, inputs: Sequence[str], output_path: Optional[str]) -> list[dict]:
  """The command: reads the WAV files, transcribes them, writes one JSON line per file."""
  if not inputs:
    raise GenerationError("give --input=a.wav[,b.wav...]")
  if output_path is None:
    raise GenerationError("give --output=FILE.jsonl")
  flat = cli.as_dict(cfg)
  if flat.get("streaming"):  # the streaming version of the chosen strategy
    name = flat.get("strategy") or "greedy"
    versions = {"greedy": "stream_greedy", "beam": "stream_beam"}
    if name not in versions and name not in versions.values():
      raise GenerationError(f"strategy {name!r} has no streaming version; streaming decodes "
                            "with greedy or beam")
    flat["strategy"] = versions.get(name, name)
  settings = cli.settings_from_config(flat, "speech")
  if cfg.model not in speech.registered_names() and not os.path.isdir(cfg.model):
    raise GenerationError(f"unknown speech model {cfg.model!r}: not a registered one "
                          f"({speech.registered_names()}) and no such folder")
  audios = []
  for path in inputs:
    try:
      audios.append(audio_lib.read_wav(path))
    except audio_lib.AudioError as e:
      raise GenerationError(str(e)) from None
  model = speech.load_whisper(cfg.model)
  if (registry.strategy_of(settings).modality == "speech" and model.streaming is not None
      and flat.get("chunk_ms") is None and flat.get("first_chunks") is None):
    settings = settings.replace(**model.streaming)  # the chunking the model was trained for
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

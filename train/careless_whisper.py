"""LoRA fine-tuning of Whisper into a causal streaming recogniser: "Turning Whisper into a
Causal Streaming Model" (CarelessWhisper; Krichli, Raj, Keshet, 2025).

    python -m train.careless_whisper --config=configs/careless_whisper.py \
        --config.chunk_ms=300 [--workdir=DIR]

writes a `speech_adapter` artifact (the LoRA adapters and the chunk size they were trained
for) that `models.speech.load_whisper` merges into the base model, and that
`python -m decoding.transcribe --config.model=careless-whisper-tiny.en-300ms
--config.streaming=True` streams with.

Training examples are synthesised sentences with exact word times
(`models.datasets.spoken`). For each utterance:
* the encoder runs once on the causal front end's mel with the block-causal mask (chunks of
  g = chunk_ms / 20 frames, the first `first_chunks` chunks one block), so frames before a
  chunk boundary never see the audio after it, as in streaming;
* a fraction (`streaming_fraction`, 0.25) of the chunk ends i is drawn, from the first block
  to about a second past the last word; for each, the decoder sees only the encoder frames
  before (i + 1) g and is teacher-forced on the whole transcript with labels cut at that
  time: tokens that ended by then are targets, the first token not yet spoken gets end of
  text (the model learns to stop where the evidence ends), later ones are ignored.
  A token's end time splits its word's interval evenly across the word's tokens.
The loss is the mean cross-entropy over every kept target of every sampled chunk; the base
weights stay frozen, LoRA (rank 16, scale alpha / rank = 1) adapts the query, key, value and
output projections of the encoder's self-attention and the decoder's self- and cross-attention.

Differences from the reference code, each for exactness or cost: the block-causal mask is
applied in training (the reference trains with a bidirectional encoder on audio prefixes but
streams with a cached, block-causal one); one encoder pass serves every sampled chunk of an
utterance and all of them make one optimizer step (the reference re-encodes each prefix and
steps per chunk); prompt tokens are not targets; every word is tokenised with its leading
space (as Whisper writes text); a chunk past the end of text keeps the full labels (the
reference then overwrites its first label with end of text).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import audio as audio_lib
from models import speech, whisper
from models.datasets import spoken
from train import lora, optim, script, trainer as trainer_lib
from train.data import FunctionData

ATTENTION = tuple(f"{block}/{proj}" for block in ("self_attn", "cross_attn")
                  for proj in ("q_proj", "k_proj", "v_proj", "out_proj"))
EOT_DELAY = 0.5  # seconds after the last word at which end of text is due (the reference's)
IGNORE = -1


def token_times(tokenizer, words: Sequence[spoken.Word]) -> tuple[list[int], list[float]]:
  """The transcript's tokens (each word with its leading space) and each token's end time:
  a word's interval split evenly over its tokens."""
  ids, ends = [], []
  for w in words:
    toks = tokenizer.encode(" " + w.text)
    n = len(toks)
    ids += toks
    ends += [w.start + (j + 1) * (w.end - w.start) / n for j in range(n)]
  return ids, ends


def streaming_targets(start: Sequence[int], ids: Sequence[int], ends: Sequence[float],
                      t: float, eot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Teacher-forcing rows for an audio prefix of `t` seconds.

  Returns (inputs [P + T], targets [P + T], weights [P + T]) with inputs = start + ids,
  targets[p] the token after inputs[p] (end of text after the last). Targets of prompt
  positions get weight 0; text targets whose end time is <= t weight 1; the first target
  not yet spoken becomes end of text (weight 1) and the rest get weight 0. A prefix past the
  final end of text (last end + 0.5 s) keeps every target."""
  P, T = len(start), len(ids)
  inputs = np.asarray(list(start) + list(ids), np.int32)
  targets = np.asarray(list(inputs[1:]) + [eot], np.int32)
  due = np.asarray([-np.inf] * (P - 1) + list(ends) + [(ends[-1] if T else 0.0) + EOT_DELAY])
  weights = np.zeros(P + T, np.float32)
  weights[P - 1:] = 1.0
  late = np.flatnonzero((due > t) & (np.arange(P + T) >= P - 1))
  if late.size:
    f = late[0]
    targets[f] = eot
    weights[f + 1:] = 0.0
  return inputs, targets, weights


def chunk_range(last_end: float, chunk_frames: int, first_chunks: int,
                max_frames: int) -> range:
  """Chunk indices i (the prefix ends at (i + 1) chunk_frames encoder frames) worth training
  on: from the first block to about a second past the last word's end of text."""
  chunk_s = chunk_frames * audio_lib.SAMPLES_PER_ENCODER_FRAME / audio_lib.SAMPLE_RATE
  last = int((last_end + EOT_DELAY) // chunk_s) + int(math.ceil(1.0 / chunk_s))
  return range(first_chunks - 1, max(first_chunks, min(last + 1, max_frames // chunk_frames)))


@dataclasses.dataclass
class Examples:
  """Training utterances prepared once: each one's causal mel over a common plan of frames,
  decoder inputs and token end times (padded)."""
  mel: np.ndarray  # [N, n_mels, 2 G + 1]
  ids: list  # per utterance: token ids
  ends: list  # per utterance: token end times (s)
  frames: int  # G: encoder frames every utterance is encoded for


def prepare(model: speech.SpeechModel, utterances: Sequence[spoken.Utterance],
            chunk_frames: int, first_chunks: int) -> Examples:
  ids, ends, ranges = [], [], []
  for u in utterances:
    i, e = token_times(model.tokenizer, u.words)
    ids.append(i)
    ends.append(e)
    ranges.append(chunk_range(e[-1], chunk_frames, first_chunks, model.config.audio_positions))
  G = max(r.stop for r in ranges) * chunk_frames
  steps = [first_chunks * chunk_frames] + list(range((first_chunks + 1) * chunk_frames, G + 1,
                                                      chunk_frames))
  mel = np.stack([audio_lib.streaming_log_mel(u.audio, steps, model.config.n_mels)
                  for u in utterances])
  return Examples(mel=mel, ids=ids, ends=ends, frames=steps[-1])


def make_batches(ex: Examples, start: Sequence[int], eot: int, chunk_frames: int,
                 first_chunks: int, batch_size: int, fraction: float, max_chunks: int,
                 seed: int, max_frames: int) -> FunctionData:
  """Batches as a pure function of the step: `batch_size` utterances (a fresh permutation
  per epoch) and, for each, int(fraction x chunks) + 1 sampled chunk ends (at most
  `max_chunks`; shorter lists padded with weight-0 copies)."""
  N = len(ex.ids)
  L = len(start) + max(len(i) for i in ex.ids)
  chunk_s = chunk_frames * audio_lib.SAMPLES_PER_ENCODER_FRAME / audio_lib.SAMPLE_RATE

  def fn(step: int, rng: np.random.Generator) -> dict:
    epoch, offset = divmod(step * batch_size, N)
    order = np.random.default_rng([seed, epoch]).permutation(N)
    pick = [order[(offset + j) % N] for j in range(batch_size)]
    K = max_chunks
    inputs = np.full((batch_size, K, L), eot, np.int32)
    targets = np.full((batch_size, K, L), eot, np.int32)
    weights = np.zeros((batch_size, K, L), np.float32)
    frames = np.full((batch_size, K), first_chunks * chunk_frames, np.int32)
    for b, n in enumerate(pick):
      r = chunk_range(ex.ends[n][-1], chunk_frames, first_chunks, max_frames)
      k = min(K, int(fraction * len(r)) + 1, len(r))
      chosen = np.sort(rng.choice(np.asarray(r), size=k, replace=False))
      for j, i in enumerate(chosen):
        x, y, w = streaming_targets(start, ex.ids[n], ex.ends[n], (i + 1) * chunk_s, eot)
        inputs[b, j, :x.size], targets[b, j, :y.size], weights[b, j, :w.size] = x, y, w
        frames[b, j] = (i + 1) * chunk_frames
    return {"mel": ex.mel[pick], "inputs": inputs, "targets": targets, "weights": weights,
            "frames": frames}

  return FunctionData(fn, seed=seed)


def streaming_loss(config: whisper.WhisperConfig, chunk_frames: int, first_chunks: int):
  """loss_fn(params, batch, key) -> (mean cross-entropy over the kept targets, metrics)."""
  decoder = whisper.WhisperDecoder(config)

  def loss_fn(params, batch, key):
    del key
    mel = batch["mel"]  # [B, n_mels, 2G + 1]
    B, K, L = batch["inputs"].shape
    G = (mel.shape[-1] - 1) // 2
    mask = whisper.block_causal_mask(G + 1, chunk_frames, first_chunks)
    states = whisper.encode(params, config, mel, mask)[:, :G]
    k, v = whisper.cross_kv(params, config, states)
    rep = lambda x: jnp.repeat(x, K, axis=0)  # each utterance's audio for its K chunks
    context = whisper.AudioContext(decoder=params["decoder"], cross_k=tuple(map(rep, k)),
                                   cross_v=tuple(map(rep, v)),
                                   frames=batch["frames"].reshape(B * K))
    inputs = batch["inputs"].reshape(B * K, L)
    out = decoder(context, inputs, jnp.broadcast_to(jnp.arange(L), (B * K, L)), None)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"].reshape(B * K, L)[..., None], -1)[..., 0]
    w = batch["weights"].reshape(B * K, L)
    count = jnp.maximum(w.sum(), 1.0)
    loss = (nll * w).sum() / count
    return loss, {"loss": loss, "targets": w.sum()}

  return loss_fn


def validate(config: Any) -> None:
  optim.validate(config.optimizer)
  if config.chunk_ms % 20 or config.chunk_ms < 20:
    raise ValueError(f"chunk_ms must be a positive multiple of 20, got {config.chunk_ms}")
  for name in ("first_chunks", "batch_size", "num_steps", "num_train", "max_chunks"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")
  if not 0 < config.streaming_fraction <= 1:
    raise ValueError(f"streaming_fraction must be in (0, 1], got {config.streaming_fraction}")
  if config.lora.rank < 1 or config.lora.alpha <= 0:
    raise ValueError("lora.rank must be >= 1 and lora.alpha > 0")
  if config.ship and not speech.registry.ARTIFACTS.get(artifact_name(config)):
    raise ValueError(f"ship=True writes a registered adapter, and {artifact_name(config)!r} is "
                     "not one (registered: "
                     f"{sorted(n for n, a in speech.registry.ARTIFACTS.items() if a.kind == speech.ADAPTER_KIND)}"
                     "); pass --config.ship=False to keep it in the workdir only")


def _training_speech(config: Any, workdir: str) -> list:
  """The synthesised training utterances, kept in the workdir so a resumed run does not
  synthesise them again (minutes of espeak-ng calls)."""
  path = os.path.join(workdir, "train_speech.pkl")
  key = (int(config.num_train), int(config.data_seed), "train")
  if os.path.exists(path):
    with open(path, "rb") as f:
      saved_key, utts = pickle.load(f)
    if saved_key == key:
      return utts
  utts = spoken.utterances(key[0], seed=key[1], split=key[2])
  with open(path + ".tmp", "wb") as f:
    pickle.dump((key, utts), f)
  os.replace(path + ".tmp", path)
  return utts


def artifact_name(config: Any) -> str:
  return f"careless-{config.model}-{config.chunk_ms}ms"


def run(config: Any, workdir: str, progress: bool = True) -> dict:
  """Fine-tunes `config.model` for `config.chunk_ms` chunks; saves the adapter artifact to
  `workdir/export` and, with `config.ship`, to its registered checkpoint folder."""
  validate(config)
  workdir = script.prepare_workdir(config, workdir)
  t0 = time.time()
  model = speech.load_whisper(config.model)
  g, first = config.chunk_ms // 20, int(config.first_chunks)
  utts = _training_speech(config, workdir)
  ex = prepare(model, utts, g, first)
  start = model.tokenizer.start_sequence()
  data = make_batches(ex, start, model.tokenizer.eot, g, first, int(config.batch_size),
                      float(config.streaming_fraction), int(config.max_chunks),
                      int(config.seed), model.config.audio_positions)
  rank, alpha = int(config.lora.rank), float(config.lora.alpha)
  adapters = lora.init(model.params, jax.random.PRNGKey(int(config.seed)), rank, ATTENTION)
  assemble = lambda tr, frozen: lora.merge(frozen, tr, alpha, rank)
  optimizer = optim.make_optimizer(config.optimizer, int(config.num_steps))
  trainer = trainer_lib.Trainer(streaming_loss(model.config, g, first), optimizer,
                                assemble=assemble)
  state = trainer.init_state(adapters, jax.random.PRNGKey(int(config.seed)))
  state = trainer.fit(state, model.params, data, int(config.num_steps), workdir=workdir,
                      checkpoint_every=int(config.checkpoint_every), log_every=10,
                      progress=progress)
  info = dict(command="python -m train.careless_whisper --config=configs/careless_whisper.py "
              f"--config.chunk_ms={config.chunk_ms}",
      num_train=int(config.num_train), num_steps=int(config.num_steps),
      seconds=time.time() - t0)
  export = speech.save_adapter(os.path.join(workdir, "export"), model, state.params,
                               rank=rank, alpha=alpha, chunk_ms=int(config.chunk_ms),
                               first_chunks=first, info=info)
  paths = [export]
  if config.ship:
    paths.append(speech.save_adapter(speech.registry.repo_path(
        speech.registry.ARTIFACTS[artifact_name(config)].checkpoint), model, state.params,
        rank=rank, alpha=alpha, chunk_ms=int(config.chunk_ms), first_chunks=first, info=info))
  return script.finish_run(dict(artifacts=paths, seconds=time.time() - t0), workdir)


if __name__ == "__main__":
  script.run_script(run, validate=validate, run_name=artifact_name)

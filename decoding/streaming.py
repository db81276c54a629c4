"""Streaming speech recognition with a causal Whisper: "Turning Whisper into a Causal
Streaming Model" (CarelessWhisper; Krichli, Raj, Keshet, 2025).

The audio arrives in chunks of `chunk_ms` (g = chunk_ms / 20 encoder frames). The front end
is causal (`models.audio.StreamingLogMel`: frames computed once, floored by the running
maximum) and so is the encoder: a block-causal mask in which the first `first_chunks` chunks
form one block and every later chunk sees itself and everything before it, computed
incrementally with a cache of the encoder's keys and values (`models.whisper.encode_block`).
A chunk covering encoder frames [0, G) is decoded once samples up to 320 G + 200 have
arrived (the stem reads one mel frame ahead): 12.5 ms of lookahead.

On each chunk (greedy version, as the reference code does it):
1. re-score the current hypothesis with the decoder against all the audio so far;
2. check the last `look_back` tokens: a token is stable if its logit did not drop since the
   previous chunk's pass, or dropped but is still the argmax (raw logits, after Whisper's
   suppression rules); at the first unstable token the hypothesis is cut there;
3. extend greedily until the model predicts end of text (not appended: the evidence has run
   out for now) or `chunk_tokens` tokens were added in this chunk.
Each token's emission time is the arrival time of the audio of the chunk that wrote it (a
token cut and written again gets the later time). After the last chunk `settle=True`
re-checks the whole hypothesis against the full audio, cuts it at the first token that is not
the argmax and extends to the end of text: the output is then exactly greedy decoding of the
causal model on the whole recording (the reference stops at the last chunk's result).

The reference's own choices kept here: logits, not probabilities, are compared; only the
first pass of a chunk is checked. Ours: prompt tokens are never checked (the reference can
cut <|notimestamps|> when fewer than two text tokens exist).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decoding.errors import GenerationError
from decoding.lengths import bucket
from decoding.settings import Settings, check_bool, check_int, settings
from decoding.strategy import Strategy
from decoding.transcripts import Transcript
from models import audio as audio_lib
from models import whisper

Array = jax.Array
FRAME_MS = 20  # one encoder frame


@settings
class StreamSettings(Settings):
  """The fields every streaming strategy has."""
  chunk_ms: int = 300  # audio per chunk, a multiple of 20 ms (g = chunk_ms / 20 frames)
  first_chunks: int = 2  # chunks in the first encoder block (the reference's extra_gran_blocks + 1)
  look_back: int = 2  # trailing tokens checked for stability on each chunk
  chunk_tokens: int = 28  # at most this many tokens added per chunk (224 // 8 in the reference)
  max_new_tokens: int = 224

  def validate(self) -> None:
    super().validate()
    check_int("chunk_ms", self.chunk_ms, FRAME_MS)
    if self.chunk_ms % FRAME_MS:
      raise GenerationError(f"chunk_ms must be a multiple of {FRAME_MS} ms (one encoder "
                            f"frame), got {self.chunk_ms}")
    check_int("first_chunks", self.first_chunks, 1)
    check_int("look_back", self.look_back, 0)
    check_int("chunk_tokens", self.chunk_tokens, 1)
    check_int("max_new_tokens", self.max_new_tokens, 1)

  @property
  def chunk_frames(self) -> int:
    return self.chunk_ms // FRAME_MS


@settings
class StreamGreedy(StreamSettings):
  """Streaming greedy decoding of a causal Whisper (CarelessWhisper's inference)."""
  settle: bool = False  # after the last chunk: continue to the causal model's greedy output

  def validate(self) -> None:
    super().validate()
    check_bool("settle", self.settle)

  # The streaming driver (`stream_transcribe`) runs any streaming strategy through these.

  def init_state(self, batch: int, start: Sequence[int], length: int, eot: int) -> "StreamState":
    return new_state(batch, start, length, eot)

  def chunk(self, params, decoder, config, mel, enc_caches, context, start, state, active,
            ends, now, *, first: bool, width: int, eot: int):
    return chunk_step(params, decoder, config, mel, enc_caches, context, start, state, active,
                      ends, now, first=first, width=width, look_back=self.look_back,
                      chunk_tokens=self.chunk_tokens, eot=eot)

  def finish(self, decoder, context, state: "StreamState", eot: int) -> "StreamState":
    """The final hypothesis of each stream ([B] rows); NaN emission times mean "after the
    last chunk" (settled tokens)."""
    if self.settle:
      state = settle_step(decoder, context, state, jnp.float32(np.nan),
                          width=state.tokens.shape[1], eot=eot)
    return state


def stable_prefix(prev_logit: Array, logits: Array, tokens: Array, checked: Array) -> Array:
  """The stability rule of streaming decoding, for the last K tokens of each row.

  prev_logit [B, K]: the logit each token had when the previous chunk last scored it;
  logits [B, K, V]: the new logits at the positions that predict those tokens; tokens [B, K];
  checked [B, K] bool: which are checked (generated tokens with a previous score).
  A token is stable if its logit did not drop or it is still the argmax. Returns [B] int32:
  the index of the first unstable token, K if all are stable."""
  K = tokens.shape[1]
  now = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  stable = (now >= prev_logit) | (jnp.argmax(logits, axis=-1) == tokens) | ~checked
  return jnp.where(jnp.all(stable, axis=1), K, jnp.argmin(stable, axis=1)).astype(jnp.int32)


@flax.struct.dataclass
class StreamState:
  tokens: Array  # [B, L] int32: start sequence, then the hypothesis
  length: Array  # [B] int32
  score: Array  # [B, L] float32: at q, the logit token q had when last scored
  emitted: Array  # [B, L] float32: seconds at which token q was written
  prompt_len: int = flax.struct.field(pytree_node=False, default=0)


def new_state(rows: int, start: Sequence[int], length: int, eot: int) -> StreamState:
  """`rows` hypotheses holding only the start sequence, in buffers of `length` tokens."""
  P = len(start)
  return StreamState(tokens=jnp.asarray(np.tile(np.r_[start, np.full(length - P, eot)],
                                                (rows, 1)), jnp.int32),
                     length=jnp.full((rows,), P, jnp.int32),
                     score=jnp.full((rows, length), -jnp.inf, jnp.float32),
                     emitted=jnp.full((rows, length), jnp.nan, jnp.float32), prompt_len=P)


def _rescore(decoder, context, state: StreamState, width: int, look_back: int):
  """The hypothesis through the decoder against the current audio: (cache over the first
  `width` slots with each row's length, logits [B, look_back + 1, V] at the positions
  length - look_back - 1 .. length - 1)."""
  B = state.tokens.shape[0]
  cache = decoder.init_cache(B, width)
  at = jnp.clip(state.length[:, None] - look_back - 1 + jnp.arange(look_back + 1)[None],
                0, width - 1)
  out = decoder(context, state.tokens[:, :width], jnp.broadcast_to(jnp.arange(width), (B, width)),
                cache, logits_at=at)
  return out.cache.with_lengths(state.length), out.logits


def append_token(decoder, context, state: StreamState, cache, tok: Array, going: Array, now,
                 limit: int):
  """Writes `tok` [N] at the end of each `going` row (with the emission time `now`) and runs
  the decoder on it: (state, cache, the next logits [N, V]; rows not going are unchanged
  but for their logits, which the caller ignores)."""
  N = tok.shape[0]
  rows = jnp.arange(N)
  pos = jnp.minimum(state.length, limit - 1)  # where the token goes (rows not going: unused)
  put = lambda arr, val: arr.at[rows, pos].set(jnp.where(going, val, arr[rows, pos]))
  state = state.replace(tokens=put(state.tokens, tok),
                        emitted=put(state.emitted, jnp.broadcast_to(now, (N,))),
                        length=state.length + going.astype(jnp.int32))
  out = decoder(context, tok[:, None], pos[:, None], cache.with_lengths(pos))
  return state, out.cache.with_lengths(state.length), out.logits[:, 0]


def _extend(decoder, context, state: StreamState, cache, logits: Array, active: Array,
            budget: int, eot: int, now: Array, width: int):
  """Greedy extension of every active row until it predicts end of text, `budget` tokens
  were added or the cache is full. logits [B, V]: the prediction for position length."""
  B = state.tokens.shape[0]
  rows = jnp.arange(B)
  limit = jnp.minimum(width, state.tokens.shape[1])

  def cond(c):
    i, _, _, _, going = c
    return (i < budget) & jnp.any(going)

  def body(c):
    i, st, cache, logits, going = c
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    going = going & (tok != eot) & (st.length < limit)
    pos = jnp.minimum(st.length, limit - 1)
    chosen = jnp.take_along_axis(logits, tok[:, None], 1)[:, 0]
    score = st.score.at[rows, pos].set(jnp.where(going, chosen, st.score[rows, pos]))
    st, cache, new_logits = append_token(decoder, context, st.replace(score=score), cache, tok,
                                         going, now, limit)
    logits = jnp.where(going[:, None], new_logits, logits)
    return i + 1, st, cache, logits, going

  _, state, cache, logits, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), state, cache, logits, active))
  return state


@functools.partial(jax.jit, static_argnames=("decoder", "config", "first", "width",
                                             "look_back", "chunk_tokens", "eot"))
def chunk_step(params, decoder, config, mel, enc_caches, context, start, state: StreamState,
               active, ends, now, *, first: bool, width: int, look_back: int,
               chunk_tokens: int, eot: int):
  """One chunk of the stream for B rows in lockstep: encode the new frames (mel window, see
  `whisper.stem_block`), add them to the decoder's audio, re-score, check stability and
  extend. Rows not `active` (their audio ended) keep their state. ends [B]: each row's last
  encoder frame (its audio's), which bounds the frames its decoder sees."""
  states, enc_caches = whisper.encode_block(params, config, mel, enc_caches, start, first)
  context = whisper.extend_audio(params, config, context, states, start)
  context = context.replace(frames=jnp.minimum(context.frames, ends))
  cache, logits = _rescore(decoder, context, state, width, look_back)
  B, K = state.tokens.shape[0], look_back
  if K:
    q = state.length[:, None] - K + jnp.arange(K)[None]  # positions of the checked tokens
    qc = jnp.clip(q, 0, state.tokens.shape[1] - 1)
    toks = jnp.take_along_axis(state.tokens, qc, 1)
    prev = jnp.take_along_axis(state.score, qc, 1)
    checked = (q >= state.prompt_len) & jnp.isfinite(prev)
    cut = stable_prefix(prev, logits[:, :K], toks, checked)  # [B] in 0..K
    new_len = jnp.where(cut < K, state.length - K + cut, state.length)
    rows = jnp.arange(B)[:, None]
    kept = (jnp.arange(K)[None] < cut[:, None]) & (q >= state.prompt_len)
    now_scores = jnp.take_along_axis(logits[:, :K], toks[..., None], -1)[..., 0]
    score = state.score.at[rows, qc].set(jnp.where(kept, now_scores, prev))
    nxt = jnp.take_along_axis(logits, jnp.minimum(cut, K)[:, None, None], 1)[:, 0]
    moved = state.replace(length=new_len, score=score)
  else:
    moved, nxt = state, logits[:, 0]
  extended = _extend(decoder, context, moved, cache.rollback(moved.length), nxt, active,
                     chunk_tokens, eot, now, width)
  keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return jax.tree.map(keep, extended, state), enc_caches, context


@functools.partial(jax.jit, static_argnames=("decoder", "width", "eot"))
def settle_step(decoder, context, state: StreamState, now, *, width: int, eot: int):
  """After the last chunk: cut each hypothesis at its first token that is not the argmax
  against the whole audio, then extend greedily to the end of text."""
  B, L = state.tokens.shape
  cache = decoder.init_cache(B, width)
  out = decoder(context, state.tokens[:, :width], jnp.broadcast_to(jnp.arange(width), (B, width)),
                cache)
  best = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)  # [B, width]: prediction for q + 1
  q = jnp.arange(1, width)[None]
  wrong = (q >= state.prompt_len) & (q < state.length[:, None]) & (
      best[:, :-1] != state.tokens[:, 1:width])
  first_wrong = jnp.where(jnp.any(wrong, 1), jnp.argmax(wrong, 1) + 1, state.length)
  state = state.replace(length=first_wrong.astype(jnp.int32))
  nxt = jnp.take_along_axis(out.logits, (state.length - 1)[:, None, None], 1)[:, 0]
  return _extend(decoder, context, state, out.cache.with_lengths(state.length), nxt,
                 jnp.ones((B,), bool), width, eot, now, width)


def plan(settings, num_samples: int) -> list[int]:
  """Encoder frames covered after each decoded chunk, up to the end of the audio."""
  g = settings.chunk_frames
  total = max(1, math.ceil(num_samples / audio_lib.SAMPLES_PER_ENCODER_FRAME))
  first = g * settings.first_chunks
  steps = [first] + [first + g * (i + 1) for i in range(max(0, math.ceil((total - first) / g)))]
  return steps


def stream_transcribe(model, audios: Sequence[np.ndarray], settings, *,
                      language: str = "en", task: str = "transcribe",
                      suppress_tokens: bool = True, batch_size: int = 8) -> list:
  """Streams each audio chunk by chunk (rows of a batch in lockstep, each row stopping at the
  end of its own audio) and returns one `decoding.transcribe.Transcript` per audio, with the
  emission time of each token (seconds from the start of its audio)."""
  start_seq = model.tokenizer.start_sequence(language, task)
  P = len(start_seq)
  L = P + settings.max_new_tokens
  if L > model.config.text_positions:
    raise GenerationError(f"max_new_tokens={settings.max_new_tokens} plus the {P}-token start "
                          f"sequence exceed Whisper's {model.config.text_positions} positions")
  decoder = model.decoder(P, suppress=suppress_tokens)
  eot = model.tokenizer.eot
  out = []
  for first in range(0, len(audios), batch_size):
    idx = list(range(first, min(first + batch_size, len(audios))))
    B = bucket(len(idx), minimum=1)
    rows = idx + [idx[0]] * (B - len(idx))
    plans = [plan(settings, len(audios[i])) for i in rows]
    steps = max(plans, key=len)
    if steps[-1] > model.config.audio_positions:
      raise GenerationError(f"audio of {steps[-1] * FRAME_MS / 1000:.1f} s exceeds the "
                            f"encoder's {model.config.audio_positions * FRAME_MS / 1000:.0f} s")
    ends = jnp.asarray([p[-1] for p in plans], jnp.int32)
    mels = []
    for i in rows:
      mels.append(audio_lib.streaming_log_mel(audios[i], steps, model.config.n_mels))
    mel = np.stack(mels)  # [B, n_mels, 2 * steps[-1] + 1]
    state = settings.init_state(B, start_seq, L, eot)
    enc = whisper.init_encoder_cache(model.config, B)
    context = whisper.empty_audio(model.params, model.config, B)
    begin = 0
    for s, G in enumerate(steps):
      window = mel[:, :, :2 * G + 1] if s == 0 else mel[:, :, 2 * begin - 2: 2 * G + 1]
      active = jnp.asarray([G <= p[-1] for p in plans])
      now = jnp.float32(audio_lib.samples_for_encoder_frames(G) / audio_lib.SAMPLE_RATE)
      longest = int(jnp.max(state.length))  # the re-scoring width: a few compiled sizes
      width = min(L, bucket(longest + settings.chunk_tokens, minimum=32))
      state, enc, context = settings.chunk(
          model.params, decoder, model.config, jnp.asarray(window), enc, context, begin,
          state, active, ends, now, first=s == 0, width=width, eot=eot)
      begin = G
    state = settings.finish(decoder, context, state, eot)
    tokens, length, emitted = (np.asarray(x) for x in (state.tokens, state.length,
                                                        state.emitted))
    for b, i in enumerate(idx):
      ids = [int(t) for t in tokens[b, P:length[b]]]
      times = [float(t) for t in emitted[b, P:length[b]]]
      # tokens written after the last chunk (settled): at the end of the audio
      end = audio_lib.samples_for_encoder_frames(plans[b][-1]) / audio_lib.SAMPLE_RATE
      times = [end if math.isnan(t) else t for t in times]
      out.append(Transcript(index=i, text=model.tokenizer.decode(ids).strip(), tokens=ids,
                            score=None, emit_seconds=times))
  return out


@functools.partial(jax.jit, static_argnames=("config", "chunk_frames", "first_chunks"))
def encode_causal(params, config, mel, ends, *, chunk_frames: int, first_chunks: int):
  """The causal model's audio context for whole recordings: the block-causal encoder on the
  streaming mel [B, n_mels, 2G + 1], row b's decoder seeing its first ends[b] frames."""
  G = (mel.shape[-1] - 1) // 2
  mask = whisper.block_causal_mask(G + 1, chunk_frames, first_chunks)
  states = whisper.encode(params, config, mel, mask)[:, :G]
  return whisper.bind_audio(params, config, states, ends)


def refuse_token_prompts(*args, **kwargs):
  """The `pipeline` of the streaming strategies, which never take token prompts."""
  raise GenerationError("streaming strategies decode audio streams: use decoding.transcribe "
                        "with streaming=True (or decoding.streaming.stream_transcribe)")


STRATEGY = Strategy("stream_greedy", StreamGreedy, "CarelessWhisper streaming: a causal "
                    "encoder fed chunk by chunk, stable tokens kept, the rest re-decoded",
                    modality="speech", pipeline=refuse_token_prompts)

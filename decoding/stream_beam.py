"""Streaming beam search for a causal Whisper: the beam version of CarelessWhisper's streaming
decoder ("Turning Whisper into a Causal Streaming Model", Krichli, Raj, Keshet, 2025).

Each stream keeps `num_beams` hypotheses across chunks. On each chunk:
1. every beam is re-scored against all the audio so far; its score becomes the sum of its
   tokens' log-probabilities under the new audio;
2. stability: each of a beam's last `look_back` tokens is stable iff it is among the top
   `num_beams` tokens of the new logits at its position; the beam is cut at its first
   unstable token (beams that become copies of a better one drop out);
3. beam search extends the beams: each expands into its top num_beams + 1 next tokens, the
   best num_beams of the pooled candidates are kept, until a kept candidate is end of text,
   which ends the stream's chunk without applying that step (the reference code ends the
   chunk when any kept beam finishes and drops each beam's newest token), or `chunk_tokens`
   steps were taken.
After the last chunk the beam with the best mean token log-probability is the transcript.
Emission times follow the beams: a token keeps the time of the chunk that wrote it.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from decoding.settings import check_int, settings
from decoding.strategy import Strategy
from decoding.streaming import (StreamSettings, StreamState, append_token, new_state,
                                refuse_token_prompts)
from models import whisper

Array = jax.Array
NEG = -1e30


@settings
class StreamBeam(StreamSettings):
  """Streaming beam search of a causal Whisper (CarelessWhisper's beam inference)."""
  num_beams: int = 4

  def validate(self) -> None:
    super().validate()
    check_int("num_beams", self.num_beams, 1)

  def init_state(self, batch: int, start: Sequence[int], length: int, eot: int) -> StreamState:
    # score[:, 0] holds each beam's running score (position 0 is the start token, never
    # scored); the first chunk starts from beam 0 alone
    state = new_state(batch * self.num_beams, start, length, eot)
    first = jnp.tile(jnp.r_[0.0, jnp.full((self.num_beams - 1,), NEG)], batch)
    return state.replace(score=state.score.at[:, 0].set(first))

  def chunk(self, params, decoder, config, mel, enc_caches, context, start, state, active,
            ends, now, *, first: bool, width: int, eot: int):
    return beam_chunk_step(params, decoder, config, mel, enc_caches, context, start, state,
                           active, ends, now, first=first, width=width, eot=eot,
                           beams=self.num_beams, look_back=self.look_back,
                           chunk_tokens=self.chunk_tokens)

  def finish(self, decoder, context, state: StreamState, eot: int) -> StreamState:
    K = self.num_beams
    B = state.tokens.shape[0] // K
    n = jnp.maximum(state.length - state.prompt_len, 1)
    mean = (state.score[:, 0] / n).reshape(B, K)
    best = jnp.arange(B) * K + jnp.argmax(mean, axis=1)
    return jax.tree.map(lambda x: x[best], state)


def in_top_k(logits: Array, tokens: Array, k: int) -> Array:
  """The beam stability rule: whether each token is among the k highest logits at its
  position (fewer than k tokens score strictly higher). logits [..., V], tokens [...]."""
  mine = jnp.take_along_axis(logits, tokens[..., None], -1)
  return jnp.sum(logits > mine, axis=-1) < k


def _token_logps(logits: Array, tokens: Array) -> Array:
  """log p(tokens[:, q + 1] | prefix) from logits at q: [N, W - 1]."""
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


@functools.partial(jax.jit, static_argnames=("decoder", "config", "first", "width", "eot",
                                             "beams", "look_back", "chunk_tokens"))
def beam_chunk_step(params, decoder, config, mel, enc_caches, context, start,
                    state: StreamState, active, ends, now, *, first: bool, width: int, eot: int,
                    beams: int, look_back: int, chunk_tokens: int):
  K = beams
  states, enc_caches = whisper.encode_block(params, config, mel, enc_caches, start, first)
  context = whisper.extend_audio(params, config, context, states, start)
  context = context.replace(frames=jnp.minimum(context.frames, ends))
  N = state.tokens.shape[0]
  B = N // K
  P = state.prompt_len
  stream = jnp.arange(N) // K
  cache = decoder.init_cache(N, width).replace(audio_row=stream)
  tokens = state.tokens[:, :width]
  out = decoder(context, tokens, jnp.broadcast_to(jnp.arange(width), (N, width)), cache)
  logits = out.logits  # [N, W, V]
  q = jnp.arange(1, width)[None]
  scored = (q >= P) & (q < state.length[:, None])  # generated tokens
  lp = _token_logps(logits, tokens)  # [N, W - 1]: token q's log-prob at index q - 1
  # stability: token q (the last look_back generated ones) in the top K at q - 1
  checked = scored & (q >= state.length[:, None] - look_back) & jnp.asarray(not first)
  unstable = checked & ~in_top_k(logits[:, :-1], tokens[:, 1:], K)
  cut = jnp.where(jnp.any(unstable, 1), jnp.argmax(unstable, 1) + 1, state.length)
  length = cut.astype(jnp.int32)
  keep = (q >= P) & (q < length[:, None])
  running = jnp.where(state.score[:, 0] <= NEG / 2, NEG, 0.0)  # beams not started stay out
  score = running + jnp.sum(jnp.where(keep, lp, 0.0), axis=1)
  # beams that are now copies of a better beam of their stream drop out
  toks = jnp.where(jnp.arange(state.tokens.shape[1])[None] < length[:, None], state.tokens, -1)
  same = jnp.all(toks[:, None, :] == toks[None, :, :], -1) & (length[:, None] == length[None, :])
  same = same & (stream[:, None] == stream[None, :])
  earlier = jnp.arange(N)[None, :] < jnp.arange(N)[:, None]
  dup = jnp.any(same & earlier & (score[None, :] >= NEG / 2), axis=1)
  score = jnp.where(dup, NEG, score)
  nxt = jnp.take_along_axis(logits, (length - 1)[:, None, None], 1)[:, 0]  # [N, V]
  moved = state.replace(length=length, score=state.score.at[:, 0].set(score))
  cache = out.cache.with_lengths(length)
  grown = _beam_extend(decoder, context, moved, cache, nxt, active, K, chunk_tokens, eot, now,
                       width)
  act = jnp.repeat(active, K)
  keep_rows = lambda new, old: jnp.where(act.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return jax.tree.map(keep_rows, grown, state), enc_caches, context


def _beam_extend(decoder, context, state: StreamState, cache, logits, active, K, budget, eot,
                 now, width):
  N, V = logits.shape
  B = N // K
  limit = min(width, state.tokens.shape[1])

  def cond(c):
    i, _, _, _, going = c
    return (i < budget) & jnp.any(going)

  def body(c):
    i, st, cache, logits, going = c
    score = st.score[:, 0]
    cand = score[:, None] + jax.nn.log_softmax(logits, axis=-1)  # [N, V]
    val, tok = jax.lax.top_k(cand, K + 1)  # [N, K + 1]
    val, tok = val.reshape(B, K * (K + 1)), tok.reshape(B, K * (K + 1))
    best, pick = jax.lax.top_k(val, K)  # [B, K]
    parent = jnp.arange(B)[:, None] * K + pick // (K + 1)
    new_tok = jnp.take_along_axis(tok, pick, 1)
    full = jnp.any(st.length.reshape(B, K) >= limit, axis=1)
    ends_here = jnp.any((new_tok == eot) & (best > NEG / 2), axis=1) | full
    go = going & ~ends_here  # [B]: streams that take this step
    rows = jnp.where(go[:, None], parent, jnp.arange(B)[:, None] * K + jnp.arange(K)[None])
    rows = rows.reshape(N)
    moved = jax.tree.map(lambda x: x[rows], st)
    cache = cache.take_rows(rows)
    go_n = jnp.repeat(go, K)
    new_tok, best = new_tok.reshape(N), best.reshape(N)
    moved = moved.replace(score=moved.score.at[:, 0].set(jnp.where(go_n, best,
                                                                   moved.score[:, 0])))
    moved, cache, new_logits = append_token(decoder, context, moved, cache, new_tok, go_n, now,
                                            limit)
    logits = jnp.where(go_n[:, None], new_logits, logits)
    return i + 1, moved, cache, logits, go

  _, state, _, _, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), state, cache, logits, active))
  return state


STRATEGY = Strategy("stream_beam", StreamBeam, "CarelessWhisper streaming beam search: beams "
                    "re-scored on each chunk, tokens outside the new top-B cut, beams "
                    "extended until one ends", modality="speech", pipeline=refuse_token_prompts)

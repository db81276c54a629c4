"""Whisper in Flax: the encoder-decoder speech recogniser of "Robust Speech Recognition via
Large-Scale Weak Supervision" (Radford et al., 2022).

Encoder: two 1-D convolutions over the log-mel frames (kernel 3; the second with stride 2,
so one encoder frame per 20 ms), GELU after each, fixed sinusoidal positions, then pre-norm
transformer layers (LayerNorm, self-attention, LayerNorm, GELU MLP) and a final LayerNorm.
Its self-attention takes an optional mask: a block-causal one makes the encoder causal at
chunk granularity (`block_causal_mask`, CarelessWhisper's streaming encoder).

Decoder: token embeddings plus learned positions, pre-norm layers of causal self-attention,
cross-attention to the encoder output and an MLP, a final LayerNorm, and logits from the
token embedding matrix (tied). Attention keys carry no bias; queries, values and outputs do.

The decoder is exposed to every decoding strategy through the same boundary as the language
models (`WhisperDecoder`, see `models.lm.TransformerLM`): `params` is the decoder's weights
bound to encoded audio (`AudioContext`: the cross-attention keys and values of each audio,
computed once per utterance), and the cache (`WhisperCache`) records, per row, which audio
the row listens to, so beams and samples that copy or reorder rows keep their audio.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models.kv_cache import KVCache, write_rows
from models.transformer import ForwardOutput

Array = jax.Array
NEG_INF = -1e30  # finite: a fully masked row (an empty audio) stays NaN-free


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
  n_mels: int = 80
  d_model: int = 384
  encoder_heads: int = 6
  decoder_heads: int = 6
  encoder_layers: int = 4
  decoder_layers: int = 4
  vocab_size: int = 51864
  audio_positions: int = 1500  # encoder frames in a 30 s window
  text_positions: int = 448
  layer_norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.d_model // self.decoder_heads


def layer_norm(name: str, eps: float) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, name=name)


class Projections(nn.Module):
  """Query, key (no bias), value and output projections of one attention block."""
  d_model: int

  def setup(self):
    self.q_proj = nn.Dense(self.d_model)
    self.k_proj = nn.Dense(self.d_model, use_bias=False)
    self.v_proj = nn.Dense(self.d_model)
    self.out_proj = nn.Dense(self.d_model)


def split_heads(x: Array, heads: int) -> Array:
  """[B, S, D] -> [B, H, S, D / H]."""
  B, S, D = x.shape
  return x.reshape(B, S, heads, D // heads).transpose(0, 2, 1, 3)


def merge_heads(x: Array) -> Array:
  B, H, S, hd = x.shape
  return x.transpose(0, 2, 1, 3).reshape(B, S, H * hd)


def attend(q: Array, k: Array, v: Array, visible: Array) -> Array:
  """softmax(q k^T / sqrt(hd)) v over the visible keys. q [B, H, S, hd], k and v
  [B, H, T, hd], visible [B, 1 | H, S, T] bool -> [B, H, S, hd]."""
  scores = jnp.einsum("bhsd,bhtd->bhst", q, k) * q.shape[-1] ** -0.5
  probs = jax.nn.softmax(jnp.where(visible, scores, NEG_INF), axis=-1)
  return jnp.einsum("bhst,bhtd->bhsd", probs, v)


class MLP(nn.Module):
  d_model: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(4 * self.d_model, name="fc1")(x), approximate=False)
    return nn.Dense(self.d_model, name="fc2")(h)


class EncoderLayer(nn.Module):
  """One encoder layer. With a `cache` ((k, v), each [B, H, T, hd], the first `start` slots
  filled) the new frames attend to the cached ones and to each other (one block of a
  block-causal encoder, computed incrementally), and their keys and values are written at
  `start`; returns (x, new cache or None)."""
  config: WhisperConfig

  @nn.compact
  def __call__(self, x: Array, visible: Optional[Array], cache=None, start=None):
    cfg = self.config
    attn = Projections(cfg.d_model, name="self_attn")
    h = layer_norm("self_attn_layer_norm", cfg.layer_norm_eps)(x)
    heads = lambda y: split_heads(y, cfg.encoder_heads)
    q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
    if cache is None:
      out = attend(q, k, v, visible)
    else:
      k_cache, v_cache = cache
      B, _, n, _ = q.shape
      T = k_cache.shape[2]
      seen = jnp.broadcast_to((jnp.arange(T) < start)[None, None, None, :], (B, 1, n, T))
      out = attend(q, jnp.concatenate([k_cache, k], 2), jnp.concatenate([v_cache, v], 2),
                   jnp.concatenate([seen, jnp.ones((B, 1, n, n), bool)], -1))
      at = (0, 0, start, 0)
      cache = (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at),
               jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at))
    x = x + attn.out_proj(merge_heads(out))
    h = layer_norm("final_layer_norm", cfg.layer_norm_eps)(x)
    return x + MLP(cfg.d_model, name="mlp")(h), cache


class Encoder(nn.Module):
  """Log-mel frames [B, F, n_mels] -> encoder states [B, ceil(F / 2), D]."""
  config: WhisperConfig

  @nn.compact
  def __call__(self, mel: Array, mask: Optional[Array] = None) -> Array:
    # mask: optional [T, T] or [B, T, T] bool, which encoder frames each frame attends to
    cfg = self.config
    x = nn.gelu(nn.Conv(cfg.d_model, (3,), padding=((1, 1),), name="conv1")(mel),
                approximate=False)
    x = nn.gelu(nn.Conv(cfg.d_model, (3,), strides=(2,), padding=((1, 1),), name="conv2")(x),
                approximate=False)
    T = x.shape[1]
    if T > cfg.audio_positions:
      raise ValueError(f"{T} encoder frames exceed the model's {cfg.audio_positions} "
                       f"positions ({cfg.audio_positions * 0.02:.0f} s of audio)")
    pos = self.param("positions", nn.initializers.zeros, (cfg.audio_positions, cfg.d_model))
    x = x + pos[:T].astype(x.dtype)
    visible = (jnp.ones((1, 1, T, T), bool) if mask is None
               else jnp.asarray(mask, bool).reshape((-1, 1, T, T)))
    for i in range(cfg.encoder_layers):
      x, _ = EncoderLayer(cfg, name=f"layers_{i}")(x, visible)
    return layer_norm("layer_norm", cfg.layer_norm_eps)(x)


class EncoderBlock(nn.Module):
  """The encoder on one new block of frames with a cache of the earlier ones (streaming):
  x [B, n, D] (the stem's output for frames start .. start + n - 1) -> (states, new caches)."""
  config: WhisperConfig

  @nn.compact
  def __call__(self, x: Array, caches, start):
    cfg = self.config
    pos = self.param("positions", nn.initializers.zeros, (cfg.audio_positions, cfg.d_model))
    x = x + jax.lax.dynamic_slice_in_dim(pos, start, x.shape[1]).astype(x.dtype)
    new = []
    for i in range(cfg.encoder_layers):
      x, c = EncoderLayer(cfg, name=f"layers_{i}")(x, None, caches[i], start)
      new.append(c)
    return layer_norm("layer_norm", cfg.layer_norm_eps)(x), tuple(new)


def block_causal_mask(frames: int, chunk_frames: int, first_chunks: int = 2) -> Array:
  """[frames, frames] bool: encoder frame i sees frame j iff j's chunk is not after i's,
  where the first `first_chunks` chunks count as one block (CarelessWhisper waits for two
  chunks of audio before its first output, `extra_gran_blocks` = 1 in its code)."""
  chunk = np.arange(frames) // int(chunk_frames)
  block = np.maximum(chunk, int(first_chunks) - 1)
  return jnp.asarray(chunk[None, :] <= block[:, None])


def conv1d(x: Array, conv: dict, stride: int, pad: int) -> Array:
  """x [B, T, C] through a kernel-3 convolution with Flax's parameter layout
  (kernel [3, C, C']), zero-padded by `pad` frames on each side."""
  y = jax.lax.conv_general_dilated(x, conv["kernel"].astype(x.dtype), (stride,), [(pad, pad)],
                                   dimension_numbers=("NWC", "WIO", "NWC"))
  return y + conv["bias"].astype(x.dtype)


def stem_block(encoder_params: Any, mel: Array, first: bool) -> Array:
  """The convolution stem for a block of encoder frames, from the mel frames it reads.

  first: mel [B, 2n + 1, n_mels] holds frames 0 .. 2n (frame 2n is the one-frame lookahead of
  the last output); the zero padding at the start is the full stem's. Otherwise mel holds
  frames 2s - 2 .. 2(s + n) for output frames s .. s + n - 1, and both convolutions run
  without padding, so every output equals the full-audio stem's. -> [B, n, D]."""
  x = jnp.asarray(mel, jnp.float32)
  gelu = lambda y: nn.gelu(y, approximate=False)
  if first:
    n = (x.shape[1] - 1) // 2
    h = gelu(conv1d(x, encoder_params["conv1"], 1, 1))
    return gelu(conv1d(h, encoder_params["conv2"], 2, 1))[:, :n]
  h = gelu(conv1d(x, encoder_params["conv1"], 1, 0))
  return gelu(conv1d(h, encoder_params["conv2"], 2, 0))


def init_encoder_cache(config: WhisperConfig, batch_size: int, frames: int = 0) -> tuple:
  """Per encoder layer (k, v) [B, H, frames, hd] zeros (default: all audio positions)."""
  shape = (batch_size, config.encoder_heads, frames or config.audio_positions,
           config.d_model // config.encoder_heads)
  return tuple((jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
               for _ in range(config.encoder_layers))


def encode_block(params: Any, config: WhisperConfig, mel: Array, caches: tuple, start,
                 first: bool) -> tuple[Array, tuple]:
  """Streaming encoder step: the new encoder frames from `start` on, from their mel window
  (`stem_block`, mel [B, n_mels, M] in Whisper's layout), attending to the cached frames and
  to each other. Equal to the block-causal encoder on the whole audio for these frames.
  -> (states [B, n, D], caches)."""
  x = stem_block(params["encoder"], jnp.swapaxes(jnp.asarray(mel, jnp.float32), 1, 2), first)
  return EncoderBlock(config).apply({"params": params["encoder"]}, x, caches, start)


def empty_audio(params: Any, config: WhisperConfig, batch_size: int, frames: int = 0
                ) -> "AudioContext":
  """An `AudioContext` with room for `frames` encoder frames (default: all) and none filled:
  the start of a stream, extended by `extend_audio` as blocks are encoded."""
  F = frames or config.audio_positions
  shape = (batch_size, config.decoder_heads, F, config.head_dim)
  z = tuple(jnp.zeros(shape, jnp.float32) for _ in range(config.decoder_layers))
  return AudioContext(decoder=params["decoder"], cross_k=z, cross_v=z,
                      frames=jnp.zeros((batch_size,), jnp.int32))


def extend_audio(params: Any, config: WhisperConfig, context: "AudioContext", states: Array,
                 start) -> "AudioContext":
  """`context` with the cross-attention keys and values of new encoder frames [B, n, D]
  written from frame `start` on, and every row's valid frames set to start + n."""
  k, v = cross_kv(params, config, states)
  put = lambda old, new: jax.lax.dynamic_update_slice(old, new, (0, 0, start, 0))
  return context.replace(cross_k=tuple(put(o, n) for o, n in zip(context.cross_k, k)),
                         cross_v=tuple(put(o, n) for o, n in zip(context.cross_v, v)),
                         frames=jnp.full_like(context.frames, start + states.shape[1]))


@flax.struct.dataclass
class WhisperCache(KVCache):
  """The decoder's self-attention cache ([B, H, T, hd] per layer, see `KVCache`) plus the
  audio each row attends to (`audio_row`, an index into the `AudioContext` it runs with)."""
  audio_row: Array = None  # [B] int32

  def take_rows(self, rows: Array) -> "WhisperCache":
    rows = jnp.asarray(rows, jnp.int32)
    return super().take_rows(rows).replace(audio_row=self.audio_row[rows])


@flax.struct.dataclass
class AudioContext:
  """The decoder's parameters bound to A encoded audios: what a strategy passes as `params`."""
  decoder: Any  # the "decoder" subtree of the Whisper parameters
  cross_k: tuple  # per decoder layer [A, H, F, hd]
  cross_v: tuple
  frames: Array  # [A] int32: valid encoder frames of each audio (the rest is padding)


class DecoderLayer(nn.Module):
  config: WhisperConfig

  @nn.compact
  def __call__(self, x, k_cache, v_cache, lengths, new_mask, cross_k, cross_v, cross_visible):
    cfg = self.config
    H = cfg.decoder_heads
    attn = Projections(cfg.d_model, name="self_attn")
    h = layer_norm("self_attn_layer_norm", cfg.layer_norm_eps)(x)
    q, k, v = (split_heads(p(h), H) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if k_cache is None:  # a full-sequence (training) pass
      out = attend(q, k, v, new_mask[:, None])
    else:  # the cache as it was before this call, then the new tokens; written after
      T = k_cache.shape[2]
      old = (jnp.arange(T)[None] < lengths[:, None])[:, None, None, :]
      S = x.shape[1]
      visible = jnp.concatenate([jnp.broadcast_to(old, (x.shape[0], 1, S, T)),
                                 new_mask[:, None]], axis=-1)
      out = attend(q, jnp.concatenate([k_cache, k], 2), jnp.concatenate([v_cache, v], 2),
                   visible)
      k_cache, v_cache = write_rows(k_cache, k, lengths), write_rows(v_cache, v, lengths)
    x = x + attn.out_proj(merge_heads(out))
    cross = Projections(cfg.d_model, name="cross_attn")
    h = layer_norm("cross_attn_layer_norm", cfg.layer_norm_eps)(x)
    out = attend(split_heads(cross.q_proj(h), H), cross_k, cross_v, cross_visible)
    x = x + cross.out_proj(merge_heads(out))
    h = layer_norm("final_layer_norm", cfg.layer_norm_eps)(x)
    return x + MLP(cfg.d_model, name="mlp")(h), k_cache, v_cache


class Decoder(nn.Module):
  config: WhisperConfig

  @nn.compact
  def __call__(self, tokens, positions, caches, lengths, new_mask, cross_k, cross_v,
               cross_visible, logits_at=None):
    cfg = self.config
    embed = self.param("embed_tokens", nn.initializers.normal(0.02),
                       (cfg.vocab_size, cfg.d_model))
    pos = self.param("embed_positions", nn.initializers.zeros,
                     (cfg.text_positions, cfg.d_model))
    x = jnp.take(embed, tokens, axis=0) + jnp.take(pos, positions, axis=0)
    new_caches, penultimate = [], x
    for i in range(cfg.decoder_layers):
      penultimate = x
      kc, vc = (None, None) if caches is None else caches[i]
      x, kc, vc = DecoderLayer(cfg, name=f"layers_{i}")(x, kc, vc, lengths, new_mask,
                                                        cross_k[i], cross_v[i], cross_visible)
      new_caches.append((kc, vc))
    x = layer_norm("layer_norm", cfg.layer_norm_eps)(x)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    logits = jnp.einsum("bsd,vd->bsv", x, embed.astype(x.dtype)).astype(jnp.float32)
    return logits, x, penultimate, new_caches


class CrossKV(nn.Module):
  """Each decoder layer's cross-attention keys and values of the encoder states."""
  config: WhisperConfig

  @nn.compact
  def __call__(self, states: Array):
    cfg = self.config
    ks, vs = [], []
    for i in range(cfg.decoder_layers):
      # the same parameters as the decoder layer's `cross_attn` (bound by name below)
      k = nn.Dense(cfg.d_model, use_bias=False, name=f"layers_{i}_k")(states)
      v = nn.Dense(cfg.d_model, name=f"layers_{i}_v")(states)
      ks.append(split_heads(k, cfg.decoder_heads))
      vs.append(split_heads(v, cfg.decoder_heads))
    return tuple(ks), tuple(vs)


def encode(params: Any, config: WhisperConfig, mel: Array, mask: Optional[Array] = None
           ) -> Array:
  """mel [B, n_mels, F] (Whisper's layout) -> encoder states [B, ceil(F / 2), D]."""
  return Encoder(config).apply({"params": params["encoder"]},
                               jnp.swapaxes(jnp.asarray(mel, jnp.float32), 1, 2), mask)


def cross_kv(params: Any, config: WhisperConfig, states: Array) -> tuple[tuple, tuple]:
  """Per decoder layer, the cross-attention keys and values [A, H, F, hd] of the encoder
  states [A, F, D] (computed once per utterance, read at every decoding step)."""
  dec = params["decoder"]
  sub = {}
  for i in range(config.decoder_layers):
    cross = dec[f"layers_{i}"]["cross_attn"]
    sub[f"layers_{i}_k"], sub[f"layers_{i}_v"] = cross["k_proj"], cross["v_proj"]
  return CrossKV(config).apply({"params": sub}, states)


def bind_audio(params: Any, config: WhisperConfig, states: Array,
               frames: Optional[Array] = None) -> AudioContext:
  """The decoder parameters bound to encoder states [A, F, D], of which the first
  `frames[a]` are real ([A] int32; all by default)."""
  k, v = cross_kv(params, config, states)
  A, F = states.shape[:2]
  frames = jnp.full((A,), F, jnp.int32) if frames is None else jnp.asarray(frames, jnp.int32)
  return AudioContext(decoder=params["decoder"], cross_k=k, cross_v=v, frames=frames)


@dataclasses.dataclass(frozen=True)
class WhisperDecoder:
  """The Whisper decoder behind the language-model boundary of `models.lm.TransformerLM`:
  `dec(context, tokens, positions, cache, attn_mask, embeds, logits_at, cache_mask)` with
  `context` an `AudioContext`. Hashable (a static argument of the jitted loops).

  suppress: token ids whose logits are set to -inf at every step; suppress_at_start: ids
  banned only for the first token after the `prompt_len`-token start sequence (Whisper's
  decoding rules: no blank or end of text as the first token, no special tokens).
  """
  config: WhisperConfig
  suppress: tuple[int, ...] = ()
  suppress_at_start: tuple[int, ...] = ()
  prompt_len: int = 0

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_positions(self) -> int:
    return self.config.text_positions

  def init_cache(self, batch_size: int, max_len: int) -> WhisperCache:
    if max_len > self.config.text_positions:
      raise ValueError(f"a decoder cache of {max_len} slots exceeds Whisper's "
                       f"{self.config.text_positions} text positions")
    cfg = self.config
    shape = (batch_size, cfg.decoder_heads, max_len, cfg.head_dim)
    z = lambda: tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.decoder_layers))
    return WhisperCache(k=z(), v=z(), lengths=jnp.zeros((batch_size,), jnp.int32),
                        audio_row=jnp.arange(batch_size, dtype=jnp.int32))

  def embed(self, context: AudioContext, tokens: Array) -> Array:
    return jnp.take(context.decoder["embed_tokens"], tokens, axis=0)

  def __call__(self, context: AudioContext, tokens: Optional[Array], positions: Array,
               cache: Optional[WhisperCache], attn_mask: Optional[Array] = None,
               embeds: Optional[Array] = None, logits_at: Optional[Array] = None,
               cache_mask: Optional[Array] = None) -> ForwardOutput:
    if embeds is not None or cache_mask is not None:
      raise ValueError("the Whisper decoder takes tokens and a plain cache (no embedding "
                       "inputs or token trees)")
    return _decode(context, self.config, self.suppress, self.suppress_at_start,
                   self.prompt_len, tokens, positions, cache, attn_mask, logits_at)


def _decode(context, config, suppress, suppress_at_start, prompt_len, tokens, positions,
            cache, attn_mask, logits_at):
  B, S = tokens.shape
  rows = cache.audio_row if cache is not None else jnp.arange(B)
  cross_k = tuple(jnp.take(k, rows, axis=0) for k in context.cross_k)
  cross_v = tuple(jnp.take(v, rows, axis=0) for v in context.cross_v)
  F = cross_k[0].shape[2]
  cross_visible = (jnp.arange(F)[None] < context.frames[rows][:, None])[:, None, None, :]
  causal = jnp.tril(jnp.ones((S, S), bool))[None]
  new_mask = causal if attn_mask is None else causal & jnp.asarray(attn_mask, bool)
  new_mask = jnp.broadcast_to(new_mask, (B, S, S))
  caches = None if cache is None else list(zip(cache.k, cache.v))
  lengths = None if cache is None else cache.lengths
  logits, hidden, penultimate, new = Decoder(config).apply(
      {"params": context.decoder}, tokens, positions, caches, lengths, new_mask, cross_k,
      cross_v, cross_visible, logits_at)
  if suppress or suppress_at_start:
    at = positions if logits_at is None else jnp.take_along_axis(positions, logits_at, 1)
    ids = jnp.arange(config.vocab_size)
    ban = jnp.isin(ids, jnp.asarray(suppress or (-1,)))[None, None]
    first = (at == prompt_len - 1)[..., None] & jnp.isin(
        ids, jnp.asarray(suppress_at_start or (-1,)))[None, None]
    logits = jnp.where(ban | first, -jnp.inf, logits)
  if cache is not None:
    cache = cache.replace(k=tuple(k for k, _ in new), v=tuple(v for _, v in new),
                          lengths=cache.lengths + S)
  return ForwardOutput(logits=logits, hidden=hidden, penultimate=penultimate, cache=cache)


def full_params(config: WhisperConfig, key: Array) -> Any:
  """Randomly initialised parameters (tests with tiny configurations)."""
  ke, kd, kx = jax.random.split(key, 3)
  enc = Encoder(config).init(ke, jnp.zeros((1, 8, config.n_mels), jnp.float32))["params"]
  F, H, hd = 4, config.decoder_heads, config.head_dim
  kv = tuple(jnp.zeros((1, H, F, hd)) for _ in range(config.decoder_layers))
  toks = jnp.zeros((1, 1), jnp.int32)
  dec = Decoder(config).init(kd, toks, toks, None, None, jnp.ones((1, 1, 1), bool), kv, kv,
                             jnp.ones((1, 1, 1, F), bool))["params"]
  dec = jax.tree.map(lambda x: x, dec)  # a mutable copy
  # the cross-attention keys and values are computed outside the decoder (`cross_kv`), so
  # the decoder's init does not create them
  x = jnp.zeros((1, 1, config.d_model))
  for i, k in enumerate(jax.random.split(kx, config.decoder_layers)):
    k1, k2 = jax.random.split(k)
    cross = dict(dec[f"layers_{i}"]["cross_attn"])
    cross["k_proj"] = nn.Dense(config.d_model, use_bias=False).init(k1, x)["params"]
    cross["v_proj"] = nn.Dense(config.d_model).init(k2, x)["params"]
    dec[f"layers_{i}"] = {**dec[f"layers_{i}"], "cross_attn": cross}
  return {"encoder": enc, "decoder": dec}

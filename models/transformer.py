"""One Flax decoder for the Llama family: Llama, SmolLM2 and Qwen2.

Grouped-query attention, rotary position embeddings (rotate-half layout, as in
Hugging Face checkpoints), RMSNorm, SwiGLU MLP, tied or separate output head and
optional q/k/v biases (Qwen2).

Two layer layouts, chosen by `ModelConfig.scan_layers`:
* `True`: weights stacked on a leading layer axis and run under `nn.scan`; compile time
  does not grow with depth. On XLA:CPU each step then copies every layer's weight
  slice out of the stack (the dynamic slice is not fused into the dot), which costs
  about 2x the weight traffic.
* `False`: one parameter subtree per layer (`layers_0`, `layers_1`, ...) and a Python
  loop at trace time: the fastest decode step on CPU; compile time grows linearly
  with depth (about 5 s for SmolLM2's 30 layers).
`stack_layers` / `unstack_layers` convert parameters between the two.

Under `ModelConfig.matmul_kernel="packed"` every weight matrix whose output width is a multiple
of 16 (and the embedding table) is stored in column panels and multiplied by the CPU kernel of
`models.packed_matmul`; `pack_params` / `unpack_params` convert parameters.

The forward pass is a single function used for prefill, one-token steps and
multi-token verification: new tokens (or input embeddings) are written into the
preallocated `KVCache` at each row's current length and attend to everything
before them, plus, among themselves, to what `attn_mask` allows (causal by
default; token trees pass their own mask).
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from models import batch_invariant, moe
from models import packed_matmul as packing
from models.config import ModelConfig
from models.kv_cache import KVCache, write_rows

Array = jax.Array


@flax.struct.dataclass
class ForwardOutput:
  logits: Array  # [B, S, V] float32 ([B, K, V] when `logits_at` is given)
  hidden: Array  # [B, S, D] final hidden state (after the final norm, input of the LM head)
  penultimate: Array  # [B, S, D] input of the last decoder layer (HF `hidden_states[-2]`)
  cache: Optional[KVCache]  # None when called without a cache


def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(dtype) * y.astype(dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """(cos, sin) [B, S, 1, hd] of the rotary angles at `positions` ([B, S]), computed once per
  forward pass and shared by every layer (rotate-half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, hd/2]
  ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: Array, rotary: tuple[Array, Array]) -> Array:
  """Rotary embedding of x [B, S, H, hd] with the tables of `rope_tables`."""
  cos, sin = rotary
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)



def matmul(x: Array, w: Array, cfg: ModelConfig) -> Array:
  """x @ w in the compute dtype, w upcast just in time (LayerCast).

  With `cfg.split_k = c > 1`, the contraction is cut into c blocks whose partial
  products are summed afterwards. This is a two-level (blocked) summation: XLA:CPU's
  single-pass fp32 dot accumulates sequentially and loses about 2-4x more precision
  than the blocked sums of BLAS libraries on activations as large as SmolLM2's
  (hundreds in some channels). Same FLOPs and weight traffic.
  """
  x = x.astype(cfg.dtype)
  w = w.astype(cfg.dtype)
  if cfg.batch_invariant:
    return batch_invariant.chunked_matmul(x, w, cfg.precision)
  k = w.shape[0]
  c = cfg.split_k
  if c <= 1 or k % c:
    return jnp.dot(x, w, precision=cfg.precision)
  lead = x.shape[:-1]
  xb = x.reshape(-1, c, k // c).transpose(1, 0, 2)  # [c, M, K/c]: blocks lead, weight untouched
  wb = w.reshape(c, k // c, w.shape[1])
  partial = jnp.einsum("cmk,ckn->cmn", xb, wb, precision=cfg.precision)
  return partial.sum(axis=0).reshape(*lead, w.shape[1])


def packed(cfg: ModelConfig, features: int) -> bool:
  """Whether a weight with `features` output columns is stored packed (`models.packed_matmul`)."""
  return cfg.matmul_kernel == "packed" and packing.packable((1, features))


class Dense(nn.Module):
  """y = x @ W (+ b); W stored in `projection_dtype` (`param_dtype` for the LM head,
  `projection=False`), upcast to `dtype` just in time.

  W is [K, N], or [N/16, K, 16] column panels under `matmul_kernel="packed"`."""
  features: int
  config: ModelConfig
  use_bias: bool = False
  projection: bool = True  # an attention / MLP projection (LayerCast stores these in bf16)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    store = cfg.projection_dtype if self.projection else cfg.param_dtype
    if packed(cfg, self.features):
      init = lambda key, shape, dtype: packing.pack(
          nn.initializers.normal(0.02)(key, (x.shape[-1], self.features), dtype))
      kernel = self.param("kernel", init, (self.features // packing.PANEL, x.shape[-1],
                                           packing.PANEL), store)
      y = packing.packed_matmul(x, kernel, cfg.batch_invariant).astype(cfg.dtype)
    else:
      kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                          store)
      y = matmul(x, kernel, cfg)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), store)
      y = y + bias.astype(cfg.dtype)
    return y


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.config.param_dtype)
    norm = batch_invariant.rms_norm if self.config.batch_invariant else rms_norm
    return norm(x, scale, self.config.rms_norm_eps, self.config.dtype)


def new_token_mask(batch: int, num_new: int, new_mask: Optional[Array]) -> Array:
  """[B, S, S] visibility among the new tokens: causal by default, else the caller's (trees)."""
  if new_mask is None:
    return jnp.broadcast_to(jnp.tril(jnp.ones((num_new, num_new), bool)), (batch, num_new, num_new))
  return jnp.broadcast_to(new_mask.astype(bool), (batch, num_new, num_new))


class Attention(nn.Module):
  """Grouped-query attention over the cached context plus the new block.

  Scores are computed against the cache as it was *before* this call (slots
  `< lengths[b]` are visible) and, separately, among the new tokens under `new_mask`;
  one softmax covers both. The new keys/values are written into the cache only after
  it has been read. Reading first and writing last lets XLA update the cache in place
  (no copy of the whole cache per layer per step), and rows never see stale slots.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, rotary, k_cache, v_cache, lengths, new_mask, cache_mask=None):
    # x: [B, S, D]; rotary: (cos, sin) of the new tokens' positions (`rope_tables`); k_cache, v_cache: [B, Hkv, T, hd] or None (training: no cache);
    # new_mask: [B, S, S] bool; cache_mask: optional [B, S, T] bool, ANDed with the
    # length mask (a draft tree's nodes in the cache see only their ancestors).
    cfg = self.config
    B, S, _ = x.shape
    H, Hkv, hd, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_groups
    if cfg.fused_projections:
      qkv = Dense((H + 2 * Hkv) * hd, cfg, cfg.qkv_bias, name="qkv_proj")(x)
      q, k, v = jnp.split(qkv, [H * hd, (H + Hkv) * hd], axis=-1)
    else:
      q = Dense(H * hd, cfg, cfg.qkv_bias, name="q_proj")(x)
      k = Dense(Hkv * hd, cfg, cfg.qkv_bias, name="k_proj")(x)
      v = Dense(Hkv * hd, cfg, cfg.qkv_bias, name="v_proj")(x)
    q = apply_rope(q.reshape(B, S, H, hd), rotary)
    k = apply_rope(k.reshape(B, S, Hkv, hd), rotary)
    v = v.reshape(B, S, Hkv, hd)
    q = q.reshape(B, S, Hkv, G, hd).transpose(0, 2, 3, 1, 4).astype(jnp.float32)  # [B,Hkv,G,S,hd]
    k_new = k.transpose(0, 2, 1, 3)  # [B, Hkv, S, hd]
    v_new = v.transpose(0, 2, 1, 3)
    scale = hd ** -0.5
    if cfg.batch_invariant:
      if k_cache is None:
        raise ValueError("the batch-invariant mode runs through models.transformer.forward, "
                         "which gives a cache-free pass a scratch cache")
      # one token per call (`forward` loops over the new tokens); `cache_mask` [B, 1, T] is
      # the token's whole visibility, itself included: written first, then read in slot order
      k_cache = write_rows(k_cache, k_new, lengths)
      v_cache = write_rows(v_cache, v_new, lengths)
      visible = (cache_mask[:, 0] if cache_mask is not None  # (a direct one-token call)
                 else jnp.arange(k_cache.shape[2])[None] <= lengths[:, None])
      out = batch_invariant.attend_one_token(q[:, :, :, 0] * scale, k_cache, v_cache, visible,
                                             cfg.dtype)
      out = out.reshape(B, 1, H * hd)
      return Dense(cfg.hidden_size, cfg, False, name="o_proj")(out), k_cache, v_cache
    s_new = jnp.einsum("bkgsd,bkud->bkgsu", q, k_new.astype(jnp.float32),
                       precision=cfg.precision) * scale
    s_new = jnp.where(new_mask[:, None, None, :, :], s_new, -jnp.inf)
    if k_cache is None:  # full-sequence (training) pass: attention among the new tokens only
      probs = jax.nn.softmax(s_new, axis=-1).astype(cfg.dtype)
      out = jnp.einsum("bkgsu,bkud->bkgsd", probs, v_new.astype(cfg.dtype),
                       precision=cfg.precision)
      out = out.transpose(0, 3, 1, 2, 4).reshape(B, S, H * hd)
      return Dense(cfg.hidden_size, cfg, False, name="o_proj")(out), None, None
    T = k_cache.shape[2]
    s_old = jnp.einsum("bkgsd,bktd->bkgst", q, k_cache.astype(jnp.float32),
                       precision=cfg.precision) * scale
    old_ok = (jnp.arange(T)[None, :] < lengths[:, None])[:, None, None, None, :]
    if cache_mask is not None:
      old_ok = old_ok & cache_mask.astype(bool)[:, None, None, :, :]
    s_old = jnp.where(old_ok, s_old, -jnp.inf)
    probs = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1).astype(cfg.dtype)
    out = (jnp.einsum("bkgst,bktd->bkgsd", probs[..., :T], v_cache.astype(cfg.dtype),
                      precision=cfg.precision)
           + jnp.einsum("bkgsu,bkud->bkgsd", probs[..., T:], v_new.astype(cfg.dtype),
                        precision=cfg.precision))
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, S, H * hd)
    k_cache = write_rows(k_cache, k_new, lengths)
    v_cache = write_rows(v_cache, v_new, lengths)
    return Dense(cfg.hidden_size, cfg, False, name="o_proj")(out), k_cache, v_cache


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    if cfg.fused_projections:
      gate, up = jnp.split(Dense(2 * cfg.intermediate_size, cfg, name="gate_up_proj")(x), 2, -1)
    else:
      gate = Dense(cfg.intermediate_size, cfg, name="gate_proj")(x)
      up = Dense(cfg.intermediate_size, cfg, name="up_proj")(x)
    return Dense(cfg.hidden_size, cfg, name="down_proj")(jax.nn.silu(gate) * up)


class Embedder(nn.Module):
  """Token embedding table stored as [D, V] (the LM-head layout).

  The tied output projection is then a plain `hidden @ table` matmul. On XLA:CPU a
  matmul whose right operand is transposed runs a less accurate kernel (about 2x the
  fp32 error of the plain one on SmolLM2's head), so we store the table the way the
  head reads it and gather columns for the (cheap) input lookup.
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    D, V = cfg.hidden_size, cfg.vocab_size
    if packed(cfg, V):  # [V/16, D, 16] panels (`models.packed_matmul`)
      init = lambda key, shape, dtype: packing.pack(nn.initializers.normal(0.02)(key, (D, V), dtype))
      self.table = self.param("table", init, (V // packing.PANEL, D, packing.PANEL), cfg.param_dtype)
    else:
      self.table = self.param("table", nn.initializers.normal(0.02), (D, V), cfg.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    return lookup(self.table, tokens).astype(self.config.dtype)

  def attend(self, hidden: Array) -> Array:
    if self.table.ndim == 3:
      return packing.packed_matmul(hidden, self.table,
                                   self.config.batch_invariant).astype(self.config.dtype)
    return matmul(hidden, self.table, self.config)


def lookup(table: Array, tokens: Array) -> Array:
  """Embedding rows of `tokens` ([...] -> [..., D]) from a [D, V] table or its packed panels."""
  if table.ndim == 3:  # [V/16, D, 16]: token t is column t % 16 of panel t // 16
    return table[tokens // packing.PANEL, :, tokens % packing.PANEL]
  return jnp.moveaxis(jnp.take(table, tokens, axis=1), 0, -1)


def head_matrix(params: Any) -> Array:
  """The [D, V] output projection (the tied table or `lm_head`), unpacked if stored packed:
  for drafters and heads that reuse the target's LM head outside its forward pass."""
  w = params["lm_head"]["kernel"] if "lm_head" in params else params["embed"]["table"]
  return packing.unpack(w) if w.ndim == 3 else w


class DecoderLayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, carry, layer_cache, rotary, lengths, mask, cache_mask=None):
    x, _ = carry  # (hidden, input of the previous layer)
    k_cache, v_cache = layer_cache
    h, k_cache, v_cache = Attention(self.config, name="attn")(
        RMSNorm(self.config, name="attn_norm")(x), rotary, k_cache, v_cache, lengths, mask,
        cache_mask)
    y = x + h
    mlp = moe.MoEMLP if self.config.moe_experts else MLP
    y = y + mlp(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(y))
    return (y, x), (k_cache, v_cache)


class Transformer(nn.Module):
  """Llama-family decoder. Call with token ids or input embeddings, never both."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = Embedder(cfg)
    layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
    if cfg.scan_layers:
      self.layers = nn.scan(
          layer_cls, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
      )(cfg)
    else:
      self.blocks = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense(cfg.vocab_size, cfg, projection=False)

  def embed_tokens(self, tokens: Array) -> Array:
    return self.embed(tokens)

  def __call__(self, tokens: Optional[Array], positions: Array, cache: Optional[KVCache],
               attn_mask: Optional[Array] = None, embeds: Optional[Array] = None,
               logits_at: Optional[Array] = None,
               cache_mask: Optional[Array] = None) -> ForwardOutput:
    hidden, penultimate, new_cache = self.features(tokens, positions, cache, attn_mask, embeds,
                                                   cache_mask)
    head_in = hidden
    if logits_at is not None:  # only the positions whose logits are needed (e.g. prefill)
      head_in = jnp.take_along_axis(hidden, logits_at[:, :, None], axis=1)
    return ForwardOutput(logits=self.head(head_in), hidden=hidden, penultimate=penultimate,
                         cache=new_cache)

  def head(self, hidden: Array) -> Array:
    """Output logits [..., V] float32 of final hidden states [..., D]."""
    if self.config.tie_word_embeddings:
      return self.embed.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def features(self, tokens: Optional[Array], positions: Array, cache: Optional[KVCache],
               attn_mask: Optional[Array] = None, embeds: Optional[Array] = None,
               cache_mask: Optional[Array] = None):
    """(final hidden [B, S, D], penultimate [B, S, D], new cache) of the forward pass."""
    cfg = self.config
    if (tokens is None) == (embeds is None):
      raise ValueError("pass exactly one of tokens or embeds")
    x = self.embed_tokens(tokens) if tokens is not None else embeds.astype(cfg.dtype)
    B, S, _ = x.shape
    mask = new_token_mask(B, S, attn_mask)
    rotary = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    if cache is None:  # full-sequence pass without a cache (training, scoring)
      lengths = jnp.zeros((B,), jnp.int32)
      layer_caches = ((None, None) if cfg.scan_layers
                      else [(None, None)] * cfg.num_layers)
    else:
      lengths = cache.lengths
      layer_caches = ((cache.k, cache.v) if cfg.scan_layers
                      else list(zip(cache.k, cache.v)))
    if cfg.scan_layers:
      (x, penultimate), (k, v) = self.layers((x, x), layer_caches, rotary, lengths, mask,
                                             cache_mask)
    else:
      carry, ks, vs = (x, x), [], []
      for block, (kl, vl) in zip(self.blocks, layer_caches):
        carry, (kl, vl) = block(carry, (kl, vl), rotary, lengths, mask, cache_mask)
        ks.append(kl)
        vs.append(vl)
      (x, penultimate), k, v = carry, tuple(ks), tuple(vs)
    new_cache = None if cache is None else KVCache(k=k, v=v, lengths=cache.lengths + S)
    return self.final_norm(x), penultimate, new_cache


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, key: Array) -> Any:
  """Random parameters (for tests and draft models)."""
  model = Transformer(config)
  cache = KVCache.init(config, 1, 4)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return model.init(key, tokens, jnp.zeros((1, 1), jnp.int32), cache)["params"]


@functools.partial(jax.jit, static_argnums=1)
def forward(params: Any, config: ModelConfig, tokens: Optional[Array], positions: Array,
            cache: KVCache, attn_mask: Optional[Array] = None, embeds: Optional[Array] = None,
            logits_at: Optional[Array] = None, cache_mask: Optional[Array] = None) -> ForwardOutput:
  """The model boundary: (tokens | embeds, positions, cache, mask) -> logits, hidden, cache.

  tokens: [B, S] int32 or None; embeds: [B, S, D] or None (exactly one of them).
  positions: [B, S] RoPE positions. cache: the KV cache; the new entries go to slots
  `cache.lengths[b] + i` and the returned cache has lengths increased by S. `cache=None`
  runs a cache-free full-sequence pass (training, scoring) and returns `cache=None`.
  attn_mask: optional [B, S, S] (or broadcastable) bool mask among the new tokens.
  logits_at: optional [B, K] indices into S; then logits are [B, K, V].
  cache_mask: optional [B, S, T] bool: which cache slots each new token may see, on top of
  `slot < cache.lengths[b]` (token trees grown inside the cache).
  Jitted (a no-op inside an outer jit), so eager calls do not re-trace the layer scan.
  Under `config.batch_invariant` the new tokens go through the model one at a time
  (`_forward_token_by_token`).
  """
  if config.batch_invariant:
    return _forward_token_by_token(params, config, tokens, positions, cache, attn_mask, embeds,
                                   logits_at, cache_mask)
  return Transformer(config).apply({"params": params}, tokens, positions, cache, attn_mask,
                                   embeds, logits_at, cache_mask)


def _forward_token_by_token(params, config: ModelConfig, tokens, positions, cache, attn_mask,
                            embeds, logits_at, cache_mask) -> ForwardOutput:
  """The batch-invariant forward pass (`models.batch_invariant`): a scan over the S new
  tokens, each run alone through the layers with its visibility spelled out slot by slot
  (the cache as it was, where `cache_mask` allows, and the new tokens `attn_mask` lets it
  see, itself included), then the LM head on the positions asked for. Same outputs and cache
  as the one-call pass up to rounding, with no dependence on the batch, the padding or the
  cache length. Without a cache (scoring) a scratch cache holds the sequence."""
  model = Transformer(config)
  x = tokens if tokens is not None else embeds
  B, S = x.shape[:2]
  scratch = cache is None
  if scratch:
    cache = KVCache.init(config, B, 1 << max(0, (S - 1).bit_length()))
  T = cache.max_len
  start = cache.lengths  # [B]
  new_mask = new_token_mask(B, S, attn_mask)  # [B, S, S]
  slot = jnp.arange(T)[None, :]  # [1, T]
  rel = slot - start[:, None]  # [B, T]: index among the new tokens of slot t

  def step(c, j):
    old = slot < start[:, None]
    if cache_mask is not None:
      old = old & cache_mask[:, j].astype(bool)
    mine = jax.lax.dynamic_index_in_dim(new_mask, j, axis=1, keepdims=False)  # [B, S]
    new = (rel >= 0) & (rel <= j) & jnp.take_along_axis(mine, jnp.clip(rel, 0, S - 1), axis=1)
    col = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, j, 1, axis=1)
    hidden, penultimate, c = model.apply(
        {"params": params}, col(tokens), col(positions), c, None, col(embeds),
        (old | new)[:, None, :], method=Transformer.features)
    return c, (hidden[:, 0], penultimate[:, 0])

  cache, (hidden, penultimate) = jax.lax.scan(step, cache, jnp.arange(S))
  hidden, penultimate = jnp.swapaxes(hidden, 0, 1), jnp.swapaxes(penultimate, 0, 1)
  head_in = hidden if logits_at is None else jnp.take_along_axis(
      hidden, logits_at[:, :, None], axis=1)
  logits = model.apply({"params": params}, head_in, method=Transformer.head)
  return ForwardOutput(logits=logits, hidden=hidden, penultimate=penultimate,
                       cache=None if scratch else cache)


def embed(params: Any, config: ModelConfig, tokens: Array) -> Array:
  """Input embeddings of token ids ([B, S] -> [B, S, D]) in the compute dtype."""
  return Transformer(config).apply({"params": params}, tokens, method=Transformer.embed_tokens)


def embed_mixture(params: Any, config: ModelConfig, weights: Array) -> Array:
  """Expected input embedding under token weights ([B, S, V] -> [B, S, D]), for soft tokens."""
  table = params["embed"]["table"]
  table = (packing.unpack(table) if table.ndim == 3 else table).astype(config.dtype)
  return jnp.einsum("bsv,dv->bsd", weights.astype(config.dtype), table, precision=config.precision)


FUSED = {"attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def _layer_trees(params: Any) -> list[str]:
  return [name for name in params if name == "layers" or name.startswith("layers_")]


def fuse_projections(params: Any) -> Any:
  """q/k/v kernels (and biases) -> one `qkv_proj`, gate/up -> one `gate_up_proj`, concatenated
  on the output axis (either layer layout): the parameters of a `fused_projections` config.
  Each output column is the same dot product as before; the matmuls are fewer and wider."""
  params = dict(params)
  for layer in _layer_trees(params):
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in params[layer].items()}
    for block, (fused, parts) in FUSED.items():
      pieces = [tree[block].pop(p) for p in parts]
      tree[block][fused] = {kind: jnp.concatenate([p[kind] for p in pieces], axis=-1)
                            for kind in pieces[0]}
    params[layer] = tree
  return params


def unfuse_projections(params: Any, config: ModelConfig) -> Any:
  """Inverse of `fuse_projections` (for saving, training or LoRA on a fused model)."""
  H, Hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
  inter = config.expert_intermediate_size if config.moe_experts else config.intermediate_size
  sizes = {"attn": (H * hd, Hkv * hd, Hkv * hd), "mlp": (inter, inter)}
  params = dict(params)
  for layer in _layer_trees(params):
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in params[layer].items()}
    for block, (fused, parts) in FUSED.items():
      joined = tree[block].pop(fused)
      cuts = list(itertools.accumulate(sizes[block]))[:-1]
      split = {kind: jnp.split(w, cuts, axis=-1) for kind, w in joined.items()}
      for i, p in enumerate(parts):
        tree[block][p] = {kind: split[kind][i] for kind in split}
    params[layer] = tree
  return params


def _is_weight(path: tuple, leaf: Array) -> bool:
  names = [getattr(k, "key", None) for k in path]
  return names[-1:] == ["kernel"] or names[-2:] == ["embed", "table"]


def pack_params(params: Any) -> Any:
  """Every dense kernel and the embedding table whose output width is a multiple of 16, packed
  into column panels (`models.packed_matmul.pack`): the parameters of a
  `matmul_kernel="packed"` config (either layer layout, fused or not)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: packing.pack(x) if _is_weight(path, x) and packing.packable(x.shape) else x,
      params)


def unpack_params(params: Any, config: ModelConfig) -> Any:
  """Inverse of `pack_params` (for saving, training or reuse of the weights as matrices)."""
  stacked = 1 if config.scan_layers else 0
  def undo(path, x):
    names = [getattr(k, "key", None) for k in path]
    in_stack = "layers" in names
    if _is_weight(path, x) and x.ndim == 3 + (stacked if in_stack else 0):
      return packing.unpack(x)
    return x
  return jax.tree_util.tree_map_with_path(undo, params)


def unstack_layers(params: Any, num_layers: int) -> Any:
  """Stacked `layers` subtree ([L, ...] leaves) -> `layers_0` ... `layers_{L-1}` subtrees."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  return params


def stack_layers(params: Any, num_layers: int) -> Any:
  """Inverse of `unstack_layers`."""
  params = dict(params)
  per = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per)
  return params

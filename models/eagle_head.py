"""EAGLE-style feature draft head for speculative decoding, with FSPAD's two options.

The head ("EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", Li, Wei,
Zhang, Zhang; ICML 2024, whose decoding EAGLE-2 extends with dynamic draft trees) predicts
the target's next *feature* rather than its next token. Notation: f_t is the target's
feature at position t (here the final hidden state after the final norm, i.e. the input of
the LM head), x_t the token at position t, E[x] the target's input embedding and W the
target's LM head ([D, V]; the embedding table itself for tied models such as SmolLM2).

    u_t       = concat(f_t, E[x_{t+1}])                    # feature + the *next* token
    h_t       = Dense_{2D -> D}(u_t)                        # with bias
    f̂_{t+1}  = DecoderLayer(h_t)                           # one Llama layer, own KV cache
    draft logits for x_{t+2} = f̂_{t+1} @ W                 # the target's frozen LM head

The token x_{t+1} resolves what the feature alone leaves open (which token the target
actually emitted from f_t). Drafting autoregresses on features: the next input pair is
(f̂_{t+1}, d_{t+2}) with d_{t+2} a drafted token. The target's embedding and LM head are
reused and frozen: they are read from `target_params` on every call and never stored with
the head.

RoPE position. Row b, slot s of a call holds the pair (f_t, x_{t+1}); the caller passes
`positions[b, s] = t + 1`, the position of x_{t+1} (the token whose embedding enters the
pair). Only position differences matter to attention, so any consistent offset works, but
the trained checkpoint and the tests use t + 1.

FSPAD ("Boosting Lossless Speculative Decoding via Feature Sampling and Partial Alignment
Distillation", Gui, Xiao, Su, Chen; 2024) changes two things; the paper's exact operators
were not available to us, so both are *hypotheses* (algorithm card 2 marks them
UNCONFIRMED), each switchable in `HeadConfig`:

* Feature sampling (`feature_sampling=True`). Hypothesis: "sampling the feature with the
  token embedding" is the elementwise product f_t ⊙ W[:, x_{t+1}], the per-dimension
  decomposition of the logit the emitted token received (its sum is that logit). It is
  RMS-normalized (learned scale), mapped by a learned D x D matrix initialized at zero and
  added to the feature before the FC layer:
      f'_t = f_t + A · rmsnorm(f_t ⊙ W[:, x_{t+1}]),   u_t = concat(f'_t, E[x_{t+1}]).
  The plain EAGLE FC is linear in (f, E[x]), so it cannot form feature x token
  interactions before the decoder layer; this adds exactly such a bilinear term for D^2 + D
  extra parameters (0.33M for SmolLM2). With A = 0 at initialization the head starts as
  the base EAGLE head.
* Partial alignment distillation (`partial_alignment=True`). Hypothesis: the feature
  regression (SmoothL1) covers only the first `aligned_dims = round(partial_fraction * D)`
  dimensions of f̂ (a fixed subset; hidden dimensions have no order, so the choice is
  arbitrary), while the draft logits, computed from all D dimensions, get the full
  cross-entropy term. The remaining dimensions are then free to serve logit confidence.
  This is a training-time change only (`train/draft_head.py`); the network is the same.

API: `EagleHead(HeadConfig(target_config, ...))` is hashable (a static jit argument);
`head(head_params, target_params, features, tokens, positions, cache, attn_mask,
cache_mask) -> HeadOutput(features, logits, cache)`; `head.init_cache(batch, max_len)`;
`init_head_params(head, key)`; `save_head` / `load_head` (an `eagle_head` artifact,
`models.artifacts`; shipped heads are registered in `models.registry.ARTIFACTS`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import artifacts, checkpoint, transformer
from models.artifacts import TargetMismatchError  # the error of a head loaded on another target
from models.config import DTYPES, ModelConfig
from models.kv_cache import KVCache
from models import packed_matmul as packing
from models.packed_matmul import packed_matmul

Array = jax.Array

FEATURES = ("hidden",)  # "hidden": final hidden state after the final norm (LM-head input)
STORAGE_DTYPE = "bfloat16"  # the head parameters are stored in bf16 (loaded back as float32)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Static configuration of a draft head: the target's architecture plus the options.

  `target` is the target's `ModelConfig` (sizes, RoPE, norm epsilon, compute dtype and
  matmul settings are shared with the head's decoder layer). `partial_fraction` is used
  only when `partial_alignment` is on.
  """
  target: ModelConfig
  feature_sampling: bool = False
  partial_alignment: bool = False
  partial_fraction: float = 0.5
  feature: str = "hidden"

  def __post_init__(self):
    if self.feature not in FEATURES:
      raise ValueError(f"feature must be one of {FEATURES}, got {self.feature!r}")
    if not 0.0 < float(self.partial_fraction) <= 1.0:
      raise ValueError(f"partial_fraction must be in (0, 1], got {self.partial_fraction}")

  @property
  def layer_config(self) -> ModelConfig:
    """The head's own one-layer decoder config (per-layer parameters, separate projections,
    no remat), whatever the target's layout."""
    return self.target.replace(num_layers=1, scan_layers=False, remat=False,
                               fused_projections=False, matmul_kernel="xla")

  @property
  def hidden_size(self) -> int:
    return self.target.hidden_size

  @property
  def aligned_dims(self) -> int:
    """How many leading feature dimensions the SmoothL1 term regresses."""
    d = self.target.hidden_size
    return max(1, int(round(self.partial_fraction * d))) if self.partial_alignment else d

  def replace(self, **kw) -> "HeadConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return {"target": checkpoint.config_to_dict(self.target),
            "feature_sampling": bool(self.feature_sampling),
            "partial_alignment": bool(self.partial_alignment),
            "partial_fraction": float(self.partial_fraction), "feature": self.feature}

  @classmethod
  def from_dict(cls, d: dict, **target_overrides) -> "HeadConfig":
    return cls(target=checkpoint.config_from_dict(d["target"], **target_overrides),
               feature_sampling=bool(d["feature_sampling"]),
               partial_alignment=bool(d["partial_alignment"]),
               partial_fraction=float(d["partial_fraction"]), feature=d["feature"])


@flax.struct.dataclass
class HeadOutput:
  features: Array  # [B, S, D] f̂: the predicted next feature of each pair (compute dtype)
  logits: Optional[Array]  # [B, S, V] float32 draft logits (target LM head of f̂)
  cache: Optional[KVCache]  # the head's one-layer cache, lengths + S; None without a cache


class FeatureSampler(nn.Module):
  """f + A · rmsnorm(f ⊙ w_x): FSPAD's feature sampling, our hypothesis (module docstring)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, features: Array, token_columns: Array) -> Array:
    cfg = self.config
    d = features.shape[-1]
    sampled = transformer.RMSNorm(cfg, name="norm")(features * token_columns)
    kernel = self.param("kernel", nn.initializers.zeros, (d, d), cfg.param_dtype)
    return features + transformer.matmul(sampled, kernel, cfg)


class HeadNetwork(nn.Module):
  """The trainable part: [feature sampling] -> FC(2D -> D) -> one decoder layer."""
  config: HeadConfig

  @nn.compact
  def __call__(self, features, token_embeds, token_columns, positions, k_cache, v_cache,
               lengths, mask, cache_mask=None):
    # features, token_embeds, token_columns: [B, S, D]; positions [B, S]; k/v_cache
    # [B, Hkv, T, hd] or None; lengths [B]; mask [B, S, S]; cache_mask [B, S, T] or None.
    cfg = self.config.layer_config
    f = features.astype(cfg.dtype)
    if self.config.feature_sampling:
      f = FeatureSampler(cfg, name="feature_sampler")(f, token_columns.astype(cfg.dtype))
    x = jnp.concatenate([f, token_embeds.astype(cfg.dtype)], axis=-1)
    x = transformer.Dense(cfg.hidden_size, cfg, use_bias=True, name="fc")(x)
    rotary = transformer.rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    (y, _), (k_cache, v_cache) = transformer.DecoderLayer(cfg, name="layer")(
        (x, x), (k_cache, v_cache), rotary, lengths, mask, cache_mask)
    return y, k_cache, v_cache


def output_weights(target_params: Any, config: HeadConfig) -> dict:
  """The frozen target tensors the head reads: embedding table and LM head, both [D, V] (or
  both packed into column panels when the target was loaded with `matmul_kernel="packed"`)."""
  table = target_params["embed"]["table"]
  head = table if config.target.tie_word_embeddings else target_params["lm_head"]["kernel"]
  return {"table": table, "head": head}


def _columns(w: Array, tokens: Array, dtype) -> Array:
  """w[:, tokens] as [B, S, D] (the Embedder's gather from a [D, V] table or its panels)."""
  return transformer.lookup(w, tokens).astype(dtype)


def head_logits(out_w: dict, config: HeadConfig, features: Array) -> Array:
  """Draft logits of features through the target's LM head: [..., D] -> [..., V] float32."""
  if out_w["head"].ndim == 3:  # packed panels (`models.packed_matmul`)
    return packed_matmul(features, out_w["head"])
  return transformer.matmul(features, out_w["head"], config.target).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 9))
def head_forward(head_params: Any, config: HeadConfig, out_w: dict, features: Array,
                 tokens: Array, positions: Array, cache: Optional[KVCache],
                 attn_mask: Optional[Array] = None, cache_mask: Optional[Array] = None,
                 with_logits: bool = True) -> HeadOutput:
  """One head pass over S new (feature, next token) pairs per row.

  features [B, S, D]: f_t (target features, or the head's own f̂ when drafting);
  tokens [B, S] int32: x_{t+1}; positions [B, S] int32: t + 1. With a cache, the pairs
  attend to the cached slots `< cache.lengths[b]` (further restricted by `cache_mask`
  [B, S, T]) and, among themselves, to what `attn_mask` [B, S, S] allows (causal by
  default); they are written at slots `lengths[b] + s`. `cache=None` runs a cache-free
  full-sequence pass (training). `with_logits=False` skips the [B, S, V] LM-head matmul
  (training computes logits only where the loss needs them).
  """
  lcfg = config.layer_config
  B, S = tokens.shape
  embeds = _columns(out_w["table"], tokens, lcfg.dtype)
  cols = (_columns(out_w["head"], tokens, lcfg.dtype) if config.feature_sampling
          else jnp.zeros((), lcfg.dtype))
  mask = transformer.new_token_mask(B, S, attn_mask)
  if cache is None:
    kc = vc = None
    lengths = jnp.zeros((B,), jnp.int32)
  else:
    kc, vc, lengths = cache.k[0], cache.v[0], cache.lengths
  y, kc, vc = HeadNetwork(config).apply({"params": head_params}, features, embeds, cols,
                                        positions, kc, vc, lengths, mask, cache_mask)
  new_cache = None if cache is None else KVCache(k=(kc,), v=(vc,), lengths=cache.lengths + S)
  logits = head_logits(out_w, config, y) if with_logits else None
  return HeadOutput(features=y, logits=logits, cache=new_cache)


@dataclasses.dataclass(frozen=True)
class EagleHead:
  """The draft head behind one function (hashable: a static argument of jitted loops).

  `head(head_params, target_params, features [B,S,D], tokens [B,S], positions [B,S],
  cache, attn_mask=None, cache_mask=None) -> HeadOutput(features [B,S,D],
  logits [B,S,V] float32, cache)`. Row b, slot s is the pair (f_t, x_{t+1}) at RoPE
  position t + 1 (see the module docstring); `f̂_{t+1}` and the draft logits for x_{t+2}
  come back at the same slot.
  """
  config: HeadConfig

  def __call__(self, head_params, target_params, features: Array, tokens: Array,
               positions: Array, cache: Optional[KVCache], attn_mask: Optional[Array] = None,
               cache_mask: Optional[Array] = None) -> HeadOutput:
    return head_forward(head_params, self.config, output_weights(target_params, self.config),
                        features, tokens, positions, cache, attn_mask, cache_mask)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty one-layer cache ([B, Hkv, T, hd] per tensor, lengths 0)."""
    return KVCache.init(self.config.layer_config, batch_size, max_len)

  def logits(self, target_params, features: Array) -> Array:
    """The target LM head applied to features ([..., D] -> [..., V] float32)."""
    return head_logits(output_weights(target_params, self.config), self.config, features)

  @property
  def vocab_size(self) -> int:
    return self.config.target.vocab_size

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size


def init_head_params(head: EagleHead, key: Array) -> Any:
  """Random head parameters (Dense kernels N(0, 0.02), zero FC bias, unit norm scales;
  the feature sampler's matrix starts at zero)."""
  return _init(head.config, key)


@functools.partial(jax.jit, static_argnums=0)
def _init(config: HeadConfig, key: Array) -> Any:
  d = config.hidden_size
  z = jnp.zeros((1, 1, d), config.target.dtype)
  pos = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  return HeadNetwork(config).init(key, z, z, z, pos, None, None, jnp.zeros((1,), jnp.int32),
                                  mask)["params"]


def num_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ------------------------------------------------------------------------ checkpoints


# ------------------------------------------------------------ reduced draft vocabulary

RANKING = "token_ranking"  # stored next to the head's parameters: int32 [V] token ids
NOT_DRAFTED = -1e30  # logit of a token outside the draft vocabulary (finite: see draft_logits)


def token_ranking(counts: np.ndarray) -> np.ndarray:
  """[V] int32: every token id, most frequent first (ties by id), from counts [V] of the
  target's output tokens: the order a reduced draft vocabulary takes its first V' ids from."""
  counts = np.asarray(counts)
  return np.lexsort((np.arange(counts.shape[0]), -counts)).astype(np.int32)


def draft_vocab_matrix(target_params: Any, config: HeadConfig, ids: Array) -> Array:
  """The LM-head columns of the draft vocabulary, W[:, ids] ([D, V'], float32; packed into
  column panels when the target is packed and V' a multiple of 16), gathered once per run."""
  w = transformer.head_matrix(target_params)[:, ids].astype(jnp.float32)
  if output_weights(target_params, config)["head"].ndim == 3 and packing.packable(w.shape):
    return packing.pack(w)
  return w


def draft_logits(sub_w: Array, ids: Array, features: Array, vocab_size: int) -> Array:
  """Draft logits over a reduced vocabulary ("FR-Spec: Accelerating Large-Vocabulary
  Language Models via Frequency-Ranked Speculative Sampling", Zhao et al., 2025; EAGLE-3's
  draft vocabulary): features [..., D] times the V' gathered columns only, scattered back to
  [..., V] float32 with `NOT_DRAFTED` elsewhere. The LM-head read, the bulk of a draft step,
  shrinks by V / V'; the draft distribution is zero off the subset, which speculative
  sampling allows (a token the draft never proposes needs no draft probability). The filler
  is finite so that a processor masking every drafted token leaves a valid distribution."""
  small = (packed_matmul(features, sub_w) if sub_w.ndim == 3
           else jnp.dot(features.astype(jnp.float32), sub_w))
  full = jnp.full(features.shape[:-1] + (vocab_size,), NOT_DRAFTED, jnp.float32)
  return full.at[..., ids].set(small)


# ------------------------------------------------------------------------ checkpoints


def save_head(path: str, head: EagleHead, params: Any, info: Optional[dict] = None, *,
              target_name: str, target_sha256: str,
              ranking: Optional[np.ndarray] = None) -> str:
  """Writes an `eagle_head` artifact (`models.artifacts`): the head's own parameters (cast
  to bfloat16; the target's embedding and LM head are not stored), the head config, the
  target it was trained for (`target_name`, a registered name or path; `target_sha256`, its
  `LoadedModel.sha256`; its architecture), free-form `info` (the training run and its
  measured acceptance) and, when given, the `token_ranking` [V] int32 a reduced draft
  vocabulary is cut from. Returns the folder's absolute path."""
  stored = dict(params)
  if ranking is not None:
    ranking = np.asarray(ranking, np.int32)
    if sorted(ranking.tolist()) != list(range(head.vocab_size)):
      raise ValueError(f"ranking must order every token id 0..{head.vocab_size - 1} once")
    stored[RANKING] = ranking
  return artifacts.save_artifact(
      path, "eagle_head", stored, config=head.config.to_dict(), info=info,
      target=artifacts.target_entry(target_name, target_sha256, head.config.target),
      storage_dtype=STORAGE_DTYPE)


def load_head(name_or_path: str, target: Optional[str] = None,
              target_sha256: Optional[str] = None, param_dtype=jnp.float32,
              with_ranking: bool = False, **target_overrides):
  """Loads a registered head name or a `save_head` folder: (EagleHead, params), plus the
  stored token ranking ([V] int32 numpy, or None for a head saved without one) when
  `with_ranking`.

  The target check: the head is only valid on the target it was trained on, so its
  recorded target sha256 must equal `target_sha256` if given, else the checksum of the
  registered model `target`, else that of the registered model the head names as its target
  (`TargetMismatchError`, a `ChecksumError`, otherwise; ValueError when none of these is
  known). `target_overrides` replace fields of the stored target config (e.g. `dtype`,
  `matmul_precision`); `param_dtype` is the dtype the bf16-stored parameters are returned in.
  """
  if target_sha256 is None:
    _, manifest = artifacts.read_manifest(name_or_path, "eagle_head")
    name = target if target is not None else manifest["target"]["name"]
    target_sha256 = artifacts.registered_sha256(name)
    if target_sha256 is None:
      raise ValueError(f"cannot check the draft head's target: {name!r} is not a registered "
                       "model; pass target_sha256=")
  manifest, stored = artifacts.load_artifact(name_or_path, "eagle_head",
                                             target_sha256=target_sha256)
  param_dtype = DTYPES[param_dtype] if isinstance(param_dtype, str) else param_dtype
  target_overrides.setdefault("param_dtype", param_dtype)
  head = EagleHead(HeadConfig.from_dict(manifest["config"], **target_overrides))
  stored = dict(stored)
  ranking = stored.pop(RANKING, None)
  params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), stored)
  if with_ranking:
    return head, params, None if ranking is None else np.asarray(ranking, np.int32)
  return head, params

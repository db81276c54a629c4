"""The model boundary every decoding strategy talks to, one-call model loading, language-model
export (`save_lm`) and the DistillSpec self-draft loader (`load_self_draft`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from models import artifacts, checkpoint, moe_delta, packed_matmul, registry, sharding, transformer
from models import numerics as numerics_lib
from models.config import DTYPES, MATMUL_KERNELS, ModelConfig
from models.kv_cache import KVCache
from models.tokenizer import Tokenizer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TransformerLM:
  """Hides the network behind one function (in the style of T5X's `tokens_to_logits`).

  `lm(params, tokens | embeds, positions, cache, attn_mask[, cache_mask]) ->
  ForwardOutput(logits, hidden, penultimate, cache)`. Instances are hashable, so they are static arguments
  of jitted loops, while the parameters stay ordinary traced arrays. Any object with
  the same call signature, `init_cache` and `vocab_size` (e.g. a fake model in tests)
  works with every strategy.
  """
  config: ModelConfig
  mesh: Any = None  # optional jax.sharding.Mesh: the cache is created sharded on it

  def __call__(self, params, tokens: Optional[Array], positions: Array, cache: KVCache,
               attn_mask: Optional[Array] = None, embeds: Optional[Array] = None,
               logits_at: Optional[Array] = None,
               cache_mask: Optional[Array] = None) -> transformer.ForwardOutput:
    if self._rows_per_device(tokens if tokens is not None else embeds):
      # bitwise the single-device result on a data-parallel mesh (models.sharding)
      fn = lambda p, *args: transformer.forward(p, self.config, *args)
      return sharding.rows_per_device(fn, self.mesh, positions.shape[0], params, tokens,
                                      positions, cache, attn_mask, embeds, logits_at,
                                      cache_mask)
    if cache_mask is None:  # keeps the jit cache key of the common call unchanged
      return transformer.forward(params, self.config, tokens, positions, cache, attn_mask,
                                 embeds, logits_at)
    return transformer.forward(params, self.config, tokens, positions, cache, attn_mask, embeds,
                               logits_at, cache_mask)

  def _rows_per_device(self, x: Array) -> bool:
    """A batch-invariant model on a data-only mesh whose data axis divides the batch runs
    each device's rows as their own program. On a mesh with a model axis GSPMD partitions
    the products, and a column block of a product can round differently from the whole
    (seen on XLA:CPU at SmolLM2's shapes): the tokens stay the same there, not every bit."""
    mesh = self.mesh
    return (self.config.batch_invariant and mesh is not None
            and mesh.shape[sharding.MODEL] == 1 and mesh.shape[sharding.DATA] > 1
            and x.shape[0] % mesh.shape[sharding.DATA] == 0)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    if self.config.batch_invariant:  # tree sums over the slots want a power of two
      max_len = 1 << max(0, (max_len - 1).bit_length())
    cache = KVCache.init(self.config, batch_size, max_len)
    if self.mesh is None:
      return cache
    ns = lambda spec: jax.sharding.NamedSharding(self.mesh, spec)
    constrain = lambda x: jax.lax.with_sharding_constraint(
        x, ns(sharding.cache_spec(x.shape, self.mesh)))
    return KVCache(k=jax.tree.map(constrain, cache.k), v=jax.tree.map(constrain, cache.v),
                   lengths=jax.lax.with_sharding_constraint(
                       cache.lengths, ns(sharding.batch_spec(cache.lengths.shape, self.mesh))))

  def embed(self, params, tokens: Array) -> Array:
    return transformer.embed(params, self.config, tokens)

  def truncated(self, params, num_layers: int) -> tuple["TransformerLM", Any]:
    """The model's first `num_layers` layers plus its final norm and output head, as a
    model of its own (the self-drafting configuration of speculative decoding: an
    early-exit draft that shares the target's weights, so nothing is trained)."""
    n = int(num_layers)
    if not 1 <= n <= self.config.num_layers:
      raise ValueError(f"num_layers must be in [1, {self.config.num_layers}], got {num_layers}")
    params = dict(params)
    if self.config.scan_layers:
      params["layers"] = jax.tree.map(lambda x: x[:n], params["layers"])
    else:
      for i in range(n, self.config.num_layers):
        params.pop(f"layers_{i}")
    return TransformerLM(self.config.replace(num_layers=n), self.mesh), params

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_positions(self) -> int:
    return self.config.max_position_embeddings


# Parameters a self-draft shares with its target (read from the target, never stored).
SHARED_WITH_TARGET = ("embed", "lm_head")


@dataclasses.dataclass
class LoadedModel:
  """A loaded language model. `sha256` identifies its weights (what drafters and heads record
  as their target): a registered GGUF file's pinned sha256, an exported decodax folder's
  verified params sha256, or computed at load from an unregistered .gguf file or from the
  shards of a safetensors folder (`load_model` always sets it; None only for a model put
  together in memory)."""
  name: str
  lm: TransformerLM
  params: Any
  tokenizer: Any  # models.tokenizer.Tokenizer or None
  instruct: bool
  sha256: Optional[str]

  @property
  def config(self) -> ModelConfig:
    return self.lm.config


def as_dtype(name_or_dtype) -> Any:
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in DTYPES:
      raise ValueError(f"unknown dtype {name_or_dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name_or_dtype]
  return name_or_dtype


def save_lm(directory: str, config: ModelConfig, params: Any, *,
            tokenizer_metadata: Optional[dict] = None, instruct: bool = False,
            info: Optional[dict] = None) -> str:
  """Exports a language model as an `lm` artifact (`models.artifacts`) that
  `load_model(directory)` reads back: config {"model": the ModelConfig dict, "instruct"},
  the parameters in the stacked-layer layout stored in `config.param_dtype`, the tokenizer's
  GGUF-style metadata when given, and free-form `info` (the training run)."""
  if config.matmul_kernel == "packed":  # stored as plain [K, N] matrices
    params = transformer.unpack_params(params, config)
    config = config.replace(matmul_kernel="xla")
  if config.fused_projections:  # stored with the separate projections every loader reads
    params = transformer.unfuse_projections(params, config)
    config = config.replace(fused_projections=False)
  if not config.scan_layers:
    params = transformer.stack_layers(params, config.num_layers)
  return artifacts.save_artifact(
      directory, "lm", params,
      config={"model": checkpoint.config_to_dict(config), "instruct": bool(instruct)},
      info=info, tokenizer=tokenizer_metadata, storage_dtype=config.param_dtype)


def _load_export(path: str, param_dtype,
                 overrides: dict) -> tuple[ModelConfig, Any, Optional[dict], bool, str]:
  """(config, params, tokenizer metadata, instruct, params sha256) of an `lm` artifact."""
  manifest, stored = artifacts.load_artifact(path, "lm")
  config = checkpoint.config_from_dict(manifest["config"]["model"], param_dtype=param_dtype,
                                       **overrides)
  params = jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), stored)
  if not config.scan_layers:
    params = transformer.unstack_layers(params, config.num_layers)
  return (config, params, artifacts.read_tokenizer(path, manifest),
          bool(manifest["config"]["instruct"]), manifest["params"]["sha256"])


def _load_moe_delta(path: str, param_dtype, overrides: dict
                    ) -> tuple[ModelConfig, Any, Optional[Tokenizer], str]:
  """(config, params, tokenizer, delta sha256) of a Mixture-of-Experts model stored as a
  delta on its dense parent (`models.moe_delta`): the parent is loaded (installed weights,
  float32), checked against the checksum the delta pins, split and adapted."""
  _, manifest = artifacts.read_manifest(path, moe_delta.KIND)
  parent = load_model(manifest["target"]["name"], scan_layers=True, fused_projections=False)
  manifest, delta = artifacts.load_artifact(path, moe_delta.KIND, target_sha256=parent.sha256,
                                            target_config=parent.lm.config)
  config, params = moe_delta.assemble(parent.params, parent.lm.config, delta, manifest["config"])
  config = config.replace(param_dtype=param_dtype, **overrides)
  params = jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), params)
  if not config.scan_layers:
    params = transformer.unstack_layers(params, config.num_layers)
  return config, params, parent.tokenizer, manifest["params"]["sha256"]


def load_model(name_or_path: str = registry.DEFAULT_MODEL, dtype=None, param_dtype=None,
               matmul_precision: Optional[str] = None, split_k: Optional[int] = None,
               scan_layers: bool = False, fused_projections: bool = True,
               matmul_kernel: str = "xla", numerics: Optional[str] = None,
               proj_dtype=None, batch_invariant: bool = False) -> LoadedModel:
  """Loads a registered model name, a .gguf file, a Hugging Face safetensors folder, or an
  exported `lm` artifact folder (written by training, `save_lm`).

  `numerics` names a whole precision recipe ("fp32", "bf16" or "layercast";
  `models.numerics`): the compute dtype, which weights are stored in bfloat16 and the dot
  precision. Without it, `param_dtype` is the storage dtype of every weight (of every weight
  but the projections when `proj_dtype` is given), `dtype` the compute dtype and
  `matmul_precision` the dots' (float32 and "default" when unset). The default layout is the fast one for decoding: one parameter
  subtree per layer (`scan_layers=False`; XLA:CPU copies each layer's weight slice out of a
  stacked array, which costs a scanned step about 1.5x) and q/k/v and gate/up joined into one
  matmul each (`fused_projections=True`; `transformer.fuse_projections`). Its first compile
  is longer (about 16 s for SmolLM2's 30 layers against 5 s scanned; see BENCHMARKS.md).
  Training loads `scan_layers=True, fused_projections=False`: compile time independent of
  depth, and the separate projections LoRA and checkpoints name. `split_k > 1` turns on
  blocked accumulation in every matmul (closer to fp64 and to PyTorch on CPU, but XLA:CPU
  runs the blocked form as a batched dot that is several times slower; see
  `transformer.matmul`). `matmul_kernel="packed"` stores every weight matrix in column panels
  and multiplies with the CPU kernel of `models.packed_matmul` (x86-64 with AVX2; compiled on
  first use): a step costs about its weight read at 1 to 16 rows, where XLA:CPU's 2-16-row
  products cost 2-4x more (speculative verification, small batches; BENCHMARKS.md).
  `batch_invariant=True` makes a row's outputs independent of its batch, padding and cache
  length (`models.batch_invariant`; slower: one token per layer pass).
  """
  if matmul_kernel not in MATMUL_KERNELS:
    raise ValueError(f"matmul_kernel must be one of {MATMUL_KERNELS}, got {matmul_kernel!r}")
  if matmul_kernel == "packed":
    packed_matmul.ensure_registered()  # a clear error here, before any weights are read
  if numerics is not None:
    given = [n for n, v in (("dtype", dtype), ("param_dtype", param_dtype),
                            ("matmul_precision", matmul_precision), ("proj_dtype", proj_dtype))
             if v is not None]
    if given:
      raise ValueError(f"numerics={numerics!r} sets {', '.join(given)}: give one or the other")
    r = numerics_lib.recipe(numerics)
    dtype, param_dtype, proj_dtype, matmul_precision = (
        r["dtype"], r["param_dtype"], r["proj_dtype"], r["matmul_precision"])
  if registry.kind_of(name_or_path) == "speech":
    raise ValueError(f"{name_or_path!r} is a speech model: load it with "
                     "models.speech.load_whisper")
  path, sha, instruct = registry.resolve(name_or_path)
  delta = registry.kind_of(name_or_path) == moe_delta.KIND
  dtype, param_dtype = as_dtype(dtype or "float32"), as_dtype(param_dtype or "float32")
  proj_dtype = None if proj_dtype is None else as_dtype(proj_dtype)
  if split_k is None:
    split_k = 1
  overrides = dict(dtype=dtype, matmul_precision=matmul_precision or "default",
                   split_k=split_k, scan_layers=scan_layers)
  if delta:
    config, params, tok, weights_sha = _load_moe_delta(path, param_dtype, overrides)
  elif os.path.isdir(path) and artifacts.holds_artifact(path):
    config, params, tok_meta, instruct, weights_sha = _load_export(path, param_dtype, overrides)
    tok = Tokenizer(tok_meta) if tok_meta is not None else None
  elif os.path.isdir(path):
    config, params = checkpoint.load_safetensors(path, param_dtype=param_dtype, **overrides)
    tok = (Tokenizer.from_hf_dir(path)
           if os.path.exists(os.path.join(path, "tokenizer.json")) else None)
    weights_sha = checkpoint.sha256_files(checkpoint.safetensors_shards(path))
  else:
    config, params, _ = checkpoint.load_gguf(path, sha, param_dtype=param_dtype, **overrides)
    tok = Tokenizer.from_gguf(path)
    # split models were verified when joined (sha is None then): the pinned digest still
    # names their weights
    registered = registry.MODELS.get(name_or_path)
    weights_sha = registered.sha256.lower() if registered else checkpoint.sha256_file(path)
  if batch_invariant:
    config = config.replace(batch_invariant=True)
  if proj_dtype is not None:  # LayerCast: the projections rounded to bf16, the rest as loaded
    config = config.replace(proj_dtype=proj_dtype)
    params = numerics_lib.cast_params(params, config.param_dtype, proj_dtype)
  if fused_projections:
    params = transformer.fuse_projections(params)
    config = config.replace(fused_projections=True)
  if matmul_kernel == "packed":
    config = config.replace(matmul_kernel="packed")  # validates dtypes and split_k first
    params = transformer.pack_params(params)
  return LoadedModel(name=name_or_path, lm=TransformerLM(config), params=params, tokenizer=tok,
                     instruct=instruct, sha256=weights_sha)


def load_self_draft(name_or_path: str, target: LoadedModel) -> tuple[TransformerLM, Any]:
  """Rebuilds a DistillSpec self-draft (a `self_draft` artifact, `train.distillspec`) on the
  target it was trained for: (draft_lm, draft_params), the target's first k layers replaced
  by the trained ones, its final norm replaced, its embedding / LM head shared (not copied).

  `TargetMismatchError` when the draft was trained for a target of another architecture or,
  when `target.sha256` is set, of other weights. The trained layers are stored stacked and
  come back in the target's layout and parameter dtypes.
  """
  manifest, trained = artifacts.load_artifact(
      name_or_path, "self_draft", target_sha256=target.sha256, target_config=target.lm.config)
  k = int(manifest["config"]["num_layers"])
  draft_lm, dparams = target.lm.truncated(target.params, k)
  if not draft_lm.config.scan_layers:
    trained = transformer.unstack_layers(trained, k)
  if draft_lm.config.fused_projections:
    trained = transformer.fuse_projections(trained)
  if draft_lm.config.matmul_kernel == "packed":
    trained = transformer.pack_params(trained)
  like = {n: v for n, v in dparams.items() if n not in SHARED_WITH_TARGET}
  trained = jax.tree.map(lambda t, x: jnp.asarray(t, x.dtype), trained, like)
  shared = {n: dparams[n] for n in SHARED_WITH_TARGET if n in dparams}
  return draft_lm, {**shared, **trained}

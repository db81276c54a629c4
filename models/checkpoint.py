"""Checkpoint loading: GGUF files (llama.cpp) and Hugging Face-layout safetensors; file and
parameter checksums; the ModelConfig <-> dict conversion artifact manifests store. (The folders
the project writes are `models.artifacts`.)

GGUF tensors are dequantized with the `gguf` package. llama.cpp's converter
permutes the rows of the Q and K projections of `llama`-architecture models so
that RoPE can rotate interleaved pairs; we undo that permutation and keep the
Hugging Face (rotate-half) layout for every architecture. Qwen2 files are not
permuted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from models.config import DTYPES, ModelConfig, SUPPORTED_ARCHITECTURES
from models.moe import Routing
from models.registry import ChecksumError  # re-exported: the error of every checksum check


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  return sha256_files([path], chunk)


def sha256_files(paths: Sequence[str], chunk: int = 1 << 22) -> str:
  """The sha256 of the files' bytes concatenated in the given order (one file: its own
  sha256), read in chunks."""
  h = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      while block := f.read(chunk):
        h.update(block)
  return h.hexdigest()


def params_sha256(params: Any) -> str:
  """The sha256 of a parameter tree's leaf bytes, in tree order: the identity of weights
  that were not loaded from a file (a random initialization, an in-memory model), where a
  loaded model uses its file's checksum (`models.lm.LoadedModel.sha256`)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.asarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


def verify_checksum(path: str, expected: Optional[str]) -> None:
  if expected is None:
    return
  got = sha256_file(path)
  if got != expected.lower():
    raise ChecksumError(
        f"checksum mismatch for {path}: expected sha256 {expected}, got {got}. "
        "The file is corrupt, truncated or a different model.")


def _require_file(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")


# ----------------------------------------------------------------------------- GGUF


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def gguf_config(reader, **overrides) -> ModelConfig:
  """ModelConfig from GGUF metadata (architectures `llama` and `qwen2`)."""
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
        f"unsupported architecture {arch!r} in GGUF file; supported: {SUPPORTED_ARCHITECTURES}")
  rope_scaling = _field(reader, f"{arch}.rope.scaling.type")
  if rope_scaling not in (None, "none"):
    raise ValueError(f"unsupported RoPE scaling {rope_scaling!r} in GGUF file")
  names = {t.name for t in reader.tensors}
  heads = int(_field(reader, f"{arch}.attention.head_count"))
  kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
  hidden = int(_field(reader, f"{arch}.embedding_length"))
  emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
  vocab = int(_field(reader, f"{arch}.vocab_size", int(emb.shape[1])))
  head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
  kw = dict(
      vocab_size=vocab, hidden_size=hidden,
      num_layers=int(_field(reader, f"{arch}.block_count")),
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_word_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
      architecture=arch,
      max_position_embeddings=int(_field(reader, f"{arch}.context_length", 8192)),
  )
  kw.update(overrides)
  return ModelConfig(**kw)


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation. w: [out, in]."""
  out = w.shape[0]
  return (w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _dequant(tensor) -> np.ndarray:
  arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  shape = tuple(int(s) for s in reversed(tensor.shape))
  return np.asarray(arr, dtype=np.float32).reshape(shape)


def _stack_layers(per_layer: list[dict]) -> dict:
  """Stacks per-layer trees key by key, dropping each per-layer piece once stacked (peak
  memory: one extra copy of one tensor kind, not of the whole model). Empties `per_layer`."""
  out = {}
  for k in list(per_layer[0]):
    pieces = [d.pop(k) for d in per_layer]
    out[k] = _stack_layers(pieces) if isinstance(pieces[0], dict) else np.stack(pieces)
    del pieces
  return out


def _params_from_hf_like(get, config: ModelConfig, dtype) -> dict:
  """Builds the Flax parameter tree from a getter of HF-layout [out, in] matrices.

  `get(name)` returns a float32 numpy array for HF names such as
  `model.layers.0.self_attn.q_proj.weight`, or None if absent.
  """
  layers = []
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    lin = lambda n: {"kernel": get(p + n + ".weight").T}
    attn = {n: lin("self_attn." + n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if config.qkv_bias:
      for n in ("q_proj", "k_proj", "v_proj"):
        attn[n]["bias"] = get(p + f"self_attn.{n}.bias")
    layers.append({
        "attn_norm": {"scale": get(p + "input_layernorm.weight")},
        "attn": attn,
        "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
        "mlp": {n: lin("mlp." + n) for n in ("gate_proj", "up_proj", "down_proj")},
    })
  params = {
      "embed": {"table": get("model.embed_tokens.weight").T},
      "final_norm": {"scale": get("model.norm.weight")},
  }
  if config.scan_layers:
    params["layers"] = _stack_layers(layers)
  else:
    for i, layer in enumerate(layers):
      params[f"layers_{i}"] = layer
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  return _to_jax(params, dtype)


def _to_jax(tree, dtype):
  """numpy tree -> jax arrays, converted in place so each numpy array is freed as soon as
  its device copy exists."""
  if isinstance(tree, dict):
    for k in list(tree):
      tree[k] = _to_jax(tree[k], dtype)
    return tree
  return jnp.asarray(np.ascontiguousarray(tree), dtype=dtype)


_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


_HF_TO_GGUF = {v: k for k, v in _GGUF_TO_HF.items()}


def load_gguf(path: str, sha256: Optional[str] = None, param_dtype=jnp.float32,
              **config_overrides) -> tuple[ModelConfig, dict, Any]:
  """Loads a GGUF checkpoint. Returns (config, params, reader).

  The checksum is verified first when `sha256` is given. Quantized tensors are
  dequantized to float32 and then cast to `param_dtype`.
  """
  _require_file(path)
  verify_checksum(path, sha256)
  reader = gguf.GGUFReader(path)
  config = gguf_config(reader, param_dtype=param_dtype, **config_overrides)
  tensors = {t.name: t for t in reader.tensors}

  def get(hf_name: str):
    if hf_name == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif hf_name == "model.norm.weight":
      name = "output_norm.weight"
    elif hf_name == "lm_head.weight":
      name = "output.weight"
    else:
      _, _, i, rest = hf_name.split(".", 3)
      module, kind = rest.rsplit(".", 1)
      name = f"blk.{i}.{_HF_TO_GGUF[module]}.{kind}"
    if name not in tensors:
      raise ValueError(f"GGUF file {path} lacks tensor {name!r}")
    w = _dequant(tensors[name])
    if config.architecture == "llama":
      if name.endswith("attn_q.weight"):
        w = _unpermute_rope_rows(w, config.num_heads)
      elif name.endswith("attn_k.weight"):
        w = _unpermute_rope_rows(w, config.num_kv_heads)
    return w

  return config, _params_from_hf_like(get, config, param_dtype), reader


# ---------------------------------------------------------------------- safetensors


def hf_config(cfg: dict, **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face `config.json` (LlamaForCausalLM / Qwen2ForCausalLM)."""
  mt = cfg.get("model_type")
  if mt not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"unsupported model_type {mt!r}; supported: {SUPPORTED_ARCHITECTURES}")
  scaling = cfg.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ValueError(f"unsupported rope_scaling {scaling!r}")
  heads = cfg["num_attention_heads"]
  kw = dict(
      vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
      num_layers=cfg["num_hidden_layers"], num_heads=heads,
      num_kv_heads=cfg.get("num_key_value_heads", heads),
      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
      intermediate_size=cfg["intermediate_size"], rope_theta=cfg.get("rope_theta", 10000.0),
      rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=cfg.get("tie_word_embeddings", False),
      qkv_bias=cfg.get("attention_bias", mt == "qwen2"), architecture=mt,
      max_position_embeddings=cfg.get("max_position_embeddings", 8192))
  kw.update(overrides)
  return ModelConfig(**kw)


def safetensors_shards(directory: str) -> list[str]:
  """The `*.safetensors` files of a Hugging Face folder, sorted by name (at least one)."""
  shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  if not shards:
    raise FileNotFoundError(f"no .safetensors files in {directory}")
  return [os.path.join(directory, n) for n in shards]


def load_safetensors(directory: str, param_dtype=jnp.float32,
                     **config_overrides) -> tuple[ModelConfig, dict]:
  """Loads Hugging Face-layout weights: `config.json` plus `*.safetensors` shards."""
  cfg_path = os.path.join(directory, "config.json")
  _require_file(cfg_path)
  with open(cfg_path) as f:
    config = hf_config(json.load(f), param_dtype=param_dtype, **config_overrides)
  tensors: dict[str, np.ndarray] = {}
  for shard in safetensors_shards(directory):
    tensors.update(load_file(shard))

  def get(name):
    if name not in tensors:
      raise ValueError(f"safetensors checkpoint in {directory} lacks tensor {name!r}")
    return np.asarray(tensors[name], dtype=np.float32)

  return config, _params_from_hf_like(get, config, param_dtype)


# ------------------------------------------------------------------- model configs


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def config_to_dict(config: ModelConfig) -> dict:
  d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  d["dtype"], d["param_dtype"] = _dtype_name(config.dtype), _dtype_name(config.param_dtype)
  d["proj_dtype"] = None if config.proj_dtype is None else _dtype_name(config.proj_dtype)
  d["moe_routing"] = dataclasses.asdict(config.moe_routing)
  return d


def config_from_dict(d: dict, **overrides) -> ModelConfig:
  d = dict(d)
  d.update(overrides)
  for k in ("dtype", "param_dtype", "proj_dtype"):
    if isinstance(d.get(k), str):
      d[k] = DTYPES[d[k]]
  if isinstance(d.get("moe_routing"), dict):
    d["moe_routing"] = Routing(**d["moe_routing"])
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in d.items() if k in known})

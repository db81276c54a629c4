"""Builds the model a training config names: a pretrained checkpoint or a fresh random one.

`config.model` fields: `name` (a registered model, a .gguf / safetensors / decodax path,
or "tiny" for a small random model whose sizes come from `config.model.overrides`),
`init` ("pretrained" | "random"), `dtype`, `param_dtype`, `scan_layers`, `remat`, and
`tokenizer` (a registered model or path whose tokenizer a "tiny" model uses; its vocab
size then sets the model's).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax

from models import artifacts, checkpoint, registry, transformer
from models.config import ModelConfig, tiny_config
from models.lm import TransformerLM, as_dtype, load_model
from models.tokenizer import Tokenizer


@dataclasses.dataclass
class ModelBundle:
  """The model a run trains or distills from. `sha256` identifies its weights (what drafters
  record as their target): the loaded model's `LoadedModel.sha256`, or the sha256 of the
  parameter bytes of a randomly initialized one (`checkpoint.params_sha256`)."""
  lm: TransformerLM
  params: Any
  tokenizer: Any  # models.tokenizer.Tokenizer or None
  instruct: bool
  source: str
  sha256: str

  @property
  def config(self) -> ModelConfig:
    return self.lm.config


def _tokenizer_for(name: str):
  path, _, _ = registry.resolve(name)
  if os.path.isdir(path):  # an exported model: the tokenizer metadata stored beside it
    folder, manifest = artifacts.read_manifest(path, "lm")
    meta = artifacts.read_tokenizer(folder, manifest)
    return Tokenizer(meta) if meta is not None else None
  return Tokenizer.from_gguf(path)


def build(mcfg: Any, seed: int = 0) -> ModelBundle:
  name = mcfg.name
  dtype, param_dtype = as_dtype(mcfg.get("dtype", "float32")), as_dtype(
      mcfg.get("param_dtype", "float32"))
  scan, remat = bool(mcfg.get("scan_layers", True)), bool(mcfg.get("remat", False))
  init = mcfg.get("init", "pretrained")
  if init not in ("pretrained", "random"):
    raise ValueError(f"model.init must be 'pretrained' or 'random', got {init!r}")
  if name == "tiny":
    tok_name = mcfg.get("tokenizer", "")
    tok = _tokenizer_for(tok_name) if tok_name else None
    overrides = dict(mcfg.get("overrides", {}))
    if tok is not None:
      overrides["vocab_size"] = tok.vocab_size
    config = tiny_config(dtype=dtype, param_dtype=param_dtype, scan_layers=scan, remat=remat,
                         **overrides)
    params = transformer.init_params(config, jax.random.PRNGKey(seed))
    return ModelBundle(TransformerLM(config), params, tok, False, "tiny",
                       checkpoint.params_sha256(params))
  m = load_model(name, dtype=dtype, param_dtype=param_dtype, scan_layers=scan,
                 fused_projections=False)  # LoRA and checkpoints name the separate projections
  config = m.config.replace(remat=remat)
  params, sha = m.params, m.sha256
  if init == "random":
    params = transformer.init_params(config, jax.random.PRNGKey(seed))
    sha = checkpoint.params_sha256(params)
  return ModelBundle(TransformerLM(config), params, m.tokenizer, m.instruct, name, sha)


def tokenizer_metadata(tok) -> Optional[dict]:
  return None if tok is None else getattr(tok, "metadata", None)

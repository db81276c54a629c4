"""Loading Whisper checkpoints: CTranslate2 files into the Flax model of `models.whisper`.

`load_whisper("whisper-tiny.en" | "whisper-base" | a folder with model.bin, config.json and
tokenizer.json)` verifies the weights' sha256 (registered models), reads the CTranslate2
variables (`models.ctranslate2_file`), maps them onto the Flax parameter tree (fused q/k/v
split; torch-layout kernels transposed; fp16 widened to fp32) and builds the tokenizer from
the files' vocabulary, with Whisper's special tokens and start sequence.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from models import artifacts, checkpoint, ctranslate2_file, low_rank, registry, whisper
from models.whisper import WhisperConfig, WhisperDecoder

DEFAULT_SPEECH_MODEL = "whisper-tiny.en"
SPEC_NAME = "WhisperSpec"
GELU = 3  # CTranslate2's ActivationType::GELU (exact, erf)


@dataclasses.dataclass(frozen=True)
class WhisperTokenizer:
  """Whisper's byte-level BPE with its special tokens. English-only models start with
  <|startoftranscript|><|notimestamps|>; multilingual ones name the language and the task
  in between (<|en|><|transcribe|>)."""
  tokenizer: Any  # tokenizers.Tokenizer
  multilingual: bool

  def id(self, token: str) -> int:
    i = self.tokenizer.token_to_id(token)
    if i is None:
      raise ValueError(f"the tokenizer has no token {token!r}")
    return int(i)

  @property
  def eot(self) -> int:
    return self.id("<|endoftext|>")

  @property
  def sot(self) -> int:
    return self.id("<|startoftranscript|>")

  @property
  def no_timestamps(self) -> int:
    return self.id("<|notimestamps|>")

  def start_sequence(self, language: str = "en", task: str = "transcribe") -> tuple[int, ...]:
    if not self.multilingual:
      if language != "en" or task != "transcribe":
        raise ValueError("an English-only Whisper model only transcribes English")
      return (self.sot, self.no_timestamps)
    return (self.sot, self.id(f"<|{language}|>"), self.id(f"<|{task}|>"), self.no_timestamps)

  def first_special(self) -> int:
    """Ids from here on are special (end of text, start, languages, tasks, timestamps)."""
    return self.eot

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids if int(i) < self.eot],
                                 skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class SpeechModel:
  name: str
  config: WhisperConfig
  params: Any  # {"encoder": ..., "decoder": ...} (Flax parameter trees)
  tokenizer: WhisperTokenizer
  suppress: tuple[int, ...]  # Whisper's suppressed symbols (config.json `suppress_ids`)
  suppress_at_start: tuple[int, ...]  # banned as the first token (blank, end of text)
  sha256: str
  # a causal streaming model (CarelessWhisper adapters): the chunking it was trained for,
  # {"chunk_ms", "first_chunks"}; None for Whisper as released
  streaming: Optional[dict] = None

  def decoder(self, prompt_len: int, suppress: bool = True) -> WhisperDecoder:
    """The decoder boundary for a start sequence of `prompt_len` tokens, with Whisper's
    token suppression (`suppress=True`, as its reference decoder does) or without."""
    return WhisperDecoder(self.config, self.suppress if suppress else (),
                          self.suppress_at_start if suppress else (), prompt_len)


def _files(name_or_path: str) -> tuple[str, Optional[str], str, str]:
  """(model.bin, pinned sha256 or None, tokenizer.json, config.json)."""
  spec = registry.SPEECH_MODELS.get(name_or_path)
  if spec is not None:
    path, sha, _ = registry.resolve(name_or_path)  # joins split files (verified there)
    return (path, sha, registry.companion_file(spec, "tokenizer.json"),
            registry.companion_file(spec, "config.json"))
  if registry.kind_of(name_or_path) not in (None, "speech") or name_or_path in registry.MODELS:
    raise ValueError(f"{name_or_path!r} is not a speech model; registered speech models: "
                     f"{registered_names()}")
  if not os.path.isdir(name_or_path):
    raise ValueError(f"unknown speech model {name_or_path!r}: not a registered name "
                     f"({registered_names()}) and no such folder")
  files = [os.path.join(name_or_path, f) for f in ("model.bin", "tokenizer.json", "config.json")]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f"a CTranslate2 Whisper folder holds model.bin, tokenizer.json and "
                            f"config.json; {name_or_path} lacks {missing}")
  return files[0], None, files[1], files[2]


def _linear(f: ctranslate2_file.ModelFile, prefix: str, bias: bool = True) -> dict:
  out = {"kernel": f.array(prefix + "/weight").astype(np.float32).T}
  if bias:
    out["bias"] = f.array(prefix + "/bias").astype(np.float32)
  return out


def _split_linear(f: ctranslate2_file.ModelFile, prefix: str, names: tuple[str, ...]) -> dict:
  """A fused projection ([n * D, D] weight) as separate Dense layers; the key part's bias
  must be zero (Whisper's key projections have none)."""
  w = f.array(prefix + "/weight").astype(np.float32)
  b = f.array(prefix + "/bias").astype(np.float32)
  n = len(names)
  ws, bs = np.split(w, n, axis=0), np.split(b, n)
  out = {}
  for name, wi, bi in zip(names, ws, bs):
    if name == "k_proj":
      if np.any(bi != 0):
        raise ctranslate2_file.FormatError(f"{prefix}: a key bias is set; Whisper has none")
      out[name] = {"kernel": wi.T}
    else:
      out[name] = {"kernel": wi.T, "bias": bi}
  return out


def _norm(f: ctranslate2_file.ModelFile, prefix: str) -> dict:
  return {"scale": f.array(prefix + "/gamma").astype(np.float32),
          "bias": f.array(prefix + "/beta").astype(np.float32)}


def _layer(f: ctranslate2_file.ModelFile, p: str) -> dict:
  """The self-attention and MLP blocks every encoder and decoder layer has."""
  attn = _split_linear(f, p + "/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
  attn["out_proj"] = _linear(f, p + "/self_attention/linear_1")
  return {"self_attn": attn, "self_attn_layer_norm": _norm(f, p + "/self_attention/layer_norm"),
          "final_layer_norm": _norm(f, p + "/ffn/layer_norm"),
          "mlp": {"fc1": _linear(f, p + "/ffn/linear_0"), "fc2": _linear(f, p + "/ffn/linear_1")}}


def _layer_count(f: ctranslate2_file.ModelFile, side: str) -> int:
  n = 0
  while f"{side}/layer_{n}/ffn/linear_0/weight" in f.variables:
    n += 1
  return n


def params_from_ct2(f: ctranslate2_file.ModelFile) -> tuple[WhisperConfig, dict]:
  """The Flax configuration and parameters of a CTranslate2 WhisperSpec file."""
  if f.spec != SPEC_NAME:
    raise ctranslate2_file.FormatError(f"expected a {SPEC_NAME} file, got {f.spec!r}")
  if f.scalar("decoder/activation") != GELU or not f.scalar("decoder/pre_norm"):
    raise ctranslate2_file.FormatError("not Whisper's layout (pre-norm layers with GELU)")
  if f.scalar("decoder/scale_embeddings") or f.scalar("decoder/alibi"):
    raise ctranslate2_file.FormatError("scaled embeddings / ALiBi are not Whisper's")
  embed = f.array("decoder/embeddings/weight")
  conv1 = f.array("encoder/conv1/weight")  # [D, n_mels, 3] (torch Conv1d layout)
  config = WhisperConfig(
      n_mels=conv1.shape[1], d_model=conv1.shape[0],
      encoder_heads=f.scalar("encoder/num_heads"), decoder_heads=f.scalar("decoder/num_heads"),
      encoder_layers=_layer_count(f, "encoder"), decoder_layers=_layer_count(f, "decoder"),
      vocab_size=embed.shape[0],
      audio_positions=f.array("encoder/position_encodings/encodings").shape[0],
      text_positions=f.array("decoder/position_encodings/encodings").shape[0])
  conv = lambda p: {"kernel": f.array(p + "/weight").astype(np.float32).transpose(2, 1, 0),
                    "bias": f.array(p + "/bias").astype(np.float32)}
  enc = {"conv1": conv("encoder/conv1"), "conv2": conv("encoder/conv2"),
         "positions": f.array("encoder/position_encodings/encodings").astype(np.float32),
         "layer_norm": _norm(f, "encoder/layer_norm")}
  for i in range(config.encoder_layers):
    enc[f"layers_{i}"] = _layer(f, f"encoder/layer_{i}")
  dec = {"embed_tokens": embed.astype(np.float32),
         "embed_positions": f.array("decoder/position_encodings/encodings").astype(np.float32),
         "layer_norm": _norm(f, "decoder/layer_norm")}
  for i in range(config.decoder_layers):
    p = f"decoder/layer_{i}"
    cross = {"q_proj": _linear(f, p + "/attention/linear_0"),
             **_split_linear(f, p + "/attention/linear_1", ("k_proj", "v_proj")),
             "out_proj": _linear(f, p + "/attention/linear_2")}
    dec[f"layers_{i}"] = {**_layer(f, p), "cross_attn": cross,
                          "cross_attn_layer_norm": _norm(f, p + "/attention/layer_norm")}
  to_jnp = lambda tree: {k: to_jnp(v) if isinstance(v, dict) else jnp.asarray(v)
                         for k, v in tree.items()}
  return config, {"encoder": to_jnp(enc), "decoder": to_jnp(dec)}


def registered_names() -> list[str]:
  """The registered names `load_whisper` takes: Whisper models and streaming adapters."""
  return sorted(n for n, a in registry.ARTIFACTS.items() if a.kind in ("speech", ADAPTER_KIND))


def load_whisper(name_or_path: str = DEFAULT_SPEECH_MODEL) -> SpeechModel:
  """A registered Whisper model, a folder of CTranslate2 Whisper files, or a streaming
  adapter (`speech_adapter` artifact: registered name or folder) merged into its base."""
  if registry.kind_of(name_or_path) == ADAPTER_KIND:
    return _load_adapted(name_or_path)
  path, sha, tok_path, cfg_path = _files(name_or_path)
  digest = checkpoint.sha256_file(path) if sha is not None else None
  if sha is not None and digest != sha.lower():
    raise registry.ChecksumError(
        f"checksum mismatch for {path}: expected sha256 {sha.lower()}, got {digest}; "
        f"reinstall it: python -m models.install --force-reinstall {name_or_path}")
  if digest is None:
    entry = registry.SPEECH_MODELS.get(name_or_path)
    digest = entry.sha256.lower() if entry is not None else checkpoint.sha256_file(path)
  config, params = params_from_ct2(ctranslate2_file.read(path))
  with open(cfg_path) as fh:
    meta = json.load(fh)
  tok = WhisperTokenizer(HFTokenizer.from_file(tok_path),
                         multilingual=config.vocab_size >= 51865)
  return SpeechModel(name=name_or_path, config=config, params=params, tokenizer=tok,
                     suppress=tuple(int(i) for i in meta.get("suppress_ids", ())),
                     suppress_at_start=tuple(int(i) for i in meta.get("suppress_ids_begin", ())),
                     sha256=digest)


ADAPTER_KIND = "speech_adapter"


def save_adapter(directory: str, base: SpeechModel, adapters: Any, *, rank: int, alpha: float,
                 chunk_ms: int, first_chunks: int, info: Optional[dict] = None) -> str:
  """Writes LoRA adapters trained on `base` (`train.careless_whisper`) as an artifact: the
  adapter tree, its rank and scale, and the chunking the model streams with."""
  target = {"name": base.name, "sha256": base.sha256.lower(),
            "architecture": dataclasses.asdict(base.config)}
  return artifacts.save_artifact(
      directory, ADAPTER_KIND, adapters, target=target, info=info,
      config={"rank": int(rank), "alpha": float(alpha), "chunk_ms": int(chunk_ms),
              "first_chunks": int(first_chunks)})


def _load_adapted(name_or_path: str) -> SpeechModel:
  path, manifest = artifacts.read_manifest(name_or_path, ADAPTER_KIND)
  base = load_whisper(manifest["target"]["name"])
  if dataclasses.asdict(base.config) != manifest["target"]["architecture"]:
    raise artifacts.TargetMismatchError(f"{name_or_path!r} was trained for another Whisper "
                                        "architecture")
  manifest, adapters = artifacts.load_artifact(name_or_path, ADAPTER_KIND,
                                               target_sha256=base.sha256)
  c = manifest["config"]
  adapters = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapters)
  params = low_rank.merge(base.params, adapters, float(c["alpha"]) / int(c["rank"]))
  return dataclasses.replace(
      base, name=name_or_path, params=params,
      sha256=checkpoint.sha256_files([os.path.join(path, manifest["params"]["file"])]),
      streaming={"chunk_ms": int(c["chunk_ms"]), "first_chunks": int(c["first_chunks"])})


def encode_audio(model: SpeechModel, mel: np.ndarray, mask=None) -> Any:
  """Encoder states [B, F/2, D] of log-mel spectrograms [B, n_mels, F]."""
  return whisper.encode(model.params, model.config, mel, mask)

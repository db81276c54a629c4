"""One folder format for every artifact the project writes, and its loader.

An artifact folder (language-model exports, EAGLE heads, self-drafts, GAD drafters, the VQ
tokenizer, the image classifier) holds:

  manifest.json       {"format": "decodax-artifact", "version": 1, "kind": one of
                       registry.KINDS, "config": the kind's own config dict,
                       "params": {"file": "params.safetensors", "sha256", "storage_dtype",
                                  "num_params"},
                       "target": {"name", "sha256", "architecture"} or null,
                       "tokenizer": "tokenizer.json" or null,
                       "info": free-form (the training command and its measured results)}
  params.safetensors  the parameter tree, flattened with '/'-joined keys; every floating
                      leaf in the one storage dtype (bfloat16 as its uint16 bits: the
                      safetensors numpy API has no bfloat16); transformer layers in the
                      stacked layout (the writer stacks them: `transformer.stack_layers`)
  tokenizer.json      only for language models that carry their tokenizer's metadata

One parameter file per artifact, so its checksum is one file's sha256. `target` ties a
drafter or head to the exact model it was trained for: `sha256` is that model's
`models.lm.LoadedModel.sha256` (a registered GGUF file's pinned digest, an exported model's
params sha256), `architecture` its `ARCH_FIELDS`.

`load_artifact` resolves a registered name or a path (`registry.resolve`), refuses a folder of
an earlier format (`OutdatedFormatError`, naming the command that produces the artifact
anew), another kind, another target (`TargetMismatchError`) and a parameter file whose sha256
differs from the manifest's (`ChecksumError`, naming the file and both digests).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from models import registry
from models.checkpoint import ChecksumError, sha256_file

FORMAT = "decodax-artifact"
VERSION = 1
MANIFEST = registry.MANIFEST
PARAMS_FILE = "params.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# The target fields a drafter depends on: drafters that reuse the target's layers, embedding
# or LM head only fit a target with exactly these.
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "intermediate_size", "tie_word_embeddings", "qkv_bias",
               "architecture")

# Manifest files of the formats before this one (each beside an orbax `params/` folder,
# except decodax_model.json), by the kind they held.
OUTDATED_MANIFESTS = {"decodax_model.json": "lm", "draft_head.json": "eagle_head",
                      "draft.json": "self_draft", "gad.json": "gad_drafter",
                      "vqvae.json": "vq_tokenizer", "classifier.json": "image_classifier"}

# What produces an unregistered artifact of each kind (registered ones name their command).
PRODUCERS = {
    "lm": "python -m train.main --config=CONFIG --workdir=DIR (written to DIR/export)",
    "eagle_head": "python -m train.draft_head or python -m train.image_draft_head",
    "self_draft": "python -m train.distillspec",
    "gad_drafter": "python -m train.gad",
    "vq_tokenizer": "python -m train.vqvae",
    "image_classifier": "python -m train.image_classifier",
    "moe_delta": "python -m train.moe_distill",
    "speech_adapter": "python -m train.careless_whisper --config=configs/careless_whisper.py",
}


class OutdatedFormatError(ValueError):
  """The folder holds an artifact in a format this version no longer reads."""


class TargetMismatchError(ChecksumError):
  """A drafter or head was trained for another target model than the one given."""


def architecture(config: Any) -> dict:
  """The `ARCH_FIELDS` of a ModelConfig, as stored in a manifest's target."""
  return {f: getattr(config, f) for f in ARCH_FIELDS}


def target_entry(name: str, sha256: str, config: Any) -> dict:
  """The manifest's `target` of a drafter or head trained for the model `name` (registered
  name or path) whose weights have checksum `sha256` and whose ModelConfig is `config`."""
  if not sha256:
    raise ValueError(f"the target {name!r} needs its sha256 (models.lm.LoadedModel.sha256)")
  return {"name": name, "sha256": sha256.lower(), "architecture": architecture(config)}


# ------------------------------------------------------------------------------ writing


def _storage_dtype(leaves: list[np.ndarray], storage_dtype) -> str:
  """The one dtype floating leaves are stored in: `storage_dtype`, else the leaves' common
  floating dtype, else float32 (which holds bfloat16 and float16 values exactly)."""
  if storage_dtype is not None:
    return jnp.dtype(storage_dtype).name
  floats = {x.dtype.name for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
  return floats.pop() if len(floats) == 1 else "float32"


def _encode(x: np.ndarray, storage: str) -> np.ndarray:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  x = x.astype(jnp.dtype(storage))
  return x.view(np.uint16) if storage == "bfloat16" else x


def _decode(x: np.ndarray, storage: str) -> jax.Array:
  if storage == "bfloat16" and x.dtype == np.uint16:
    x = x.view(jnp.bfloat16)
  return jnp.asarray(x)


def _remove_outdated(directory: str) -> None:
  """Removes an earlier format's manifest and orbax `params/` folder from `directory`, so a
  rewritten artifact folder holds one format only."""
  old = [n for n in OUTDATED_MANIFESTS if os.path.isfile(os.path.join(directory, n))]
  for name in old:
    os.remove(os.path.join(directory, name))
  if old and os.path.isdir(os.path.join(directory, "params")):
    shutil.rmtree(os.path.join(directory, "params"))


def save_artifact(directory: str, kind: str, params: Any, *, config: dict,
                  target: Optional[dict] = None, info: Optional[dict] = None,
                  tokenizer: Optional[dict] = None, storage_dtype=None) -> str:
  """Writes an artifact folder (module docstring) and returns its absolute path.

  `params`: nested dict of arrays (layers already stacked); `config`: the kind's config
  dict; `target`: `target_entry(...)` (required for drafters and heads, which only work on
  their target); `info`: free-form, JSON-serializable (other values are written as
  strings); `tokenizer`: GGUF-style tokenizer metadata, written to tokenizer.json;
  `storage_dtype`: the dtype of every stored floating leaf (default: `_storage_dtype`).
  The parameter file is written first and the manifest last, replacing an earlier artifact.
  """
  if kind not in registry.KINDS:
    raise ValueError(f"unknown artifact kind {kind!r}; kinds: {registry.KINDS}")
  if (target is None) == (kind in registry.TARGETED_KINDS):
    raise ValueError(f"a {kind} artifact {'needs' if target is None else 'has no'} a target")
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  _remove_outdated(directory)
  flat = {k: np.asarray(v) for k, v in flatten_dict(jax.device_get(params), sep="/").items()}
  storage = _storage_dtype(list(flat.values()), storage_dtype)
  params_path = os.path.join(directory, PARAMS_FILE)
  save_file({k: _encode(v, storage) for k, v in flat.items()}, params_path + ".tmp")
  os.replace(params_path + ".tmp", params_path)
  manifest = {
      "format": FORMAT, "version": VERSION, "kind": kind, "config": config,
      "params": {"file": PARAMS_FILE, "sha256": sha256_file(params_path),
                 "storage_dtype": storage,
                 "num_params": int(sum(v.size for v in flat.values()))},
      "target": target, "tokenizer": None, "info": info or {}}
  if tokenizer is not None:
    with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
      json.dump(tokenizer, f)
    manifest["tokenizer"] = TOKENIZER_FILE
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1, default=str)
  return directory


# ------------------------------------------------------------------------------ reading


def _recorded_command(directory: str, old_manifest: str) -> str:
  """The training command an outdated manifest recorded, or ''."""
  try:
    with open(os.path.join(directory, old_manifest)) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return ""
  notes = {**(old.get("metadata") or {}), **(old.get("info") or {})}
  return str(notes.get("trained_with") or notes.get("trained_by") or "")


def producing_command(directory: str, kind: str, old_manifest: Optional[str] = None) -> str:
  """The command that (re)produces the artifact in `directory`: its registry entry's, else
  the one its outdated manifest recorded, else the kind's trainer (`PRODUCERS`)."""
  entry = registry.entry_for(directory)
  if entry is not None and entry.command:
    return entry.command
  recorded = _recorded_command(directory, old_manifest) if old_manifest else ""
  return recorded or PRODUCERS[kind]


def _folder(name_or_path: str) -> str:
  path, _, _ = registry.resolve(name_or_path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{name_or_path!r} is a file ({path}), not an artifact folder")
  return os.path.abspath(path)


def holds_artifact(path: str) -> bool:
  """True if the folder holds an artifact manifest, of this format or an outdated one."""
  return any(os.path.isfile(os.path.join(path, n)) for n in (MANIFEST, *OUTDATED_MANIFESTS))


def read_manifest(name_or_path: str, kind: Optional[str] = None) -> tuple[str, dict]:
  """(folder, manifest) of a registered name or an artifact folder, without the weights.

  Raises OutdatedFormatError for a folder of an earlier format, FileNotFoundError when there
  is no manifest, ValueError for another format or (when `kind` is given) another kind.
  """
  path = _folder(name_or_path)
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    old = next((n for n in OUTDATED_MANIFESTS if os.path.isfile(os.path.join(path, n))), None)
    if old is not None:
      old_kind = OUTDATED_MANIFESTS[old]
      raise OutdatedFormatError(
          f"{path} holds a {old_kind} in an outdated format ({old}); this version reads only "
          f"{MANIFEST} + {PARAMS_FILE} folders. Produce it anew with "
          f"`{producing_command(path, old_kind, old)}`.")
    raise FileNotFoundError(f"no {kind or 'artifact'} at {path} (missing {MANIFEST})")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(f"{manifest_path}: not a {FORMAT} version {VERSION} manifest")
  if kind is not None and manifest["kind"] != kind:
    raise ValueError(f"{path} holds a {manifest['kind']} artifact, not a {kind}")
  return path, manifest


def check_target(manifest: dict, what: str, target_sha256: Optional[str] = None,
                 target_config: Any = None, command: str = "") -> None:
  """TargetMismatchError unless the artifact's recorded target has the given sha256 and
  architecture (each checked when given; an artifact without a target passes). `command`,
  the one that trains the artifact anew, goes into the message."""
  target = manifest.get("target")
  if target is None:
    return
  kind = manifest["kind"]
  if target_config is not None:
    given = architecture(target_config)
    saved = target["architecture"]
    if given != saved:
      diff = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
      raise TargetMismatchError(f"{kind} {what!r} was trained for another target architecture "
                                f"(saved, given): {diff}")
  if target_sha256 is not None and target_sha256.lower() != target["sha256"]:
    raise TargetMismatchError(
        f"{kind} {what!r} was trained on a target with sha256 {target['sha256']} "
        f"({target['name']}), but the given target has sha256 {target_sha256.lower()}. It "
        "only works with the exact target it was trained on: load that target or train it "
        f"anew{f' (`{command}`)' if command else ''}.")


def load_artifact(name_or_path: str, kind: str, *, target_sha256: Optional[str] = None,
                  target_config: Any = None) -> tuple[dict, dict]:
  """(manifest, params) of a registered name or an artifact folder of kind `kind`.

  The target check (`check_target`) runs first, then the parameter file's sha256 is checked
  against the manifest (`ChecksumError`). `params` is the stored tree as nested dicts of jax
  arrays in the storage dtype (stacked layers); callers cast and unstack as they need.
  """
  path, manifest = read_manifest(name_or_path, kind)
  command = producing_command(path, kind)
  check_target(manifest, name_or_path, target_sha256, target_config, command)
  stored = manifest["params"]
  params_path = os.path.join(path, stored["file"])
  if not os.path.isfile(params_path):
    raise FileNotFoundError(f"{params_path} is missing (named by {MANIFEST})")
  got = sha256_file(params_path)
  if got != stored["sha256"]:
    raise ChecksumError(
        f"checksum mismatch for {params_path}: the manifest records sha256 {stored['sha256']}, "
        f"the file has {got}. The file is corrupt, truncated or was replaced: produce the "
        f"artifact anew with `{command}`.")
  flat = load_file(params_path)
  params = unflatten_dict({tuple(k.split("/")): _decode(v, stored["storage_dtype"])
                           for k, v in flat.items()})
  return manifest, params


def read_tokenizer(directory: str, manifest: dict) -> Optional[dict]:
  """The tokenizer metadata stored beside a language model, or None."""
  if not manifest.get("tokenizer"):
    return None
  with open(os.path.join(directory, manifest["tokenizer"])) as f:
    return json.load(f)


def registered_sha256(name: str) -> Optional[str]:
  """The checksum that identifies a registered model's weights (what drafters record as
  their target's sha256): a packaged model's pinned sha256, a registered language-model
  folder's params sha256; None for other names."""
  if name in registry.MODELS:
    return registry.MODELS[name].sha256.lower()
  entry = registry.ARTIFACTS.get(name)
  if entry is None or entry.kind != "lm" or not os.path.isdir(entry.path):
    return None
  return read_manifest(name, "lm")[1]["params"]["sha256"]


def artifact_bytes(name_or_path: str) -> int:
  """Total size in bytes of the files of an artifact folder."""
  total = 0
  for root, _, files in os.walk(_folder(name_or_path)):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total

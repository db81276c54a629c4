"""Packed-panel weights and a skinny-matmul CPU kernel for decoding (`jax.ffi`).

A decoding step multiplies 1 to a few dozen rows (one token per sequence, or a speculative
verification block) by every weight matrix once. XLA:CPU runs the 1-row case as a streaming
matrix-vector product, but a 2-16-row product as a general matrix product that repacks the
whole weight matrix on each call, so it costs 3-4x the weight read (BENCHMARKS.md, "Where a
decoding step's time goes"). The kernel in `kernels/packed_matmul.cc` instead reads weights
that were packed once, at load time, into column panels ([K, N] -> [N/16, K, 16]) and streams
each panel once per call with the rows' accumulators in registers (AVX2 + FMA).

Properties the tests check:
* it equals `jnp.dot` to float32 round-off (bfloat16 weights are widened exactly);
* each output element is the in-order sum over k, so a row's result is bitwise the same
  whatever else is in the call, for calls of up to `KERNEL_MAX_ROWS` rows (a decoding step,
  a verification block, a batch of up to 64 sequences); longer calls (a prompt's pass) run
  XLA's general product on the packed weights, which is faster there;
* it works under `jit` and `vmap` (unbatched weights), and refuses differentiation (an
  inference layout: training loads the unpacked one).

The kernel is optional: it is compiled on first use with the system C++ compiler (about 10 s,
cached under `~/.cache/decodax/kernels`, keyed by the source and jaxlib version) and needs an
x86-64 CPU with AVX2 and FMA and JAX's CPU backend. `unavailable_reason()` says why it cannot
run; `load_model(..., matmul_kernel="packed")` and the CLI stop with that reason before
loading weights or compiling anything.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib

Array = jax.Array

PANEL = 16  # output columns per packed panel (two 8-lane AVX2 vectors)
# Calls with more rows (a prompt's pass) run XLA's general matrix product on the packed
# weights (XLA transposes them first); from about 128 rows on that is faster than this kernel
# (measured on SmolLM2's shapes; the kernel wins up to about 48 rows). Either way a prompt's
# pass costs about twice as much as with plain weights (BENCHMARKS.md, step profile).
KERNEL_MAX_ROWS = 64
_SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "packed_matmul.cc")
_TARGETS = {jnp.dtype(jnp.float32): "decodax_packed_matmul_f32",
            jnp.dtype(jnp.bfloat16): "decodax_packed_matmul_bf16"}
_SYMBOLS = {"decodax_packed_matmul_f32": "DecodaxPackedMatmulF32",
            "decodax_packed_matmul_bf16": "DecodaxPackedMatmulBF16"}
_FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w")


def _cpu_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
  """None when the packed kernel can run here, else why not (one sentence)."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return f"the packed matmul kernel needs an x86-64 CPU (this is {platform.machine()})"
  missing = {"avx2", "fma"} - _cpu_flags()
  if missing:
    return f"the packed matmul kernel needs AVX2 and FMA (missing: {', '.join(sorted(missing))})"
  if jax.default_backend() != "cpu":
    return (f"the packed matmul kernel runs on JAX's CPU backend; the default backend is "
            f"{jax.default_backend()!r} (use matmul_kernel='xla' there)")
  if not hasattr(jax, "ffi"):
    return "the packed matmul kernel needs jax.ffi (jax >= 0.4.38)"
  if shutil.which(os.environ.get("CXX", "g++")) is None:
    return ("the packed matmul kernel is compiled on first use and needs a C++ compiler "
            "(g++; `apt-get install g++`) or $CXX")
  return None


def _cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(root, "decodax", "kernels")


def _build() -> str:
  """Path of the compiled kernel library, compiling it when the cache has no copy."""
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(source + " ".join(_FLAGS).encode() + jaxlib.__version__.encode())
  out_dir = _cache_dir()
  lib = os.path.join(out_dir, f"packed_matmul-{key.hexdigest()[:16]}.so")
  if os.path.exists(lib):
    return lib
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [os.environ.get("CXX", "g++"), *_FLAGS, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"compiling the packed matmul kernel failed ({' '.join(cmd)}):\n"
                       f"{proc.stderr[-2000:]}")
  os.replace(tmp, lib)  # atomic: concurrent builders each publish a complete file
  return lib


@functools.lru_cache(maxsize=None)
def ensure_registered() -> None:
  """Compiles (once) and registers the kernel with XLA; a clear error when it cannot run."""
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(reason)
  lib = ctypes.cdll.LoadLibrary(_build())
  for target, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def packable(w_shape: tuple[int, ...]) -> bool:
  """Whether a [..., K, N] weight can be packed (N a multiple of the panel width)."""
  return len(w_shape) >= 2 and w_shape[-1] % PANEL == 0 and w_shape[-1] > 0


def pack(w: Array) -> Array:
  """[..., K, N] -> [..., N/16, K, 16] column panels (leading axes, e.g. stacked layers, kept)."""
  *lead, k, n = w.shape
  if n % PANEL:
    raise ValueError(f"cannot pack a weight with {n} output columns (not a multiple of {PANEL})")
  return jnp.swapaxes(w.reshape(*lead, k, n // PANEL, PANEL), -3, -2)


def unpack(wp: Array) -> Array:
  """Inverse of `pack`: [..., N/16, K, 16] -> [..., K, N]."""
  *lead, p, k, panel = wp.shape
  return jnp.swapaxes(wp, -3, -2).reshape(*lead, k, p * panel)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def packed_matmul(x: Array, wp: Array, every_row: bool = False) -> Array:
  """x [..., K] float32 @ W, with W given packed as wp [N/16, K, 16] (float32 or bfloat16)
  -> [..., N] float32. Inference only.

  The kernel sums each output in k order, row by row, so a row's result does not depend on
  the other rows or their number. `every_row=True` keeps the kernel for calls of more than
  `KERNEL_MAX_ROWS` rows too (the batch-invariant mode), where XLA's product would otherwise
  take over."""
  ensure_registered()
  if wp.ndim != 3 or wp.shape[-1] != PANEL:
    raise ValueError(f"packed weights must have shape [N/{PANEL}, K, {PANEL}], got {wp.shape}")
  if x.shape[-1] != wp.shape[1]:
    raise ValueError(f"activations [..., {x.shape[-1]}] do not match packed weights "
                     f"with K = {wp.shape[1]}")
  target = _TARGETS.get(jnp.dtype(wp.dtype))
  if target is None:
    raise ValueError(f"packed weights must be float32 or bfloat16, got {wp.dtype}")
  if math.prod(x.shape[:-1]) > KERNEL_MAX_ROWS and not every_row:
    y = jnp.einsum("...k,pkj->...pj", x.astype(jnp.float32), wp.astype(jnp.float32))
    return y.reshape(x.shape[:-1] + (wp.shape[0] * PANEL,))
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (wp.shape[0] * PANEL,), jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method="expand_dims")(x.astype(jnp.float32), wp)


@packed_matmul.defjvp
def _packed_matmul_jvp(every_row, primals, tangents):
  raise NotImplementedError(
      "the packed matmul layout is for inference only; load the model with "
      "matmul_kernel='xla' (training does) to differentiate through it")

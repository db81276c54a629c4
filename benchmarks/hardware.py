"""What this machine can do, measured in the same run as the benchmark that cites it.

The floor of a decoding step that reads W bytes of weights and does F floating-point
operations is max(W / read bandwidth, F / matmul peak): a memory-bound step at few rows, a
compute-bound one at many. Both rates are measured here with XLA itself (a large-array sum,
a 1024^3 fp32 matmul), median of several runs. `interleaved` times several configurations
in rounds (A B C A B C ...), so that the machine warming up or a noisy neighbour does not
favour whichever configuration happens to run last.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def machine_name() -> str:
  """The CPU model, and the accelerator JAX computes on when it is not the CPU."""
  cpu = platform.processor() or "unknown CPU"
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  if jax.default_backend() == "cpu":
    return cpu
  return f"{jax.devices()[0].device_kind} ({jax.default_backend()}), host CPU {cpu}"


def _median_seconds(f, *args, runs: int) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(max(runs, 5)):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def measure_bandwidth(runs: int = 5) -> float:
  """Read bandwidth in bytes/s: XLA sum over a 512 MiB fp32 array (median of >= 5 runs)."""
  x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
  return x.nbytes / _median_seconds(jax.jit(lambda a: a.sum()), x, runs=runs)


def measure_matmul_peak(runs: int = 5, n: int = 1024, dtype=jnp.float32) -> float:
  """FLOP/s of one n^3 matmul under XLA (median of >= 5 runs)."""
  a = jnp.ones((n, n), dtype)
  return 2 * n ** 3 / _median_seconds(jax.jit(jnp.dot), a, a, runs=runs)


def step_floor_s(rows: int, weight_bytes: int, matmul_params: int, bandwidth: float,
                 peak: float) -> float:
  """Seconds a step over `rows` tokens needs at least: every weight byte read once, and
  2 * rows * matmul_params FLOPs at the matmul peak (attention, a few % here, left out)."""
  return max(weight_bytes / bandwidth, 2 * rows * matmul_params / peak)


def interleaved(configs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
  """Seconds of each call, timed in `rounds` rounds of one call per configuration, in the
  same order each round (every callable is called once beforehand, untimed, to compile)."""
  for fn in configs.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in configs}
  for _ in range(rounds):
    for name, fn in configs.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return times

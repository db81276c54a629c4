"""Where a generation's wall time went: compiling versus running.

JAX reports the duration of every trace, lowering and backend compile through
`jax.monitoring`; one listener, registered once at import, adds them to whichever
`Stopwatch`es are open. A stopwatch's `decode_s` is then its wall time minus the time spent
compiling, which is what a user comparing two strategies (or a drafter against greedy
decoding) wants to see, on the first call as on later ones.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

import jax

# Trace to jaxpr, jaxpr to MLIR, MLIR to an executable: the three stages of a cache miss.
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})

_open = threading.local()


@dataclasses.dataclass
class Stopwatch:
  """Wall seconds of a block and the part of them JAX spent compiling (this thread only)."""
  wall_s: float = 0.0
  compile_s: float = 0.0
  _start: Optional[float] = None

  def __enter__(self) -> "Stopwatch":
    stack = getattr(_open, "stack", None)
    if stack is None:
      stack = _open.stack = []
    stack.append(self)
    self._start = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    self.wall_s += time.perf_counter() - self._start
    _open.stack.remove(self)

  @property
  def decode_s(self) -> float:
    """Wall time not spent compiling: prefill, decoding and host work."""
    return max(self.wall_s - self.compile_s, 0.0)


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if event in COMPILE_EVENTS:
    for watch in getattr(_open, "stack", ()):
      watch.compile_s += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@dataclasses.dataclass(frozen=True)
class SpeedReport:
  """What a run cost: new tokens (every returned sequence's, EOS included), wall, compile
  and decode seconds, and for speculative strategies tau = verified tokens per target call."""
  new_tokens: int
  wall_s: float
  compile_s: float
  decode_s: float
  tau: Optional[float] = None

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")

  def line(self) -> str:
    text = (f"{self.new_tokens} new tokens in {self.wall_s:.2f} s: compile {self.compile_s:.2f} s,"
            f" decode {self.decode_s:.2f} s ({self.tokens_per_s:.1f} tokens/s)")
    if self.tau is not None:
      text += f"; tau {self.tau:.2f} tokens per target call"
    return text


def speed_report(generations, watch: Stopwatch) -> SpeedReport:
  """The `SpeedReport` of `generations` (`decoding.results.Generation`s) timed by `watch`.
  tau needs the speculative loop's per-row `verified_tokens` and `target_calls` extras;
  the best-of and voting pipelines repeat prompts, so every returned sequence counts."""
  tokens = sum(len(g.output_ids) for g in generations)
  calls = [g.extras.get("target_calls") for g in generations]
  tau = None
  if generations and all(c is not None for c in calls):
    verified = sum(g.extras.get("verified_tokens", 0) for g in generations)
    tau = verified / max(sum(calls), 1)
  return SpeedReport(new_tokens=tokens, wall_s=watch.wall_s, compile_s=watch.compile_s,
                     decode_s=watch.decode_s, tau=tau)

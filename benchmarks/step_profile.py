"""Where a decoding step's time goes, from an XLA profile of the real loops.

  python -m benchmarks.step_profile [--model smollm2-135m-instruct] [--new-tokens 32]
      [--scan-layers 0] [--fused 1] [--packed 0] [--out BENCHMARKS.md] [--marker step_profile]

Runs, warm and under `jax.profiler`, (a) greedy decoding at batch 1, (b) greedy decoding at
batch 16 and (c) prompt-lookup speculative decoding whose every call verifies 11 tokens
(10 drafted + 1), on a copy-heavy prompt. XLA:CPU records one profiler event per executed
operation (thunk), named after its HLO instruction; the optimized HLO of every module is
dumped (`--xla_dump_to`) so each instruction's JAX source path (`metadata op_name`, e.g.
`.../Transformer/layers/attn/q_proj/dot_general`) sorts it into a part of the step:

  prefill          every model operation outside the decoding loop (the prompt's pass)
  weight matmuls   the seven projections of each layer (q, k, v, o, gate, up, down)
  LM head          the output projection (the tied embedding table)
  attention        scores, softmax and values over the cache and the new tokens, RoPE, masks
  KV-cache writes  the scatter of the new keys and values into the cache
  norms, MLP act.  RMSNorm, SiLU * up, residual adds
  weight slices    copies of a layer's weights out of the stacked array (scanned layout)
  other copies     copies XLA inserts (loop-carried buffers, conditionals)
  outside model    token selection, logits processors, per-token records, loop bookkeeping
  not in an op     wall time with no operation running (dispatch, the thunk executor, waits)

Times are per model call (a decoding step, or one verification call), summed over the events
of one warm call; the table is written between the markers in BENCHMARKS.md with the machine.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import tempfile
import time

import jax

from benchmarks.bench_decode import write_table
from benchmarks.hardware import machine_name
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.speculative.prompt_lookup import PromptLookup
from decoding.speculative.strategy import Speculative
from decoding.strategy import Target
from models import registry
from models.lm import load_model

PARTS = ("prefill", "weight matmuls", "LM head", "attention", "KV-cache writes", "norms, MLP act.",
         "weight slices", "other copies", "outside model", "not in an op")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
               "gate_up_proj", "down_proj")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
CONTROL = {"while", "conditional", "call"}


def part_of(opcode: str, op_name: str, out_shape: tuple = (), vocab_size: int = 0) -> str:
  """The part of a step (`PARTS`) an HLO instruction belongs to, from its opcode, the JAX
  source path XLA keeps in its metadata and its output shape. XLA drops the metadata of
  some dots it rewrites; those are model matmuls (nothing else in a step multiplies
  matrices), the LM head when they produce vocabulary-wide rows."""
  path = op_name.split("/")
  prim = path[-1] if path else ""
  outer = op_name.split("Transformer")[0]
  if "Transformer" in op_name and "while/body" not in outer:
    return "prefill"  # a model call outside the decoding loop
  if "jit(forward)" in op_name and "while/body" not in op_name.split("jit(forward)")[0]:
    return "prefill"  # the same call's operations that kept no module path (weight copies)
  if opcode == "dot" and not op_name:
    return "LM head" if out_shape and out_shape[-1] == vocab_size else "weight matmuls"
  if opcode == "copy" or prim == "copy":
    return "other copies"
  if "Transformer" not in op_name:
    return "outside model"
  if any(p in path for p in PROJECTIONS):
    return "weight matmuls"
  if "lm_head" in path or "embed.attend" in path:
    return "LM head"
  if "attn" in path:
    return "KV-cache writes" if prim == "scatter" else "attention"
  # the layer scan indexing its stacked weights (outside any layer's own modules)
  if prim in ("dynamic_slice", "slice") and "while" in path:
    return "weight slices"
  return "norms, MLP act."


_SHAPE = re.compile(r"=\s*\w+\[([\d,]*)\]")


def optimized_dumps(dump_dir: str) -> set:
  return set(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")))


def hlo_parts(paths, vocab_size: int) -> dict:
  """{(module name, instruction name): part} from optimized HLO text dumps (None for control
  flow, whose events contain those of their bodies). Module names repeat across compiles
  (every batch shape of `decode` is a `jit_decode`): pass the dumps of one case only."""
  table = {}
  for path in paths:
    module = None
    for line in open(path):
      if line.startswith("HloModule "):
        module = line.split()[1].rstrip(",")
        continue
      m = _INSTR.match(line)
      if not m or module is None:
        continue
      name, opcode = m.groups()
      op = _OP_NAME.search(line)
      shape = _SHAPE.search(line)
      dims = tuple(int(d) for d in shape.group(1).split(",") if d) if shape else ()
      table[(module, name)] = None if opcode in CONTROL else part_of(
          opcode, op.group(1) if op else "", dims, vocab_size)
  return table


def profile(fn, trace_dir: str, parts: dict) -> tuple[dict, float]:
  """({part: seconds}, wall seconds) of one warm call of `fn` under the profiler."""
  fn()  # warm
  shutil.rmtree(trace_dir, ignore_errors=True)
  jax.profiler.start_trace(trace_dir)
  t = time.perf_counter()
  fn()
  wall = time.perf_counter() - t
  jax.profiler.stop_trace()
  data = jax.profiler.ProfileData.from_file(
      glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[-1])
  totals = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" not in stats:
          continue
        part = parts.get((stats.get("hlo_module"), stats["hlo_op"]), "outside model")
        if part is not None:  # control flow thunks contain their bodies' events
          totals[part] += event.duration_ns * 1e-9
  totals["not in an op"] = max(wall - sum(totals.values()), 0.0)
  return dict(totals), wall


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default=registry.DEFAULT_MODEL)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--scan-layers", type=int, default=0, choices=(0, 1))
  ap.add_argument("--fused", type=int, default=1, choices=(0, 1),
                  help="q/k/v and gate/up as one matmul each")
  ap.add_argument("--packed", type=int, default=0, choices=(0, 1),
                  help="weights packed for the CPU kernel of models.packed_matmul")
  ap.add_argument("--out", default="BENCHMARKS.md")
  ap.add_argument("--marker", default="step_profile")
  args = ap.parse_args(argv)
  if args.new_tokens < 2:
    ap.error("--new-tokens must be >= 2 (a step after the prefill's token)")
  work = tempfile.mkdtemp(prefix="step_profile_")
  dump = os.path.join(work, "hlo")
  # Read when the backend starts (the first computation), so setting it here is in time.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
  model = load_model(args.model, scan_layers=bool(args.scan_layers),
                     fused_projections=bool(args.fused),
                     matmul_kernel="packed" if args.packed else "xla")
  tok = model.tokenizer
  target = Target.of(model)
  n = args.new_tokens
  story = tok.encode_chat([{"role": "user", "content": "Tell me a long story about a dragon."}])
  texts = ["Tell me a story.", "Explain gravity.", "Write a poem about rain.", "List fruits."]
  batch = [tok.encode_chat([{"role": "user", "content": texts[i % 4] + " " * (i // 4)}])
           for i in range(16)]
  # A prompt that asks for a copy of itself: prompt lookup drafts 10 tokens every call.
  passage = ("The quick brown fox jumps over the lazy dog while the farmer watches from the "
             "old wooden gate and the sun sets slowly behind the hills. ")
  copy = tok.encode_chat([{"role": "user", "content": "Repeat exactly: " + passage * 3}])
  greedy = Greedy(max_new_tokens=n, min_new_tokens=n)
  spec = Speculative(drafter=PromptLookup(num_draft_tokens=10), max_new_tokens=n,
                     min_new_tokens=n)
  calls = {}

  def spec_run():
    calls["spec"] = generate(target, [copy], spec, batch_size=1)

  cases = {
      "greedy, batch 1": (lambda: generate(target, [story], greedy, batch_size=1), n),
      "greedy, batch 16": (lambda: generate(target, batch, greedy, batch_size=16), n),
      "prompt lookup, 11-token verification, batch 1": (spec_run, None),
  }
  rows = {}
  for name, (fn, steps) in cases.items():
    before = optimized_dumps(dump)
    fn()  # compiles this case's programs: their dumps are the new files
    parts = hlo_parts(optimized_dumps(dump) - before, model.config.vocab_size)
    totals, wall = profile(fn, os.path.join(work, "trace"), parts)
    if steps is None:
      g = calls["spec"][0]
      steps = int(g.extras["target_calls"])
      name = f"{name} (tau {g.extras['verified_tokens'] / steps:.1f})"
    rows[name] = ({p: 1e3 * totals.get(p, 0.0) / steps for p in PARTS}, 1e3 * wall / steps)
  layout = ("scanned layers" if args.scan_layers else "per-layer weights") + (
      ", fused projections" if args.fused else ", separate projections") + (
      ", packed matmul kernel" if args.packed else "")
  lines = [
      f"Model: {args.model}, {layout}, fp32. Machine: {machine_name()}, {os.cpu_count()} cores, "
      f"jax {jax.__version__}. One warm call per case under `jax.profiler`, {n} new tokens; "
      "milliseconds per model call (a decoding step or one verification call): each part's "
      "total over the call divided by the number of model calls in the loop (the prompt's "
      "pass is its own column). Profiling adds a little to every operation, and operations "
      "on the two cores overlap, so the parts need not add up to the wall time per call.",
      "",
      f"Command: `python -m benchmarks.step_profile --new-tokens {n} --scan-layers "
      f"{args.scan_layers} --fused {args.fused}" + (" --packed 1" if args.packed else "")
      + ("" if args.model == registry.DEFAULT_MODEL
                               else f" --model {args.model}") + "`",
      "",
      "| case | " + " | ".join(PARTS) + " | per call |",
      "|---" * (len(PARTS) + 2) + "|",
  ]
  for name, (ms, wall) in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{ms[p]:.2f}" for p in PARTS) + f" | {wall:.2f} |")
  table = "\n".join(lines)
  print(table)
  write_table(args.out, table, f"{args.marker}_{'scan' if args.scan_layers else 'unrolled'}"
              f"{'_fused' if args.fused else ''}{'_packed' if args.packed else ''}")
  shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()

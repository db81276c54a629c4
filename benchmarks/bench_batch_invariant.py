"""What the batch-invariant mode costs: greedy tokens/s against the default mode.

  python -m benchmarks.bench_batch_invariant [--runs=3] [--new_tokens=32] [--prompts=16]

SmolLM2-135M-Instruct greedy decoding of `--prompts` arithmetic-problem prompts (chat
template), exactly `--new_tokens` new tokens each, at batch 1 (the first prompt) and at batch
`--prompts`, in fp32 and LayerCast, with the XLA and the packed matmul kernels, in the default
and the batch-invariant mode (models/batch_invariant.py). Every configuration of a batch size
is timed interleaved (one run of each per round, `--runs` rounds, median; compiles excluded
by a first untimed run). Tokens/s counts new tokens; prefill time is included, since the
batch-invariant mode also changes how a prompt is read (one token per layer pass). Writes
results/batch_invariant_cost.json and the table between its markers in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax

from benchmarks import hardware
from benchmarks.bench_decode import greedy_call, write_table
from decoding.strategy import Target
from models import packed_matmul
from models.datasets import arithmetic
from models.lm import TransformerLM, load_model

MARKER = "bench_batch_invariant"
MODEL = "smollm2-135m-instruct"


def render(result: dict) -> str:
  a = result["args"]
  lines = [f"SmolLM2-135M-Instruct greedy, {a['new_tokens']} new tokens per prompt (prefill "
           f"included), arithmetic-problem prompts of {result['prompt_tokens']} tokens on "
           f"average; median of {a['runs']} interleaved runs; {result['machine']}.", "",
           "| numerics | kernel | batch | default tok/s | batch-invariant tok/s | ratio |",
           "|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['numerics']} | {r['kernel']} | {r['batch']} | "
                 f"{r['default_tokens_per_s']:.1f} | {r['invariant_tokens_per_s']:.1f} | "
                 f"{r['ratio']:.2f} |")
  lines += ["", f"`{result['command']}`"]
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--numerics", default="fp32,layercast")
  ap.add_argument("--out", default="results/batch_invariant_cost.json")
  ap.add_argument("--bench_md", default="BENCHMARKS.md", help="'' = write no table")
  args = ap.parse_args(argv)
  kernels = ["xla"] + ([] if packed_matmul.unavailable_reason() else ["packed"])
  models = {}  # (numerics, kernel, invariant) -> (lm, params): one set of weights for both modes
  for mode in args.numerics.split(","):
    for kernel in kernels:
      m = load_model(MODEL, numerics=mode, matmul_kernel=kernel)
      models[(mode, kernel, False)] = (m.lm, m.params)
      models[(mode, kernel, True)] = (
          TransformerLM(m.lm.config.replace(batch_invariant=True)), m.params)
  tok = m.tokenizer
  prompts = [tok.encode_chat([{"role": "user", "content": p.prompt}])
             for p in arithmetic.problems(args.prompts, seed=0)]
  rows = []
  for batch in (1, args.prompts):
    ps = prompts[:batch]
    calls = {k: greedy_call(Target(lm, params, eos_ids=(tok.eos_id,), pad_id=tok.pad_id),
                            ps, args.new_tokens) for k, (lm, params) in models.items()}
    times = {k: statistics.median(v) for k, v in hardware.interleaved(calls, args.runs).items()}
    for mode in args.numerics.split(","):
      for kernel in kernels:
        d, i = times[(mode, kernel, False)], times[(mode, kernel, True)]
        n = batch * args.new_tokens
        rows.append(dict(numerics=mode, kernel=kernel, batch=batch,
                         default_tokens_per_s=n / d, invariant_tokens_per_s=n / i, ratio=d / i))
        print(rows[-1], flush=True)
  result = dict(model=MODEL, args=vars(args), machine=hardware.machine_name(), rows=rows,
                prompt_tokens=sum(map(len, prompts)) / len(prompts),
                command="python -m benchmarks.bench_batch_invariant " + " ".join(
                    f"--{k}={v}" for k, v in vars(args).items()
                    if k in ("runs", "new_tokens", "prompts", "numerics")),
                backend=jax.default_backend(),
                time=time.strftime("%Y-%m-%d"))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  if args.bench_md:
    write_table(args.bench_md, render(result), MARKER, "## Batch-invariant mode: cost")
  print(render(result))
  return result


if __name__ == "__main__":
  main()

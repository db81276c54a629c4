"""Compares greedy outputs recorded by the reproducibility study on different machines.

  python -m benchmarks.repro_compare [--tokens=128] [--problems=32] [--out=results/repro_h200.json]

`benchmarks.repro_study` appends each configuration's outputs (token ids and the greedy
token's log-probability at each step) to a `.runs.jsonl` file. This script lines up pairs of
such runs, possibly from different machines (an H200 GPU run against the CPU study), on the
problems both hold and their first `--tokens` output tokens, and reports per pair: how many
problems decode differently, the median index of the first differing token, and how many
problems agree bit for bit in their log-probabilities too. Writes the JSON and the README
table between its markers.
"""
from __future__ import annotations

import argparse
import json
import statistics

from benchmarks import report
from benchmarks.repro_study import first_difference

MARKER = "repro_compare"
CPU = "results/repro_smollm2.runs.jsonl"
H200 = "results/repro_h200.runs.jsonl"
H200_BI = "results/repro_h200_bi.runs.jsonl"
#: (label, (file, configuration), (file, configuration))
PAIRS = (
    ("bf16 on the H200: batch 16 vs batch 1", (H200, "bf16/b16/d1"), (H200, "bf16/b1/d1")),
    ("bf16, batch 1: H200 vs CPU", (H200, "bf16/b1/d1"), (CPU, "bf16/b1/d1")),
    ("fp32, batch 1: H200 vs CPU", (H200, "fp32/b1/d1"), (CPU, "fp32/b1/d1")),
    ("LayerCast, batch 1: H200 vs CPU", (H200, "layercast/b1/d1"), (CPU, "layercast/b1/d1")),
    ("bf16 on the CPU: batch 16 vs batch 1", (CPU, "bf16/b16/d1"), (CPU, "bf16/b1/d1")),
    ("H200, batch 1: LayerCast vs fp32 (bf16-rounded weights: another model)",
     (H200, "layercast/b1/d1"), (H200, "fp32/b1/d1")),
    ("CPU, batch 1: LayerCast vs fp32", (CPU, "layercast/b1/d1"), (CPU, "fp32/b1/d1")),
    ("fp32 on the H200, batch 1: batch-invariant vs default mode", (H200_BI, "fp32+bi/b1/d1"),
     (H200, "fp32/b1/d1")),
)


def load_run(path: str, key: str) -> dict:
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        if r["key"] == key:
          return r
  raise KeyError(f"{path} holds no configuration {key!r}")


def compare(a: dict, b: dict, tokens: int, problems: int) -> dict:
  """The first `problems` problems (at most those both runs hold), compared on their first
  `tokens` output tokens."""
  n = min(len(a["outputs"]), len(b["outputs"]), problems)
  firsts, bitwise = [], 0
  for p in range(n):
    x, y = a["outputs"][p][:tokens], b["outputs"][p][:tokens]
    d = first_difference(x, y)
    if d >= 0:
      firsts.append(d)
    elif a["top1_logprobs"][p][:tokens] == b["top1_logprobs"][p][:tokens]:
      bitwise += 1
  return dict(problems=n, differ=len(firsts),
              median_first_difference=statistics.median(firsts) if firsts else None,
              bitwise_logprobs=bitwise)


def render(result: dict) -> str:
  lines = [f"SmolLM2-135M-Instruct greedy on the first {result['problems']} arithmetic problems, "
           f"first {result['args']['tokens']} output tokens compared.", "",
           "| pair | problems differing | median first differing token | problems with "
           "bitwise-equal log-probs |", "|---|---|---|---|"]
  for r in result["rows"]:
    med = "-" if r["median_first_difference"] is None else f"{r['median_first_difference']:g}"
    lines.append(f"| {r['pair']} | {r['differ']} / {r['problems']} | {med} | "
                 f"{r['bitwise_logprobs']} / {r['problems']} |")
  lines += ["", f"`{result['command']}`; the runs: {', '.join(result['files'])}."]
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=128)
  ap.add_argument("--problems", type=int, default=32, help="the GPU run decoded 32")
  ap.add_argument("--out", default="results/repro_h200.json")
  ap.add_argument("--readme", default="README.md", help="'' = write no table")
  args = ap.parse_args(argv)
  rows = []
  for label, (fa, ka), (fb, kb) in PAIRS:
    rows.append(dict(pair=label, a=f"{fa}:{ka}", b=f"{fb}:{kb}",
                     **compare(load_run(fa, ka), load_run(fb, kb), args.tokens, args.problems)))
  result = dict(args=vars(args), rows=rows, problems=min(r["problems"] for r in rows),
                files=sorted({f for _, (fa, _), (fb, _) in PAIRS for f in (fa, fb)}),
                command="python -m benchmarks.repro_compare" + (
                    f" --tokens {args.tokens}" if args.tokens != 128 else "") + (
                    f" --problems {args.problems}" if args.problems != 32 else ""))
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

"""Greedy decoding throughput against Hugging Face transformers and the memory roofline.

  python -m benchmarks.bench_decode [--runs 3] [--new-tokens 64] [--skip-hf] [--out BENCHMARKS.md]
      [--model smollm2-135m-instruct] [--batch 16]

Measured in one run, on the same weights (by default SmolLM2-135M-Instruct GGUF, dequantized;
`--model` takes any registered name, e.g. qwen2.5-coder-1.5b-instruct once installed):
  * our greedy tokens/s at batch 1 and batch --batch (median of --runs warm runs), with the
    layers stacked under a scan (the default layout) and with per-layer weights;
  * the first call (trace + compile + run) of the batch-1 loop;
  * Hugging Face transformers `generate` (greedy, fp32, batch 1) tokens/s;
  * the memory-bandwidth roofline: measured read bandwidth / bytes of weights read per token.
The table is written into BENCHMARKS.md between markers (`bench_decode`, or
`bench_decode_<model>` for another model), with the machine and the command.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.strategy import Target
from models import registry, transformer
from models.lm import TransformerLM, load_model

DEFAULT = registry.DEFAULT_MODEL


def cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def measure_bandwidth(runs: int) -> float:
  """Read bandwidth in bytes/s: XLA sum over a 512 MiB fp32 array (median of runs)."""
  x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
  f = jax.jit(lambda a: a.sum())
  f(x).block_until_ready()
  times = []
  for _ in range(max(runs, 5)):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return x.nbytes / statistics.median(times)


def weight_bytes(params) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(params))


def time_ours(model, prompts, n_new: int, runs: int):
  settings = Greedy(max_new_tokens=n_new, min_new_tokens=n_new)
  target = Target(model.lm, model.params, eos_ids=(model.tokenizer.eos_id,),
                  pad_id=model.tokenizer.pad_id)
  t = time.perf_counter()
  generate(target, prompts, settings, batch_size=len(prompts))
  first = time.perf_counter() - t
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    out = generate(target, prompts, settings, batch_size=len(prompts))
    times.append(time.perf_counter() - t)
  assert all(len(o.output_ids) == n_new for o in out)
  med = statistics.median(times)
  return first, med, len(prompts) * n_new / med


def load_hf(name: str = "smollm2-135m-instruct"):
  """Hugging Face transformers on the same GGUF weights (registry model `name`), fp32, eval."""
  import torch  # torch and transformers: test extras, only for the Hugging Face baseline
  import transformers
  path, _, _ = registry.resolve(name)
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32).eval()


def time_hf(prompt, n_new: int, runs: int, hf=None, **generate_kwargs) -> float:
  """New tokens/s of HF `generate` on one prompt (greedy unless `generate_kwargs` say
  otherwise, e.g. num_beams=4), median of `runs` after one warm-up call."""
  import torch
  hf = hf if hf is not None else load_hf()
  ids = torch.tensor([prompt])
  kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=2,
            pad_token_id=2, attention_mask=torch.ones_like(ids))
  kw.update(generate_kwargs)
  with torch.no_grad():
    hf.generate(ids, **kw)
    times = []
    for _ in range(runs):
      t = time.perf_counter()
      hf.generate(ids, **kw)
      times.append(time.perf_counter() - t)
  return n_new / statistics.median(times)


def write_table(path: str, table: str, marker: str = "bench_decode", heading: str = "") -> None:
  """Replaces the text between `<!-- {marker}:start/end -->` in `path` (appends the block,
  under `heading` if given, when the markers are absent)."""
  start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  block = f"{start}\n{table}\n{end}"
  if start in text:
    text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
  with open(path, "w") as f:
    f.write(text)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--param-dtype", default="float32")
  ap.add_argument("--out", default="BENCHMARKS.md")
  ap.add_argument("--model", default=DEFAULT)
  ap.add_argument("--batch", type=int, default=16, help="the larger batch size measured")
  args = ap.parse_args()
  if args.batch < 2 or args.runs < 1 or args.new_tokens < 1:
    ap.error("--batch must be >= 2, --runs and --new-tokens >= 1")

  model = load_model(args.model, param_dtype=args.param_dtype)
  tok = model.tokenizer
  base = tok.encode_chat([{"role": "user", "content": "Tell me a long story about a dragon."}])
  texts = ["Tell me a story.", "Explain gravity.", "Write a poem about rain.", "List fruits.",
           "What is 7 * 8?", "Describe Paris.", "How do plants grow?", "Name five rivers."]
  batch16 = [tok.encode_chat([{"role": "user", "content": texts[i % 8] + " " * (i // 8)}])
             for i in range(args.batch)]
  bw = measure_bandwidth(args.runs)
  wb = weight_bytes(model.params)
  roofline = bw / wb

  # Hugging Face first, and its model freed before the per-layer copy of our weights is
  # made: a 1.5B-parameter model in fp32 would not fit three times in memory.
  hf_tps = None if args.skip_hf else time_hf(
      base, args.new_tokens, args.runs, load_hf(args.model), eos_token_id=tok.eos_id,
      pad_token_id=tok.pad_id)
  gc.collect()
  unrolled_cfg = model.config.replace(scan_layers=False)
  layouts = {
      "scan_layers=True (default)": (model.lm, model.params),
      "scan_layers=False": (TransformerLM(unrolled_cfg),
                            transformer.unstack_layers(model.params, unrolled_cfg.num_layers)),
  }
  rows, notes = [], []
  for name, (lm, params) in layouts.items():
    m = dataclasses.replace(model, lm=lm, params=params)
    first1, med1, tps1 = time_ours(m, [base], args.new_tokens, args.runs)
    _, _, tps16 = time_ours(m, batch16, args.new_tokens, args.runs)
    rows.append((f"decodax greedy, batch 1, {name}", f"{tps1:.1f}", f"{100 * tps1 / roofline:.0f}%"))
    rows.append((f"decodax greedy, batch {args.batch} (total), {name}", f"{tps16:.1f}", "n/a"))
    notes.append(f"- {name}: batch {args.batch} / batch 1 throughput {tps16 / tps1:.1f}x; first call at "
                 f"batch 1 (trace + compile + {args.new_tokens} tokens) {first1:.1f} s, warm call "
                 f"{med1:.2f} s")
    if name.startswith("scan_layers=False"):
      best1 = tps1
  rows.append(("Hugging Face transformers greedy, batch 1",
               "not run" if hf_tps is None else f"{hf_tps:.1f}",
               "n/a" if hf_tps is None else f"{100 * hf_tps / roofline:.0f}%"))
  rows.append(("memory roofline, batch 1", f"{roofline:.1f}", "100%"))
  machine = f"{cpu_name()}, {os.cpu_count()} cores, backend {jax.default_backend()}"
  lines = [
      f"Model: {args.model}. Machine: {machine}. jax {jax.__version__}. Weights {args.param_dtype} "
      f"({wb / 1e6:.0f} MB read per token), compute float32. Median of {args.runs} warm runs, "
      f"{args.new_tokens} new tokens per row (min_new_tokens = max_new_tokens), prompt "
      f"{len(base)} tokens. Measured read bandwidth {bw / 1e9:.1f} GB/s.",
      "",
      f"Command: `python -m benchmarks.bench_decode --runs {args.runs} --new-tokens "
      f"{args.new_tokens}{' --skip-hf' if args.skip_hf else ''}"
      f"{'' if args.param_dtype == 'float32' else ' --param-dtype ' + args.param_dtype}"
      f"{'' if args.model == DEFAULT else ' --model ' + args.model}"
      f"{'' if args.batch == 16 else f' --batch {args.batch}'}`",
      "",
      "| system | tokens/s | of roofline |",
      "|---|---|---|",
  ] + [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""] + notes
  if hf_tps is not None:
    lines.append(f"- decodax (scan_layers=False) / Hugging Face at batch 1: {best1 / hf_tps:.1f}x")
  table = "\n".join(lines)
  print(table)
  write_table(args.out, table, "bench_decode" if args.model == DEFAULT
              else f"bench_decode_{args.model}")


if __name__ == "__main__":
  main()

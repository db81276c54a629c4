"""Training throughput on SmolLM2-135M: full fine-tuning and LoRA, against PyTorch and the
compute roofline.

  python -m benchmarks.bench_train [--runs 5] [--batch 4] [--seq-len 256] [--skip-hf]
                                   [--out BENCHMARKS.md]

Measured in one run, on the same weights (SmolLM2-135M-Instruct GGUF, dequantized, fp32):
  * our jitted train step (next-token loss, AdamW, grad clipping), tokens/s = batch x
    seq_len / step time, median of --runs warm steps, for full fine-tuning and for LoRA
    (rank 8 on every attention and MLP projection, base frozen), with layers scanned (the
    default) and unrolled; the first step (trace + compile + run) is reported separately;
  * Hugging Face transformers (PyTorch CPU) forward + backward + AdamW step on the same
    weights and batch, full fine-tuning;
  * the compute roofline: a training step costs about 6 x params x tokens FLOPs (plus
    attention); the machine's fp32 matmul rate is measured with a large XLA dot.
The table is written into BENCHMARKS.md between markers, with the machine and the command.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.bench_decode import write_table
from benchmarks.hardware import machine_name
from models import registry
from models.lm import load_model
from train import data, lora, losses, optim, trainer


def measure_matmul_flops(runs: int = 5) -> float:
  """fp32 matmul FLOP/s of XLA on this machine (2048^3 dot, median of runs)."""
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times)


def step_flops(config, n_params: int, tokens: int, seq_len: int) -> float:
  """6 N T for the weights plus 6 x 2 x L x T x S x D for attention scores and values
  (forward 1x, backward 2x), N counting the tied embedding once for the head."""
  attn = 12 * config.num_layers * tokens * seq_len * config.num_heads * config.head_dim
  return 6 * n_params * tokens + attn


def time_ours(model, batch: int, seq_len: int, runs: int, use_lora: bool):
  cfg = model.config
  rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch * (runs + 1), seq_len))
  source = data.ArrayData({"tokens": rows.astype(np.int32)}, batch, shuffle=False)
  opt = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-5, grad_clip=1.0))
  if use_lora:
    trainable = lora.init(model.params, jax.random.key(1), rank=8)
    tr = trainer.Trainer(losses.next_token_loss(cfg), optim.make_optimizer(opt, 100),
                         assemble=lambda a, base: lora.merge(base, a, 16.0, 8))
    frozen = model.params
  else:
    trainable, frozen = model.params, None
    tr = trainer.Trainer(losses.next_token_loss(cfg), optim.make_optimizer(opt, 100))
  state = tr.init_state(trainable, jax.random.key(0))
  t = time.perf_counter()
  state, m = tr.train_step(state, frozen, source.batch(0))
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  times = []
  for i in range(1, runs + 1):
    t = time.perf_counter()
    state, m = tr.train_step(state, frozen, source.batch(i))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return statistics.median(times), first, lora.num_params(trainable)


def time_hf(batch: int, seq_len: int, runs: int) -> float:
  import torch  # torch and transformers: test extras, only for the PyTorch baseline
  import transformers
  torch.set_num_threads(os.cpu_count() or 1)
  path, _, _ = registry.resolve("smollm2-135m-instruct")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
  ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
  times = []
  for i in range(runs + 1):
    t = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i:
      times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--out", default="BENCHMARKS.md")
  args = ap.parse_args()
  model = load_model(scan_layers=True, fused_projections=False)  # the training layout
  tokens = args.batch * args.seq_len
  n_params = sum(x.size for x in jax.tree.leaves(model.params))
  flops = step_flops(model.config, n_params, tokens, args.seq_len)
  peak = measure_matmul_flops()
  rows = []
  unrolled = load_model(scan_layers=False, fused_projections=False)
  for name, m, use_lora in (
      ("decodax full fine-tuning (scanned layers, default)", model, False),
      ("decodax full fine-tuning (`scan_layers=False`)", unrolled, False),
      ("decodax LoRA r=8, all projections (scanned)", model, True),
      ("decodax LoRA r=8, all projections (`scan_layers=False`)", unrolled, True)):
    step, first, n_train = time_ours(m, args.batch, args.seq_len, args.runs, use_lora)
    rows.append((name, tokens / step, step, first, n_train))
    print(name, f"{tokens / step:.1f} tok/s, step {step:.2f} s, first {first:.1f} s", flush=True)
  if not args.skip_hf:
    step = time_hf(args.batch, args.seq_len, args.runs)
    rows.append(("HF transformers (PyTorch) full fine-tuning", tokens / step, step, None, n_params))
    print("hf", f"{tokens / step:.1f} tok/s", flush=True)
  roof = peak / flops * tokens
  del unrolled
  lines = [
      f"Machine: {machine_name()}, {os.cpu_count()} cores, backend {jax.default_backend()}. "
      f"jax {jax.__version__}. SmolLM2-135M-Instruct, fp32 weights and compute, batch "
      f"{args.batch} x {args.seq_len} tokens, AdamW + global-norm clipping, median of "
      f"{args.runs} warm steps. Measured XLA fp32 matmul rate {peak / 1e9:.1f} GFLOP/s; a step "
      f"costs about {flops / 1e12:.2f} TFLOP (6 x {n_params / 1e6:.1f}M params x tokens + "
      f"attention), so the compute roofline is {roof:.1f} tokens/s for full fine-tuning "
      "(LoRA skips the weight gradients' optimizer update but still back-propagates "
      "through every layer, about 2/3 of the full cost).",
      "",
      f"Command: `python -m benchmarks.bench_train --runs {args.runs} --batch {args.batch} "
      f"--seq-len {args.seq_len}`",
      "",
      "| system | trainable params | tokens/s | step (s) | first step (s) | of roofline |",
      "|---|---|---|---|---|---|",
  ]
  for name, tps, step, first, n_train in rows:
    lines.append(f"| {name} | {n_train / 1e6:.2f}M | {tps:.1f} | {step:.2f} | "
                 f"{'' if first is None else f'{first:.1f}'} | {tps / roof:.0%} |")
  write_table(args.out, "\n".join(lines), marker="bench_train",
              heading="## Training throughput (issue 3)")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

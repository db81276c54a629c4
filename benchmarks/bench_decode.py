"""Greedy decoding speed against the hardware floor, llama.cpp and Hugging Face, in one run.

  python -m benchmarks.bench_decode [--runs 5] [--new-tokens 64] [--skip-hf] [--skip-llama-cpp]
      [--model smollm2-135m-instruct] [--batch 16] [--out BENCHMARKS.md]

Measured in one process, on the same weights (by default SmolLM2-135M-Instruct's GGUF,
dequantized to float32):

* the machine: read bandwidth (a 512 MiB sum) and fp32 matmul peak (a 1024^3 dot) under XLA;
* per row count R in 1, 5, 11, 16 (a batch-1 step, a 5- and an 11-token verification call,
  a batch-16 step): the step floor max(weight bytes / bandwidth, 2 R matmul-params / peak),
  the model's weight matmuls alone (every projection and the LM head, chained as the model
  runs them, nothing else), and the model call itself (a cached forward pass inside a jitted
  loop, as decoding runs it), in both layer layouts;
* end-to-end greedy tokens/s (prefill included, fixed length) at batch 1 and `--batch`, in
  both layer layouts, with bf16 projection weights computed in fp32 (LayerCast) and in pure bf16; Hugging
  Face transformers (fp32); llama.cpp (`llama-cpp-python`, optional) on F32 and BF16 copies of
  the same weights (`benchmarks.llama_cpp_anchor`).

Every timing is a median of `--runs` (>= 5 by default) taken in interleaved rounds (each round
times every configuration once, `benchmarks.hardware.interleaved`), so machine warm-up and
noise do not favour the configuration that runs last. The tables are written into BENCHMARKS.md
between markers (`bench_decode`, or `bench_decode_<model>` for another model), with the machine
and the command.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks import hardware, llama_cpp_anchor
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.strategy import Target
from models import numerics, packed_matmul, registry, transformer
from models.lm import TransformerLM, load_model

DEFAULT = registry.DEFAULT_MODEL
ROWS = ((1, 1), (1, 5), (1, 11), (16, 1))  # (batch, tokens per row) of the timed model calls
PROJECTIONS = (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def weight_bytes(params) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(params))


def matmul_params(config) -> int:
  """Parameters that take part in a step's matmuls (projections and the LM head)."""
  d, hd, i = config.hidden_size, config.head_dim, config.intermediate_size
  per_layer = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * i
  return config.num_layers * per_layer + d * config.vocab_size


def per_layer_weights(params, config) -> tuple[list, jax.Array]:
  """([one tuple of projection kernels per layer], LM-head matrix [D, V]) of either layout."""
  if config.scan_layers:
    params = transformer.unstack_layers(params, config.num_layers)
  layers = [tuple(params[f"layers_{i}"][a][b]["kernel"] for a, b in PROJECTIONS)
            for i in range(config.num_layers)]
  head = (params["embed"]["table"] if config.tie_word_embeddings
          else params["lm_head"]["kernel"])
  return layers, head


@functools.partial(jax.jit, static_argnames="dot")
def weight_matmuls(layers, head, x, dot=jnp.dot):
  """The step's weight matmuls alone, in the model's order and shapes ([R, D] rows in):
  q, k, v, o, gate, up, down per layer, then the LM head; cheap elementwise glue keeps each
  product's input dependent on the previous one, so nothing is skipped or reordered. `dot`
  multiplies rows by one weight (`packed_matmul.packed_matmul` for packed weights)."""
  h = x
  for wq, wk, wv, wo, wg, wu, wd in layers:
    q, k, v = dot(h, wq), dot(h, wk), dot(h, wv)
    h = h + 1e-3 * dot(q, wo) + 1e-3 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))
    h = h + 1e-3 * dot(jax.nn.silu(dot(h, wg)) * dot(h, wu), wd)
  return dot(h, head)


packed_weight_matmuls = functools.partial(weight_matmuls, dot=packed_matmul.packed_matmul)


def model_call(lm, iters: int):
  """A jitted function running `iters` cached forward passes of [B, S] tokens, each at the
  same cache position (the cache is updated in place and rolled back, as a speculative
  verification does), feeding the argmax back in: seconds per call = time / iters."""
  @jax.jit
  def run(params, cache, tokens):
    start = cache.lengths

    def body(_, carry):
      cache, tokens = carry
      S = tokens.shape[1]
      positions = start[:, None] + jnp.arange(S)[None]
      out = lm(params, tokens, positions, cache)
      return out.cache.rollback(start), jnp.argmax(out.logits, -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, iters, body, (cache, tokens))[1]
  return run


def greedy_call(target, prompts, n_new: int):
  settings = Greedy(max_new_tokens=n_new, min_new_tokens=n_new)
  return lambda: generate(target, prompts, settings, batch_size=len(prompts))


def load_hf(name: str = "smollm2-135m-instruct"):
  """Hugging Face transformers on the same GGUF weights (registry model `name`), fp32, eval."""
  import torch  # torch and transformers: test extras, only for the Hugging Face baseline
  import transformers
  path, _, _ = registry.resolve(name)
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32).eval()


def hf_call(hf, prompt, n_new: int, **generate_kwargs):
  """A callable running HF `generate` on one prompt for exactly n_new tokens (greedy unless
  `generate_kwargs` say otherwise, e.g. num_beams=4)."""
  import torch  # test extra, only for the Hugging Face baseline
  ids = torch.tensor([prompt])
  kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=2,
            pad_token_id=2, attention_mask=torch.ones_like(ids))
  kw.update(generate_kwargs)

  def call():
    with torch.no_grad():
      return hf.generate(ids, **kw)
  return call


def time_hf(prompt, n_new: int, runs: int, hf=None, **generate_kwargs) -> float:
  """New tokens/s of HF `generate` on one prompt, median of `runs` after one warm-up call."""
  call = hf_call(hf if hf is not None else load_hf(), prompt, n_new, **generate_kwargs)
  call()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    call()
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




def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--skip-llama-cpp", action="store_true")
  ap.add_argument("--out", default="BENCHMARKS.md")
  ap.add_argument("--model", default=DEFAULT)
  ap.add_argument("--batch", type=int, default=16, help="the larger batch size measured")
  ap.add_argument("--step-iters", type=int, default=8, help="model calls per timed loop")
  args = ap.parse_args(argv)
  if args.batch < 2 or args.runs < 1 or args.new_tokens < 1 or args.step_iters < 1:
    ap.error("--batch must be >= 2, --runs, --new-tokens and --step-iters >= 1")

  # float32 storage and compute; the stacked, separate-projection layout is the one every
  # other layout is derived from
  model = load_model(args.model, scan_layers=True, fused_projections=False)
  tok, cfg = model.tokenizer, model.config
  base = tok.encode_chat([{"role": "user", "content": "Tell me a long story about a dragon."}])
  texts = ["Tell me a story.", "Explain gravity.", "Write a poem about rain.", "List fruits.",
           "What is 7 * 8?", "Describe Paris.", "How do plants grow?", "Name five rivers."]
  batch = [tok.encode_chat([{"role": "user", "content": texts[i % 8] + " " * (i // 8)}])
           for i in range(args.batch)]
  bandwidth = hardware.measure_bandwidth(args.runs)
  peak = hardware.measure_matmul_peak(args.runs)
  wbytes, mparams = weight_bytes(model.params), matmul_params(cfg)

  # Hugging Face first, timed alone and freed before more copies of the weights are made (a
  # 1.5B model in fp32 would not fit several times in memory); its configuration is re-timed
  # at the end, so a drift of the machine shows.
  hf_tps = None
  if not args.skip_hf:
    hf = load_hf(args.model)
    hf_tps = time_hf(base, args.new_tokens, args.runs, hf, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    del hf
    gc.collect()

  unrolled_cfg = cfg.replace(scan_layers=False)
  unrolled = (TransformerLM(unrolled_cfg), transformer.unstack_layers(model.params, cfg.num_layers))
  fused_cfg = unrolled_cfg.replace(fused_projections=True)
  fused = (TransformerLM(fused_cfg), transformer.fuse_projections(unrolled[1]))
  layouts = {"scanned": (model.lm, model.params), "per-layer": unrolled,
             "per-layer fused (default)": fused}
  kernel_note = packed_matmul.unavailable_reason()
  if kernel_note is None:
    packed_cfg = fused_cfg.replace(matmul_kernel="packed")
    layouts["per-layer fused packed"] = (TransformerLM(packed_cfg),
                                         transformer.pack_params(fused[1]))

  # -- model calls and their floors, per row count
  layers, head = per_layer_weights(model.params, cfg)
  if kernel_note is None:
    packed_layers = [[packed_matmul.pack(w) for w in layer] for layer in layers]
    packed_head = packed_matmul.pack(head)
  calls = {}
  for b, s in ROWS:
    rows = b * s
    x = jnp.ones((rows, cfg.hidden_size), jnp.float32) * 0.01
    calls[f"matmuls {rows}"] = (lambda x=x: weight_matmuls(layers, head, x))
    if kernel_note is None:
      calls[f"packed matmuls {rows}"] = (lambda x=x: packed_weight_matmuls(
          packed_layers, packed_head, x))
    for name, (lm, params) in layouts.items():
      fn = model_call(lm, args.step_iters)
      cache = lm.init_cache(b, 128).with_lengths(jnp.full((b,), 60, jnp.int32))
      tokens = jnp.ones((b, s), jnp.int32)
      calls[f"{name} {rows}"] = (lambda fn=fn, p=params, c=cache, t=tokens: fn(p, c, t))
  step_times = {k: statistics.median(v) for k, v in hardware.interleaved(calls, args.runs).items()}

  # -- end-to-end greedy decoding
  target = lambda lm, params: Target(lm, params, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)
  e2e, first_call = {}, {}
  for name, (lm, params) in layouts.items():
    for prompts, label in (([base], "batch 1"), (batch, f"batch {args.batch}")):
      call = greedy_call(target(lm, params), prompts, args.new_tokens)
      t = time.perf_counter()
      call()
      first_call[f"{name}, {label}"] = time.perf_counter() - t
      e2e[f"decodax fp32, {name}, {label}"] = (call, len(prompts))
  def recast(cfg, params, mode):  # the fp32 weights in another precision recipe
    r = numerics.recipe(mode)
    return (TransformerLM(cfg.replace(**r)),
            numerics.cast_params(params, r["param_dtype"], r["proj_dtype"]))

  for mode, label in (("layercast", "LayerCast (bf16 projections, fp32 compute)"),
                      ("bf16", "bf16 weights and compute")):
    e2e[f"decodax {label}, per-layer fused, batch 1"] = (
        greedy_call(target(*recast(fused_cfg, fused[1], mode)), [base], args.new_tokens), 1)
  if kernel_note is None:
    lm, params = recast(packed_cfg, layouts["per-layer fused packed"][1], "layercast")
    e2e["decodax LayerCast (bf16 projections, fp32 compute), per-layer fused packed, "
        "batch 1"] = (greedy_call(target(lm, params), [base], args.new_tokens), 1)
  llama_note = ""
  if not args.skip_llama_cpp:
    try:
      weights_dir = os.path.join(tempfile.gettempdir(), "decodax_llama_cpp")
      for dtype_name in ("F32", "BF16"):
        llm = llama_cpp_anchor.load(llama_cpp_anchor.dense_copy(args.model, dtype_name,
                                                                weights_dir))
        e2e[f"llama.cpp {dtype_name}, batch 1"] = (
            (lambda llm=llm: llama_cpp_anchor.greedy_tokens(llm, base, args.new_tokens)), 1)
    except ImportError:
      llama_note = "llama.cpp not run: `pip install llama-cpp-python` to include it."
  timed = hardware.interleaved({k: fn for k, (fn, _) in e2e.items()}, args.runs)
  tps = {k: e2e[k][1] * args.new_tokens / statistics.median(v) for k, v in timed.items()}

  # -- tables
  floor_b1 = hardware.step_floor_s(1, wbytes, mparams, bandwidth, peak)
  lcpp = tps.get("llama.cpp F32, batch 1")
  lines = [
      f"Model: {args.model}. Machine: {hardware.machine_name()}, {os.cpu_count()} cores, backend "
      f"{jax.default_backend()}, jax {jax.__version__}. Weights {wbytes / 1e6:.0f} MB in fp32 "
      f"({mparams / 1e6:.1f} M matmul parameters). Measured in this run: read bandwidth "
      f"{bandwidth / 1e9:.1f} GB/s, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s. Median of "
      f"{args.runs} interleaved rounds.",
      "",
      f"Command: `python -m benchmarks.bench_decode --runs {args.runs} --new-tokens "
      f"{args.new_tokens}{' --skip-hf' if args.skip_hf else ''}"
      f"{' --skip-llama-cpp' if args.skip_llama_cpp else ''}"
      f"{'' if args.model == DEFAULT else ' --model ' + args.model}"
      f"{'' if args.batch == 16 else f' --batch {args.batch}'}`",
      "",
      "Model calls (ms per call; the cache holds 60 tokens; x = ratio to the floor):",
      "",
      "| rows (batch x tokens) | floor | weight matmuls alone | "
      + ("packed matmuls alone | " if kernel_note is None else "")
      + " | ".join(layouts) + " |",
      "|---" * (3 + (kernel_note is None) + len(layouts)) + "|",
  ]
  for b, s in ROWS:
    rows = b * s
    floor = hardware.step_floor_s(rows, wbytes, mparams, bandwidth, peak)
    cell = lambda sec: f"{1e3 * sec:.1f} ({sec / floor:.1f}x)"
    per_call = lambda name: step_times[f"{name} {rows}"] / args.step_iters
    packed_cell = ("" if kernel_note is not None
                   else f" | {cell(step_times[f'packed matmuls {rows}'])}")
    lines.append(f"| {rows} ({b} x {s}) | {1e3 * floor:.1f} | {cell(step_times[f'matmuls {rows}'])}"
                 f"{packed_cell} | " + " | ".join(cell(per_call(name)) for name in layouts) + " |")
  step = lambda name, rows: step_times[f"{name} {rows}"] / args.step_iters
  lines += [""] + [
      f"- {name}: an 11-token verification call costs {step(name, 11) / step(name, 1):.1f} batch-1 "
      f"steps; batch 16 gives {16 * step(name, 1) / step(name, 16):.1f}x the batch-1 throughput "
      "(model calls alone)." for name in layouts]
  lines += ["", "End-to-end greedy decoding (tokens/s, prefill included, "
            f"{args.new_tokens} new tokens per row, prompt {len(base)} tokens):", "",
            "| system | tokens/s | of the batch-1 floor | of llama.cpp F32 |", "|---|---|---|---|"]
  for name, value in tps.items():
    is_b1 = name.endswith("batch 1")
    lines.append(f"| {name} | {value:.1f} | "
                 f"{f'{value * floor_b1:.2f}' if is_b1 else 'n/a'} | "
                 f"{f'{value / lcpp:.2f}' if (lcpp and is_b1) else 'n/a'} |")
  lines.append(f"| Hugging Face transformers fp32, batch 1 (timed alone, before the rest) | "
               + ("not run | n/a | n/a |" if hf_tps is None else
                  f"{hf_tps:.1f} | {hf_tps * floor_b1:.2f} | "
                  f"{f'{hf_tps / lcpp:.2f}' if lcpp else 'n/a'} |"))
  lines.append(f"| batch-1 floor | {1 / floor_b1:.1f} | 1.00 | "
               f"{f'{1 / floor_b1 / lcpp:.2f}' if lcpp else 'n/a'} |")
  lines += [""] + [f"- first call (trace + compile + {args.new_tokens} tokens), {k}: {v:.1f} s"
                   for k, v in first_call.items()]
  if llama_note:
    lines.append(f"- {llama_note}")
  if kernel_note is not None:
    lines.append(f"- packed layout not run: {kernel_note}")
  table = "\n".join(lines)
  print(table)
  write_table(args.out, table, "bench_decode" if args.model == DEFAULT
              else f"bench_decode_{args.model}")


if __name__ == "__main__":
  main()

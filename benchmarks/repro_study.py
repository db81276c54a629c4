"""Reproducibility of greedy decoding across batch size, device count and numerics.

  python -m benchmarks.repro_study [--problems=128] [--max_new_tokens=256]
      [--numerics=bf16,fp32,layercast] [--batch_sizes=1,4,16] [--devices=1,2,4,8]
      [--batch_invariant=0]

The experiment of "Give Me FP32 or Give Me Death? Challenges and Solutions for Reproducible
Reasoning" (Yuan et al., 2025) at our scale: SmolLM2-135M-Instruct decodes the project's
arithmetic word problems (models/datasets/arithmetic.py) greedily in each precision recipe
(models/numerics.py) under every batch size x device count. Devices form a model-parallel
mesh (1 x d simulated CPU devices): splitting o_proj and down_proj over d devices changes
the order in which their partial sums are added, the analogue of the paper's GPU count.
With --batch_invariant=1 the model runs in the batch-invariant mode (models/batch_invariant.py,
column-only sharding), where every configuration must give the same tokens.

Per recipe, against the reference configuration (batch 1, one device):
  * Std@Acc: standard deviation of the accuracy over configurations;
  * Avg_Std@Output_Length: per problem, the standard deviation of the output length over
    configurations, averaged over problems;
  * Div_Index: for each (problem, configuration) whose output differs from the reference,
    the first token index where it does; mean and median;
  * Avg_Std@top1_prob: per problem, at each position of the prefix every configuration shares,
    the standard deviation over configurations of the top-1 probability (the greedy token's),
    averaged over positions, then over problems;
  * the share of problems whose output differs from the reference, per configuration and in
    any configuration;
  * the top-1 / top-2 logit gap of the reference at each first divergence, next to the gap at
    every position of the reference outputs (teacher-forced, batch 1, one device);
  * parameter bytes per parameter.
Every configuration's outputs are appended to <out>.runs.jsonl as soon as it finishes, and a
rerun skips the configurations already there (the study takes hours on two CPU cores). Within
a configuration, each chunk of 16 prompts is saved under --rows_dir as it finishes, and a
rerun resumes from them. Writes
<out>.json, a PNG of the divergence rates and the README table between its markers.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the simulated devices must exist before JAX starts
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.hardware import machine_name  # noqa: E402
from decoding.answers import last_number  # noqa: E402
from decoding.greedy import Greedy  # noqa: E402
from decoding.runner import generate  # noqa: E402
from decoding.strategy import Target  # noqa: E402
from models import numerics as numerics_lib  # noqa: E402
from models import sharding  # noqa: E402
from models.datasets import arithmetic  # noqa: E402
from models.lm import load_model  # noqa: E402

MARKER = "repro_study"
MODEL = "smollm2-135m-instruct"
CHUNK = 16


def config_key(mode: str, batch: int, devices: int, invariant: bool) -> str:
  return f"{mode}{'+bi' if invariant else ''}/b{batch}/d{devices}"


def chunk_size(batch: int) -> int:
  """Prompts per saved chunk: the multiple of `batch` nearest above CHUNK, so that chunks
  hold whole batches and the batches are those of one call over every prompt."""
  return batch * -(-CHUNK // batch)


def parts_path(rows_dir: str, key: str) -> str:
  return os.path.join(rows_dir, key.replace("/", "_") + ".jsonl")


def run_config(model, prompts, mode, batch, devices, invariant, max_new, eos, pad,
               parts: Optional[str] = None) -> dict:
  """Greedy outputs of every prompt in one configuration.

  The prompts run in chunks of whole batches. Every chunk is padded to the shapes of the
  whole list (`prompt_slots`), so its outputs are those of one call over all prompts. With
  `parts`, each chunk is appended to that JSONL file as it finishes, and a rerun decodes only
  the chunks not there (a batch-1 configuration on 8 simulated devices takes hours); the
  file is removed once the configuration is whole. `seconds` sums the chunks' decoding
  times.
  """
  lm, params, shard = model.lm, model.params, None
  if devices > 1:
    mesh = sharding.make_mesh(1, devices)
    params = sharding.shard_params(model.params, mesh, column_only=invariant)
    lm = dataclasses.replace(model.lm, mesh=mesh)
    shard = lambda a: sharding.shard_batch(a, mesh)
  key = config_key(mode, batch, devices, invariant)
  stamp = dict(key=key, prompts=len(prompts), max_new_tokens=max_new)
  done = {}
  if parts and os.path.exists(parts):
    with open(parts) as f:
      for line in f:
        if line.strip():
          part = json.loads(line)
          if part["stamp"] != stamp:
            raise SystemExit(f"{parts} holds chunks of another run ({part['stamp']}, this is "
                             f"{stamp}): delete it to start this configuration over")
          done[part["start"]] = part
  target = Target(lm, params, eos_ids=eos, pad_id=pad)
  longest = max(len(p) for p in prompts)
  n = chunk_size(batch)
  for start in range(0, len(prompts), n):
    if start in done:
      continue
    t = time.time()
    out = generate(target, prompts[start:start + n], Greedy(max_new_tokens=max_new),
                   batch_size=batch, shard=shard, prompt_slots=longest,
                   row_ids=range(start, min(start + n, len(prompts))))
    done[start] = dict(stamp=stamp, start=start, seconds=time.time() - t,
                       outputs=[g.output_ids for g in out],
                       top1_logprobs=[[float(x) for x in g.token_logprobs] for g in out])
    if parts:
      os.makedirs(os.path.dirname(parts) or ".", exist_ok=True)
      with open(parts, "a") as f:
        f.write(json.dumps(done[start]) + "\n")
  chunks = [done[s] for s in sorted(done)]
  row = dict(key=key, mode=mode, batch=batch, devices=devices, batch_invariant=invariant,
             seconds=sum(c["seconds"] for c in chunks),
             outputs=[o for c in chunks for o in c["outputs"]],
             top1_logprobs=[x for c in chunks for x in c["top1_logprobs"]])
  return row


def logit_gaps(model, prompt: list[int], output: list[int]) -> np.ndarray:
  """Top-1 minus top-2 logit at each output position, teacher-forced (batch 1, one device)."""
  seq = prompt + output
  T = 1 << (len(seq) - 1).bit_length()
  toks = jnp.asarray([seq + [0] * (T - len(seq))])
  logits = model.lm(model.params, toks, jnp.arange(T)[None], model.lm.init_cache(1, T)).logits
  top2 = jax.lax.top_k(logits[0, len(prompt) - 1:len(seq) - 1], 2)[0]
  return np.asarray(top2[:, 0] - top2[:, 1])


def first_difference(a: list[int], b: list[int]) -> int:
  """First index where two token lists differ (len of the shorter if one extends the other);
  -1 when equal."""
  if a == b:
    return -1
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


def analyse(mode_runs: list[dict], ref: dict, correct: list[list[bool]], gaps: list) -> dict:
  """The study's metrics for one recipe's configurations (`ref` among them)."""
  P = len(ref["outputs"])
  acc = [float(np.mean(c)) for c in correct]
  lengths = np.array([[len(o) for o in r["outputs"]] for r in mode_runs])  # [C, P]
  div, differ_any, per_config, div_gaps = [], np.zeros(P, bool), {}, []
  for r in mode_runs:
    d = [first_difference(ref["outputs"][p], r["outputs"][p]) for p in range(P)]
    per_config[r["key"]] = float(np.mean([x >= 0 for x in d]))
    for p, x in enumerate(d):
      if x >= 0:
        div.append(x)
        differ_any[p] = True
        if x < len(gaps[p]):
          div_gaps.append(float(gaps[p][x]))
  stds = []
  for p in range(P):  # the prefix every configuration shares with the reference
    ends = [len(ref["outputs"][p])] + [
        d for d in (first_difference(ref["outputs"][p], r["outputs"][p]) for r in mode_runs)
        if d >= 0]
    shared = min(ends)
    if shared:
      probs = np.exp(np.array([r["top1_logprobs"][p][:shared] for r in mode_runs]))
      stds.append(float(probs.std(axis=0).mean()))
  all_gaps = np.concatenate([g for g in gaps if len(g)]) if gaps else np.zeros(0)
  return dict(
      configurations=len(mode_runs), accuracy=dict(zip([r["key"] for r in mode_runs], acc)),
      std_acc=float(np.std(acc)), avg_std_output_length=float(lengths.std(axis=0).mean()),
      div_index_mean=float(np.mean(div)) if div else None,
      div_index_median=float(np.median(div)) if div else None,
      avg_std_top1_prob=float(np.mean(stds)) if stds else 0.0,
      share_differing_any=float(differ_any.mean()), share_differing=per_config,
      gap_at_divergence=dict(n=len(div_gaps), median=float(np.median(div_gaps)) if div_gaps
                             else None, values=div_gaps),
      gap_all_positions=dict(n=int(all_gaps.size), median=float(np.median(all_gaps))
                             if all_gaps.size else None,
                             share_below_0_1=float(np.mean(all_gaps < 0.1)) if all_gaps.size
                             else None))


def render(result: dict) -> str:
  a = result["args"]
  lines = [f"SmolLM2-135M-Instruct, greedy, {a['problems']} arithmetic word problems, up to "
           f"{a['max_new_tokens']} new tokens; configurations: batch {a['batch_sizes']} x "
           f"model-parallel devices {a['devices']} (simulated CPU devices); reference: batch 1 "
           f"on one device. {result['machine']}.", "",
           "| recipe | bytes/param | configs | accuracy (ref) | Std@Acc | Avg_Std@Output_Length "
           "| Div_Index mean / median | Avg_Std@top1_prob | problems differing (any config) "
           "| median top-1/top-2 logit gap at divergence / at all positions |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for mode, m in result["recipes"].items():
    s = m["metrics"]
    dv = ("-" if s["div_index_mean"] is None
          else f"{s['div_index_mean']:.1f} / {s['div_index_median']:.0f}")
    gd = s["gap_at_divergence"]["median"]
    ga = s["gap_all_positions"]["median"]
    gap = f"{'-' if gd is None else f'{gd:.3f}'} / {'-' if ga is None else f'{ga:.2f}'}"
    lines.append(f"| {mode} | {m['bytes_per_param']:.2f} | {s['configurations']} | "
                 f"{m['reference_accuracy']:.3f} | {s['std_acc']:.4f} | "
                 f"{s['avg_std_output_length']:.2f} | {dv} | {s['avg_std_top1_prob']:.2e} | "
                 f"{s['share_differing_any']:.3f} | {gap} |")
  lines += ["", f"`{result['command']}`; per-configuration outputs in "
            f"`{os.path.basename(a['out'])[:-5]}.runs.jsonl`, plot `{result['plot']}`."]
  if not result["complete"]:
    lines.append(f"Incomplete: {result['missing']} configurations not run yet "
                 f"({', '.join(result.get('missing_configs', []))}).")
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  modes = list(result["recipes"])
  keys = sorted({k.split("/", 1)[1] for m in modes
                 for k in result["recipes"][m]["metrics"]["share_differing"]})
  width = 0.8 / max(1, len(modes))
  for i, mode in enumerate(modes):
    share = result["recipes"][mode]["metrics"]["share_differing"]
    vals = [share.get(f"{mode}/{k}", np.nan) for k in keys]
    ax.bar(np.arange(len(keys)) + i * width, vals, width, label=mode)
  ax.set_xticks(np.arange(len(keys)) + width * (len(modes) - 1) / 2, keys, rotation=45)
  ax.set_ylabel("share of problems whose output differs\nfrom batch 1 on one device")
  ax.set_title("SmolLM2-135M greedy: divergence by precision recipe")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--problems", type=int, default=128)
  ap.add_argument("--max_new_tokens", type=int, default=256)
  ap.add_argument("--numerics", default="bf16,fp32,layercast")
  ap.add_argument("--batch_sizes", default="1,4,16")
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--batch_invariant", type=int, default=0, choices=(0, 1))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max_hours", type=float, default=0.0,
                  help="start no new configuration after this long (0: run them all); the "
                       "report then covers the configurations done, and a rerun goes on")
  ap.add_argument("--no_run", action="store_true",
                  help="start no configuration: write the report (and --readme table) from the "
                       "outputs already in <out>.runs.jsonl")
  ap.add_argument("--rows_dir", default="results/rows/repro_smollm2",
                  help="folder of the chunks of unfinished configurations (a rerun resumes them)")
  report.add_output_args(ap, "results/repro_smollm2.json")
  args = ap.parse_args(argv)
  done = report.render_only(args, render, MARKER)
  if done is not None:
    return done
  modes = args.numerics.split(",")
  for m in modes:
    numerics_lib.recipe(m)  # an unknown name stops here
  batches = [int(b) for b in args.batch_sizes.split(",")]
  devices = [int(d) for d in args.devices.split(",")]
  if 1 not in batches or 1 not in devices:
    ap.error("the reference configuration is batch 1 on one device: include both")
  if max(devices) > len(jax.devices()):
    ap.error(f"--devices needs {max(devices)} devices, {len(jax.devices())} exist (run as "
             "python -m benchmarks.repro_study, which simulates them)")
  invariant = bool(args.batch_invariant)
  runs_path = args.out[:-5] + ".runs.jsonl"
  os.makedirs(os.path.dirname(runs_path) or ".", exist_ok=True)
  done_runs = {}
  if os.path.exists(runs_path):
    with open(runs_path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          done_runs[r["key"]] = r
  probs = arithmetic.problems(args.problems, seed=args.seed)
  t0 = time.time()
  models, prompts = {}, {}

  def model_of(mode):  # loaded once, kept: the configurations interleave the recipes
    if mode not in models:
      models[mode] = load_model(MODEL, numerics=mode, batch_invariant=invariant)
      tok = models[mode].tokenizer
      prompts[mode] = [tok.encode_chat([{"role": "user", "content": p.prompt}]) for p in probs]
    return models[mode]

  # Cheapest configurations first (large batches, on every mesh), every recipe at each, so a
  # study stopped early (--max_hours) still compares the recipes on the same configurations
  # and covers every mesh before the slow batch-1 runs.
  order = [(d, b) for b in sorted(batches, reverse=True) for d in sorted(devices)]
  order = [(1, 1)] + [c for c in order if c != (1, 1)]
  for d, b in order:
    for mode in modes:
      key = config_key(mode, b, d, invariant)
      if key in done_runs:
        continue
      if args.no_run or (args.max_hours and time.time() - t0 > args.max_hours * 3600):
        break
      model = model_of(mode)
      tok = model.tokenizer
      parts = parts_path(args.rows_dir, key)
      r = run_config(model, prompts[mode], mode, b, d, invariant, args.max_new_tokens,
                     (tok.eos_id,), tok.pad_id, parts)
      with open(runs_path, "a") as f:
        f.write(json.dumps(r) + "\n")
      os.remove(parts)
      done_runs[key] = r
      print(f"{key}: {r['seconds']:.0f} s ({time.time() - t0:.0f} s total)", flush=True)
  recipes = {}
  for mode in modes:
    if config_key(mode, 1, 1, invariant) not in done_runs:
      continue
    model, tok = model_of(mode), models[mode].tokenizer
    mode_runs = [done_runs[k] for k in (config_key(mode, b, d, invariant)
                                        for d in devices for b in batches) if k in done_runs]
    ref = done_runs[config_key(mode, 1, 1, invariant)]
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)
    correct = [[arithmetic.is_correct(last_number(text(o)), p) for o, p in zip(r["outputs"], probs)]
               for r in mode_runs]
    gaps = [logit_gaps(model, pr, out) if out else np.zeros(0)
            for pr, out in zip(prompts[mode], ref["outputs"])]
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    recipes[mode + ("+bi" if invariant else "")] = dict(
        bytes_per_param=numerics_lib.param_bytes(model.params)["total"] / n_params,
        reference_accuracy=float(np.mean(correct[mode_runs.index(ref)])),
        metrics=analyse(mode_runs, ref, correct, gaps))
    models.pop(mode)
  total = len(modes) * len(batches) * len(devices)
  have = sum(config_key(m, b, d, invariant) in done_runs for m in modes for b in batches
             for d in devices)
  plot_path = args.out[:-5] + ".png"
  result = dict(model=MODEL, args=vars(args), machine=machine_name(), recipes=recipes,
                complete=have == total, missing=total - have, plot=plot_path,
                missing_configs=[config_key(m, b, d, invariant) for d in devices
                                 for b in batches for m in modes
                                 if config_key(m, b, d, invariant) not in done_runs],
                seconds=time.time() - t0,
                command=" ".join(["python -m benchmarks.repro_study"] + list(
                    sys.argv[1:] if argv is None else argv)))
  plot(result, plot_path)
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

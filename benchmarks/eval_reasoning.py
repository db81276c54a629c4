"""Answer selection on arithmetic word problems with SmolLM2-135M-Instruct.

  python -m benchmarks.eval_reasoning [--problems=64] [--max_samples=16]

Greedy decoding versus best-of-N selection (majority vote, self-certainty, Borda,
likelihood) and self-agreement at N = 1, 4, 8, 16, on problems the project generates
(models/datasets/arithmetic.py, fixed seed), plus the AUROC of G-NLL and self-certainty as
predictors of a greedy answer's correctness. The N samples per problem are drawn once;
the first N of them are exactly what `BestOfN(num_samples=N)` draws (a
sample's key depends on its index only), so every N reuses them. Every generation run goes
through the evaluation harness (`decoding.eval_runner`): its JSONL results go to --work_dir
(a rerun of the command resumes them), it runs data parallel over --mesh_data devices and,
under `jax.distributed` (--coordinator), over several processes. Writes
results/reasoning_smollm2.json and the table between the markers in README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from decoding import best_of_n, eval_runner, scoring
from decoding.answers import last_number
from decoding.eval_runner import Row
from decoding.greedy import Greedy
from decoding.results import Generation
from decoding.runner import generate
from decoding.sampling import Sample
from decoding.self_agreement import SelfAgreement, self_agreement
from decoding.strategy import Resources, Target
from models.datasets import arithmetic
from models.lm import load_model

MARKER = "reasoning"


def render(result: dict) -> str:
  """The README table of a result dict (as written to the JSON file)."""
  md = [f"SmolLM2-135M-Instruct (fp32), {result['problems']} generated arithmetic word problems "
        f"(`models/datasets/arithmetic.py`, seed {result['seed']}), sampling at T = {result['temperature']}, "
        f"up to {result['max_new_tokens']} new tokens, answers = last number in the response. "
        f"Greedy accuracy **{result['greedy_accuracy']:.3f}**; a single sample is right "
        f"{result['sample_accuracy']:.3f} of the time.", "",
        "| N | majority vote | self-certainty best-of-N | Borda (p = 0.5) | likelihood best-of-N "
        "| self-agreement |", "|---|---|---|---|---|---|"]
  for n, row in result['by_n'].items():
    md.append(f"| {n} | {row['majority']:.3f} | {row['self_certainty']:.3f} | "
              f"{row['borda']:.3f} | {row['likelihood']:.3f} | {row['self_agreement']:.3f} |")
  md += ["", "| correctness predictor | AUROC |", "|---|---|"]
  md += [f"| {k} | {v:.3f} |" for k, v in result['auroc'].items()]
  md += ["", f"`{result['command']}` ({result['seconds'] / 60:.0f} min on {result['machine']})."]
  return "\n".join(md)


def agreement_batches(settings: SelfAgreement, target, groups, n: int, extract, shard,
                      resources, *, seed: int, batch_size: int) -> eval_runner.BatchFn:
  """The harness's batch function of self-agreement over already sampled paths: rows
  (problem ids) -> the greedy agreement response built from each problem's first n samples."""
  def run(ids, prompts):
    def stage(p, stage_settings, **kw):
      return generate(target, p, stage_settings, **{
          **dict(seed=seed, batch_size=batch_size, row_ids=ids, shard=shard,
                 resources=resources), **kw})
    finals = self_agreement(settings, target, prompts, stage, extract=extract,
                            paths=[groups[i][:n] for i in ids])
    return [{"outputs": [g.to_json()]} for g in finals]
  return run


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--problems", type=int, default=64)
  ap.add_argument("--max_samples", type=int, default=16)
  ap.add_argument("--sizes", default="1,4,8,16")
  ap.add_argument("--max_new_tokens", type=int, default=96)
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=16)
  args, mesh, done = report.parse_and_start(ap, argv, out="results/reasoning_smollm2.json",
                                            work_dir="runs/eval_reasoning", render=render, marker=MARKER)
  if done is not None:
    return done
  model = load_model("smollm2-135m-instruct")
  tok = model.tokenizer
  probs = arithmetic.problems(args.problems, seed=args.seed)
  prompts = [tok.encode_chat([{"role": "user", "content": p.prompt}]) for p in probs]
  rows = [Row(i, ids, {"prompt": p.prompt, "answer": p.answer})
          for i, (ids, p) in enumerate(zip(prompts, probs))]
  extract = last_number
  target = Target(model.lm, model.params, eos_ids=(2,), pad_id=2, tokenizer=tok)
  target, shard = eval_runner.place(target, *mesh)
  resources = Resources()
  run = dict(seed=args.seed, batch_size=args.batch_size, mesh=mesh, resources=resources)
  path = lambda name: os.path.join(args.work_dir, f"{name}.jsonl")
  t0 = time.time()

  greedy = [Generation.from_json(r["outputs"][0]) for r in eval_runner.evaluate(
      target, rows, Greedy(max_new_tokens=args.max_new_tokens), path("greedy"), **run)]
  text = lambda g: tok.decode(g.output_ids, skip_special_tokens=True)
  greedy_ok = [arithmetic.is_correct(extract(text(g)), p) for g, p in zip(greedy, probs)]
  print(f"greedy done ({time.time() - t0:.0f}s): accuracy {np.mean(greedy_ok):.3f}", flush=True)

  sampled = eval_runner.evaluate(target, rows, Sample(
      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      num_return_sequences=args.max_samples), path(f"samples_{args.max_samples}"), **run)
  groups = [[Generation.from_json(o) for o in r["outputs"]] for r in sampled]
  answers = [[extract(text(c)) for c in cands] for cands in groups]
  sample_ok = [[arithmetic.is_correct(a, p) for a in ans] for ans, p in zip(answers, probs)]
  print(f"sampling done ({time.time() - t0:.0f}s): per-sample accuracy "
        f"{np.mean(sample_ok):.3f}", flush=True)

  sizes = [int(s) for s in args.sizes.split(",") if int(s) <= args.max_samples]
  table = {}
  for n in sizes:
    row = {}
    for rule in ("majority", "self_certainty", "borda", "likelihood"):
      ok = []
      for cands, ans, p in zip(groups, answers, probs):
        idx, _ = best_of_n.select(cands[:n], rule, ans[:n], borda_power=0.5)
        ok.append(arithmetic.is_correct(ans[idx], p))
      row[rule] = float(np.mean(ok))
    settings = SelfAgreement(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             num_paths=n, agreement_max_new_tokens=64)
    agree = agreement_batches(settings, target, groups, n, extract, shard, resources,
                              seed=args.seed, batch_size=args.batch_size)
    finals = [Generation.from_json(r["outputs"][0]) for r in eval_runner.run_rows(
        rows, agree, path(f"self_agreement_{n}"), batch_size=args.batch_size,
        data_parallel=mesh[0], desc=f"self-agreement N={n}",
        signature={"strategy": "self_agreement", "settings": settings.to_flat(),
                   "paths": f"the first {n} of samples_{args.max_samples}.jsonl",
                   "seed": args.seed})]
    row["self_agreement"] = float(np.mean([arithmetic.is_correct(g.extras["answer"], p)
                                           for g, p in zip(finals, probs)]))
    table[n] = row
    print(f"N={n} ({time.time() - t0:.0f}s): {row}", flush=True)

  flat_ok = np.concatenate([np.asarray(s) for s in sample_ok])
  aurocs = {
      "greedy: -G-NLL": scoring.auroc([-g.gnll for g in greedy], greedy_ok),
      "greedy: self-certainty": scoring.auroc([g.self_certainty for g in greedy], greedy_ok),
      "samples: -NLL": scoring.auroc([-c.nll for cs in groups for c in cs], flat_ok),
      "samples: self-certainty": scoring.auroc([c.self_certainty for cs in groups for c in cs],
                                               flat_ok),
  }
  result = dict(model="smollm2-135m-instruct", problems=args.problems, seed=args.seed,
                max_samples=args.max_samples, temperature=args.temperature,
                max_new_tokens=args.max_new_tokens, greedy_accuracy=float(np.mean(greedy_ok)),
                sample_accuracy=float(np.mean(flat_ok)), by_n=table, auroc=aurocs,
                seconds=time.time() - t0, machine=machine_name(),
                command=" ".join(["python -m benchmarks.eval_reasoning"] + list(
                    sys.argv[1:] if argv is None else argv)))
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

"""Open-ended continuation of real prose: repetition, diversity and likelihood per strategy.

  python -m benchmarks.eval_open_ended [--prompts=16] [--new_tokens=64]

Prompts are the first `prompt_tokens` tokens of the opening paragraph of chapters from the
`test` split of the Jane Austen corpus (models/datasets/text_corpus.py); superposed
decoding's n-gram tables are built from the `train` split, so no prompt text is in them.
Every strategy continues every prompt by exactly `new_tokens` tokens (no EOS) from its
config in configs/ (greedy, nucleus sampling with p = 0.95, beam, diverse beam, momentum,
superposed; beam-type strategies contribute their best sequence). Metrics on token ids:
rep-n (mean over outputs of 1 - distinct n-grams / n-grams, in %), corpus distinct-n,
and the mean per-token log-likelihood of the outputs under the model (teacher-forced,
`decoding.scoring`). The generation runs go through the evaluation harness
(`decoding.eval_runner`): one JSONL file per strategy in --work_dir (a rerun of the command
resumes them), data parallel over --mesh_data devices and, under `jax.distributed`
(--coordinator), over several processes. Writes results/open_ended_smollm2.json and the
README table.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from decoding import eval_runner, scoring
from decoding.beam_search import Beam, DiverseBeam
from decoding.eval_runner import Row
from decoding.greedy import Greedy
from decoding.momentum import Momentum
from decoding.sampling import Sample
from decoding.strategy import Resources, Target
from decoding.superposed import Superposed
from models.datasets import corpus_texts
from models.lm import load_model
from train import evaluation

MARKER = "open_ended"


def strategy_settings(new_tokens: int) -> dict:
  """name -> settings: each strategy's defaults with the shared length, one output per prompt."""
  n = dict(max_new_tokens=new_tokens)
  return {"greedy": Greedy(**n), "top-p (0.95)": Sample(top_p=0.95, **n), "beam": Beam(**n),
          "diverse beam": DiverseBeam(num_return_sequences=1, **n), "momentum": Momentum(**n),
          "superposed": Superposed(num_return_sequences=1, **n)}


def chapter_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
  """First `length` tokens of the first paragraph of >= 200 characters of n test chapters."""
  prompts = []
  for text in corpus_texts("test"):
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 200]
    if not paras:
      continue
    ids = tokenizer.encode(" ".join(paras[0].split()))
    if len(ids) >= length:
      prompts.append(ids[:length])
    if len(prompts) == n:
      break
  return prompts


def file_name(strategy: str) -> str:
  """The harness file stem of a strategy's row name ("top-p (0.95)" -> "top-p_0.95")."""
  return "_".join("".join(ch if ch.isalnum() or ch in ".-" else " " for ch in strategy).split())


def render(result: dict) -> str:
  md = [f"SmolLM2-135M-Instruct (fp32, no chat template), {result['prompts']} prompts of "
        f"{result['prompt_tokens']} tokens from held-out Jane Austen chapters, "
        f"{result['new_tokens']} new tokens each. rep-n in % (lower = less repetition), "
        "distinct-n over all outputs, mean log-likelihood per token under the model.", "",
        "| strategy | rep-2 | rep-3 | rep-4 | distinct-2 | distinct-3 | distinct-4 | "
        "mean log p |", "|---|---|---|---|---|---|---|---|"]
  for name, m in result["metrics"].items():
    md.append(f"| {name} | {m['rep-2']:.1f} | {m['rep-3']:.1f} | {m['rep-4']:.1f} | "
              f"{m['distinct-2']:.3f} | {m['distinct-3']:.3f} | {m['distinct-4']:.3f} | "
              f"{m['mean_logp']:.3f} |")
  md += ["", f"`python -m benchmarks.eval_open_ended` ({result['seconds'] / 60:.0f} min on "
         f"{result['machine']})."]
  return "\n".join(md)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--prompt_tokens", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--only", default="", help="comma-separated strategy names (default: all)")
  ap.add_argument("--batch_size", type=int, default=8)
  args, mesh, done = report.parse_and_start(ap, argv, out="results/open_ended_smollm2.json",
                                            work_dir="runs/eval_open_ended", render=render, marker=MARKER)
  if done is not None:
    return done
  model = load_model("smollm2-135m-instruct")
  prompts = chapter_prompts(model.tokenizer, args.prompts, args.prompt_tokens)
  rows = [Row(i, p) for i, p in enumerate(prompts)]
  t0 = time.time()
  metrics, samples = {}, {}
  target = Target(model.lm, model.params, eos_ids=(), pad_id=2, tokenizer=model.tokenizer)
  target, _ = eval_runner.place(target, *mesh)
  resources = Resources()
  for name, settings in strategy_settings(args.new_tokens).items():
    if args.only and name not in args.only.split(","):
      continue
    ts = time.time()
    records = eval_runner.evaluate(
        target, rows, settings, os.path.join(args.work_dir, f"{file_name(name)}.jsonl"),
        seed=args.seed, batch_size=args.batch_size, mesh=mesh, resources=resources, desc=name)
    outs = [next(o["output_ids"] for o in r["outputs"] if o["rank"] == 0) for r in records]
    scored = scoring.score_continuations(model.lm, model.params, prompts, outs)
    metrics[name] = {f"rep-{n}": 100 * evaluation.ngram_repetition(outs, n) for n in (2, 3, 4)}
    metrics[name].update({f"distinct-{n}": evaluation.distinct_n(outs, n) for n in (2, 3, 4)})
    metrics[name]["mean_logp"] = float(np.mean(np.concatenate([s.token_logprobs
                                                               for s in scored])))
    metrics[name]["seconds"] = time.time() - ts
    samples[name] = model.tokenizer.decode(outs[0])
    print(f"{name} ({time.time() - ts:.0f}s): {metrics[name]}", flush=True)
  result = dict(model="smollm2-135m-instruct", prompts=len(prompts),
                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, seed=args.seed,
                metrics=metrics, first_prompt=model.tokenizer.decode(prompts[0]),
                samples=samples, seconds=time.time() - t0, machine=machine_name())
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

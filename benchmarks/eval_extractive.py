"""Greedy decoding versus exact-extract on generated extractive QA.

  python -m benchmarks.eval_extractive [--passages=120] [--shots=0,4,16] \
      [--models=smollm2-135m-instruct,OTHER] [--limit=0]

After "How Optimal is Greedy Decoding for Extractive Question Answering?" (Castel, Ram, Efrat,
Levy; AKBC 2022): both decoders get the same prompt, `Text: <passage> Question: <question>
Answer:` after k in-context examples (`decoding.exact_extract.build_query`; each example's
answer ends with the model's EOS). Greedy decodes up to 20 tokens (transformers' default, as
in the paper's baseline), stops at EOS and keeps its first line; exact-extract returns the
passage span of lowest NLL (`decoding.exact_extract`; spans of any length unless
--max_span_tokens). Questions come from
`models/datasets/extractive_qa.py` (invented people, distractors of the same type, paraphrased
questions; --passages passages of 3 questions, seed --seed); the in-context examples from
passages drawn with another seed, the same k for every question. Reported: SQuAD EM and F1
of each decoder at each k, the share of greedy answers that are passage substrings, and a
paired comparison over questions (McNemar's exact test on exact match).

Cost: exact-extract runs one pass of up to L tokens per start position, at most n passes
per question of n passage tokens (n is about 100 here; L is the passage's rest, or
--max_span_tokens), each attending to the whole prompt; its exact pruning skips the starts
whose first token alone is less likely than the 5th best span found (the table's "starts
scored"). With k > 0 the k examples open every prompt, so both decoders prefill them once
per batch (`share_prefix`). On two CPU cores, SmolLM2 at k = 4 with --max_span_tokens=16
took about 1.3 s per question for greedy and 6 s for exact-extract scoring every start (2.8 s
with pruning); --limit cuts a run down.

Generation goes through the evaluation harness (`decoding.eval_runner`): greedy through
`evaluate`, exact-extract (whose inputs are passages and questions, not token ids) through
`run_rows` with its own batch function; the JSONL files go to --work_dir and a rerun resumes
them. Writes results/extractive_qa.json and the README table between
`<!-- extractive_qa:start -->` and `<!-- extractive_qa:end -->`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from benchmarks.significance import mcnemar_exact
from decoding import eval_runner
from decoding.eval_runner import Row
from decoding.exact_extract import ExactExtract, build_query
from decoding.greedy import Greedy
from decoding.results import Generation
from decoding.runner import generate
from decoding.strategy import Resources, Target
from models.datasets import extractive_qa as qa
from models.lm import load_model

MARKER = "extractive_qa"
DEMO_SEED_OFFSET = 1000  # in-context examples come from passages of seed + this


def demonstrations(k: int, seed: int) -> list[dict]:
  """k in-context examples, one question from each of k passages not in the test set."""
  pool = qa.examples(max(k, 1), seed=seed + DEMO_SEED_OFFSET, questions_per_passage=1)
  return [e.demonstration() for e in pool[:k]]


def greedy_answer(text: str) -> str:
  """Greedy's answer: its text up to the first line break (it may go on with a new example)."""
  return text.strip().split("\n")[0].strip()


def exact_matches(predictions: list[str], examples: list[qa.Example]) -> np.ndarray:
  """bool [questions]: SQuAD exact match of each prediction."""
  return np.array([bool(qa.exact_match(p, e.answer)) for p, e in zip(predictions, examples)])


def scores(predictions: list[str], examples: list[qa.Example]) -> dict:
  pairs = list(zip(predictions, examples))
  return {"em": float(np.mean(exact_matches(predictions, examples))),
          "f1": float(np.mean([qa.f1(p, e.answer) for p, e in pairs]))}


def run_model(name: str, examples: list[qa.Example], shots: list[int], args, mesh) -> dict:
  model = load_model(name)
  tok = model.tokenizer
  target = Target.of(model)
  if not target.eos_ids:
    raise SystemExit(f"{name}: the tokenizer has no EOS id, which exact-extract scores as the stop")
  target, _ = eval_runner.place(target, *mesh)
  resources = Resources()
  ee_settings = ExactExtract(max_span_tokens=args.max_span_tokens)
  greedy_settings = Greedy(max_new_tokens=args.max_new_tokens)
  path = lambda what: os.path.join(args.work_dir, f"{name.replace('/', '_')}_{what}.jsonl")
  out = {}
  for k in shots:
    t0 = time.time()
    demos = demonstrations(k, args.seed)
    requests = [dict(e.request(), examples=demos) if demos else e.request() for e in examples]
    prompts = [build_query(tok, e.passage, e.question, demos, target.eos_ids[0]).prompt_ids
               for e in examples]
    fields = lambda e: {"question": e.question, "answer": e.answer}
    greedy_rows = [Row(i, p, fields(e)) for i, (p, e) in enumerate(zip(prompts, examples))]
    resumed = {d: eval_runner.rows_done(path(f"{k}shot_{d}")) for d in ("greedy", "exact_extract")}
    share = k > 0  # the k examples open every prompt: prefilled once per batch
    records = eval_runner.evaluate(target, greedy_rows, greedy_settings, path(f"{k}shot_greedy"),
                                   batch_size=args.batch_size, mesh=mesh, resources=resources,
                                   desc=f"{name} greedy k={k}", share_prefix=share)
    greedy = [greedy_answer(r["outputs"][0]["text"]) for r in records]

    def extract_batch(ids: list[int], inputs: list[dict]) -> list[dict]:
      gens = generate(target, inputs, ee_settings, batch_size=args.batch_size,
                      resources=resources, share_prefix=share)
      return [{"outputs": [g.to_json(text=g.extras["text"])]} for g in gens]

    ee_rows = [Row(i, r, fields(e)) for i, (r, e) in enumerate(zip(requests, examples))]
    records = eval_runner.run_rows(
        ee_rows, extract_batch, path(f"{k}shot_exact_extract"), batch_size=args.batch_size,
        data_parallel=mesh[0], desc=f"{name} exact-extract k={k}",
        signature={"strategy": "exact_extract", "settings": ee_settings.to_flat(), "shots": k,
                   "model": name, "passages": args.passages, "seed": args.seed,
                   **({"share_prefix": True} if share else {})})
    gens = [Generation.from_json(r["outputs"][0]) for r in records]
    extracted = [g.extras["text"] for g in gens]
    scored = sum(g.extras["starts_scored"] for g in gens) / sum(g.extras["starts"] for g in gens)
    out[k] = {"greedy": scores(greedy, examples), "exact_extract": scores(extracted, examples),
              "greedy_in_passage": float(np.mean([bool(g) and g in e.passage
                                                  for g, e in zip(greedy, examples)])),
              "first": {"question": examples[0].question, "answer": examples[0].answer,
                        "greedy": greedy[0], "exact_extract": extracted[0]},
              # Paired over questions: McNemar's exact test on exact match.
              "em_paired": mcnemar_exact(exact_matches(extracted, examples),
                                         exact_matches(greedy, examples)),
              "starts_scored": scored, "resumed_rows": resumed, "seconds": time.time() - t0}
    print(f"{name} k={k} ({time.time() - t0:.0f}s): greedy {out[k]['greedy']}, exact-extract "
          f"{out[k]['exact_extract']}, greedy in passage {out[k]['greedy_in_passage']:.2f}",
          flush=True)
  return out


def render(result: dict) -> str:
  limit = result.get("max_span_tokens")
  spans = f"up to {limit} tokens" if limit else "any length"
  md = [f"{result['questions']} generated extractive questions over {result['passages']} passages "
        f"(`models/datasets/extractive_qa.py`, seed {result['seed']}), fp32, no chat template, "
        f"k in-context examples, greedy up to {result['max_new_tokens']} tokens, exact-extract "
        f"spans of {spans}. SQuAD EM / F1; greedy in passage is the share of greedy answers that "
        "are substrings of the passage; starts scored is the share of start positions "
        "exact-extract ran after its (exact) pruning; EM only EE / only greedy counts the "
        "questions only exact-extract / only greedy answered exactly, with McNemar's exact "
        "two-sided p over those questions (`benchmarks/significance.py`).", "",
        "| model | k | greedy EM | greedy F1 | exact-extract EM | exact-extract F1 | greedy in "
        "passage | starts scored | EM only EE / only greedy | p |",
        "|---|---|---|---|---|---|---|---|---|---|"]
  for name, by_k in result["models"].items():
    for k, m in by_k.items():
      scored = f"{m['starts_scored']:.2f}" if m.get("starts_scored") is not None else ""
      t = m.get("em_paired")
      paired = f"{t['only_a']} / {t['only_b']} | {t['p']:.2g}" if t else " | "
      md.append(f"| {name} | {k} | {m['greedy']['em']:.3f} | {m['greedy']['f1']:.3f} | "
                f"{m['exact_extract']['em']:.3f} | {m['exact_extract']['f1']:.3f} | "
                f"{m['greedy_in_passage']:.2f} | {scored} | {paired} |")
  md += ["", f"`{result['command']}` ({took(result)})."]
  return "\n".join(md)


def took(result: dict) -> str:
  """The invocation's wall time, and how many decoder-question rows it read back from earlier
  invocations (a full run takes several CPU sessions and resumes its rows)."""
  runs = [m for by_k in result["models"].values() for m in by_k.values()]
  done = sum(sum(m.get("resumed_rows", {}).values()) for m in runs)
  total = 2 * result["questions"] * len(runs)
  read_back = [f"{done} of {total} decoder-question rows"] if done else []
  return report.invocation_time(result["seconds"], result["machine"], read_back)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--passages", type=int, default=120)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--shots", default="0,4,16", help="comma-separated in-context example counts")
  ap.add_argument("--models", default="smollm2-135m-instruct",
                  help="comma-separated registered names or paths")
  ap.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
  ap.add_argument("--max_new_tokens", type=int, default=20)
  ap.add_argument("--max_span_tokens", type=int, default=0,
                  help="exact-extract's L_max (0: any length, as the paper; 16 covers every "
                       "answer here and runs about 4x fewer positions)")
  ap.add_argument("--batch_size", type=int, default=8)
  args, mesh, done = report.parse_and_start(ap, argv, out="results/extractive_qa.json",
                                            work_dir="results/rows/extractive_qa", render=render,
                                            marker=MARKER)
  if done is not None:
    return done
  examples = qa.examples(args.passages, seed=args.seed)
  if args.limit:
    examples = examples[:args.limit]
  shots = [int(s) for s in args.shots.split(",")]
  t0 = time.time()
  models = {name: run_model(name, examples, shots, args, mesh)
            for name in args.models.split(",")}
  result = dict(passages=len({e.passage_id for e in examples}), questions=len(examples),
                seed=args.seed, shots=shots, max_new_tokens=args.max_new_tokens,
                max_span_tokens=args.max_span_tokens, models=models,
                seconds=time.time() - t0, machine=machine_name(),
                command=" ".join(["python -m benchmarks.eval_extractive"] + list(
                    sys.argv[1:] if argv is None else argv)))
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

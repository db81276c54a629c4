"""The shared command line of the standalone training scripts.

`python -m train.distillspec`, `python -m train.gad` and `python -m train.draft_head` all take
`--config=configs/NAME.py` (ml_collections overrides such as `--config.num_steps=10` work) and,
where the script writes a run folder, `--workdir=DIR`. Config errors are reported as one line on
stderr with exit status 2, before any model is loaded or compiled.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional

from absl import app, flags
from ml_collections import config_flags

from train import model_setup


def prepare_workdir(config: Any, workdir: str) -> str:
  """Creates `workdir` (returned absolute) and writes the run's config.json into it."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  return workdir


def finish_run(result: dict, workdir: str) -> dict:
  """Writes `workdir/results.json` (with the workdir recorded) and returns the result."""
  result = dict(result, workdir=workdir)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  return result


def start_run(config: Any, workdir: str):
  """`prepare_workdir`, then builds the target model.

  Returns (workdir, target, eos_ids, pad_id) for `train.model_setup.build(config.model)`.
  """
  workdir = prepare_workdir(config, workdir)
  target = model_setup.build(config.model, seed=config.seed)
  tok = target.tokenizer
  eos = [] if tok is None or tok.eos_id is None else [int(tok.eos_id)]
  pad_id = int(tok.pad_id) if tok is not None and tok.pad_id is not None else 0
  return workdir, target, eos, pad_id


def runs_dir() -> str:
  """Default parent of run folders: ~/.cache/decodax/runs."""
  return os.path.join(os.path.expanduser("~"), ".cache", "decodax", "runs")


def run_script(run: Callable[..., Any], *, validate: Optional[Callable[[Any], None]] = None,
               run_name: Optional[Callable[[Any], str]] = None,
               config_help: str = "experiment config (configs/*.py)",
               print_result: bool = True) -> None:
  """Defines the flags and runs `run(config, workdir)` (or `run(config)` without `run_name`).

  Args:
    run: the script's library entry point.
    validate: raises ValueError on a bad config; called before `run`.
    run_name: the default run folder's name under `runs_dir()`; when given, the script takes
      `--workdir` and `run` gets it as its second argument.
    config_help: the `--config` flag's help text.
    print_result: print what `run` returns as JSON.
  """
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=False)
  if run_name is not None:
    flags.DEFINE_string("workdir", "", "checkpoints, metrics and results (default: "
                        f"{runs_dir()}/<run name>)")

  def main(argv):
    del argv
    config = flags.FLAGS.config
    if config is None:
      print("error: --config is required", file=sys.stderr)
      sys.exit(2)
    try:
      if validate is not None:
        validate(config)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    if run_name is None:
      result = run(config)
    else:
      result = run(config, flags.FLAGS.workdir or os.path.join(runs_dir(), run_name(config)))
    if print_result:
      print(json.dumps(result, indent=1, default=str))

  app.run(main)

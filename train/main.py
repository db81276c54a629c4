"""Runs one training experiment: `python -m train.main --config=configs/NAME.py --workdir=DIR`.

Re-running the same command resumes from the last checkpoint in `DIR/checkpoints`. See
`train/experiment.py` for what a run writes.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from train import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and export")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    print("error: --config and --workdir are required", file=sys.stderr)
    sys.exit(2)
  try:
    experiment.validate(config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  results = experiment.run(config, workdir)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)

"""Shared plumbing of the evaluation scripts: a result JSON plus a README table from it."""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Optional

from benchmarks.bench_decode import write_table


def add_output_args(ap: argparse.ArgumentParser, default_out: str) -> None:
  ap.add_argument("--out", default=default_out, help="result JSON file")
  ap.add_argument("--readme", default="README.md", help="file whose table is rewritten ('' = none)")
  ap.add_argument("--render_only", action="store_true",
                  help="rewrite the README table from an existing --out file and exit")


def render_only(args, render: Callable[[dict], str], marker: str) -> Optional[dict]:
  """With --render_only: rewrites the table from --out and returns the result (else None)."""
  if not args.render_only:
    return None
  with open(args.out) as f:
    result = json.load(f)
  write_table(args.readme, render(result), marker, None)
  return result


def save(result: dict, args, render: Callable[[dict], str], marker: str) -> None:
  """Writes the result JSON, the README table (unless --readme=''), and prints the table."""
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  if args.readme:
    write_table(args.readme, render(result), marker, None)
  print(render(result))

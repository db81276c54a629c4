"""Shared plumbing of the evaluation scripts: a result JSON plus a README table from it, and
the options of the evaluation harness they run through (`decoding.eval_runner`)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Optional, Sequence

import jax

from benchmarks.bench_decode import write_table
from decoding import eval_runner


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


def add_harness_args(ap: argparse.ArgumentParser, work_dir: str) -> None:
  """The harness's options: the folder of the per-run JSONL results (a rerun of the command
  resumes them; delete it to start over), each process's device mesh and the processes of a
  `jax.distributed` run."""
  ap.add_argument("--work_dir", default=work_dir,
                  help="folder of the JSONL results of each generation run (resumed on rerun)")
  ap.add_argument("--mesh_data", type=int, default=1, help="devices per process over the batch")
  ap.add_argument("--mesh_model", type=int, default=1, help="devices per process over weights")
  ap.add_argument("--coordinator", default="",
                  help="jax.distributed: '' (one process), 'auto' (TPU pod slice) or host:port")
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)


def start_harness(args) -> tuple[int, int]:
  """Joins this process to the run's processes (if any) and returns the checked mesh
  (data, model); call it before anything touches a device."""
  eval_runner.init_processes(args.coordinator, args.num_processes, args.process_id)
  return eval_runner.mesh_axes((args.mesh_data, args.mesh_model))


def parse_and_start(ap: argparse.ArgumentParser, argv, *, out: str, work_dir: str,
                    render: Callable[[dict], str], marker: str):
  """The shared start of an evaluation script: adds the output and harness options to `ap`,
  parses `argv`, and either rewrites the table (--render_only; returns (args, None, result))
  or joins the run's processes and returns (args, mesh, None)."""
  add_output_args(ap, out)
  add_harness_args(ap, work_dir)
  args = ap.parse_args(argv)
  done = render_only(args, render, marker)
  if done is not None:
    return args, None, done
  return args, start_harness(args), None


def invocation_time(seconds: float, machine: str, read_back: Sequence[str] = ()) -> str:
  """'N min on MACHINE' for a results table; when the invocation resumed earlier work
  (`read_back`, e.g. "40 of 300 rows"), it says so, since that work's time is not in N."""
  out = f"{seconds / 60:.0f} min on {machine}"
  if not read_back:
    return out
  return (f"this invocation: {out}; it read back {' and '.join(read_back)} from earlier "
          "invocations of the same command")


def save(result: dict, args, render: Callable[[dict], str], marker: str) -> None:
  """Writes the result JSON, the README table (unless --readme=''), and prints the table;
  in a multi-process run only process 0 does."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  if args.readme:
    write_table(args.readme, render(result), marker, None)
  print(render(result))

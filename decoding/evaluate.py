"""Command-line evaluation of a text strategy over a dataset (`decoding.eval_runner`).

  python -m decoding.evaluate --config=configs/evaluate.py --config.output=arith.jsonl
  python -m decoding.evaluate --config=configs/evaluate.py --config.dataset=prompts.jsonl \
      --config.output=out.jsonl --config.strategy=sample --config.top_p=0.9 --config.mesh.data=8
  # one command per process, e.g. two on this machine (or coordinator=auto on each TPU host)
  python -m decoding.evaluate --config=configs/evaluate.py --config.output=out.jsonl \
      --config.distributed.coordinator=localhost:12355 --config.distributed.num_processes=2 \
      --config.distributed.process_id=0

The dataset is `arithmetic` (`limit` word problems of models/datasets/arithmetic.py, 64 by
default; each record holds the problem's `prompt` and reference `answer`, and the run ends
with the accuracy of the last number of each row's first output) or a JSONL file of
{"prompt": str} lines (the chat template applied as in `decoding.generate`) or
{"prompt_ids": [int]} lines (used as given), each with an optional integer "id" (default:
the line's position among the prompts) and any other fields, which are copied into the
row's record. Writes one record per row (`decoding.eval_runner`: "id", the row's fields and
"outputs", every output sequence as `decoding.generate` writes it); a rerun with the same
output skips the rows already written. Bad values are reported in one line before anything
is loaded or compiled.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

import jax
from absl import app, logging
from ml_collections import config_flags

from decoding import cli, eval_runner
from decoding import registry as strategies
from decoding.answers import last_number
from decoding.errors import GenerationError
from decoding.eval_runner import Row
from decoding.prompts import check_request_line, encode_text
from decoding.settings import check_bool, check_int
from decoding.strategy import Resources
from models import registry
from models.datasets import arithmetic
from models.lm import load_model

# The config fields of this command on top of configs/generate.py's.
EVAL_FIELDS = ("dataset", "dataset_seed", "limit", "output", "progress", "distributed",
               "share_prefix")
ARITHMETIC_PROBLEMS = 64  # with limit = 0


def check_request(cfg):
  """Everything that can be checked before loading or compiling anything; returns the
  strategy's settings."""
  flat = cli.as_dict(cfg)
  for field in EVAL_FIELDS:
    flat.pop(field, None)
  settings = cli.settings_from_config(flat, "text")
  check_bool("share_prefix", cfg.share_prefix)
  strategy = strategies.strategy_of(settings)
  if cfg.share_prefix and not strategy.shares_prefix:
    able = [n for n, s in strategies.STRATEGIES.items() if s.shares_prefix]
    raise GenerationError(f"strategy {strategy.name!r} cannot share a prompt prefix "
                          f"(share_prefix=True); these can: {', '.join(able)}")
  if cfg.model not in registry.LANGUAGE_MODELS and not os.path.exists(cfg.model):
    raise GenerationError(
        f"unknown model {cfg.model!r}: not a registered language model "
        f"({sorted(registry.LANGUAGE_MODELS)}) and no such file or directory")
  if not cfg.output:
    raise GenerationError("give the results file: --config.output=FILE.jsonl")
  if cfg.dataset != "arithmetic" and not os.path.isfile(cfg.dataset):
    raise GenerationError(f"unknown dataset {cfg.dataset!r}: 'arithmetic' or a JSONL file")
  check_int("limit", cfg.limit, 0)
  check_int("dataset_seed", cfg.dataset_seed, 0)
  if cfg.matmul_kernel == "packed" and cfg.mesh.data * cfg.mesh.model > 1:
    raise GenerationError("matmul_kernel='packed' runs on one CPU device; use "
                          "matmul_kernel='xla' with a mesh")
  return settings


def read_jsonl(path: str, limit: int = 0) -> list[dict]:
  """The dataset's lines (the first `limit`; 0: all): each a dict with exactly one of
  "prompt" (str) or "prompt_ids" ([int]) and an "id" (given, or the line's position among
  the prompts)."""
  out = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise GenerationError(f"{where}: not valid JSON ({e})") from None
      check_request_line(obj, where)
      if "outputs" in obj:
        raise GenerationError(f'{where}: "outputs" is the field the results go in')
      obj.setdefault("id", len(out))
      out.append(obj)
      if limit and len(out) == limit:
        break
  if not out:
    raise GenerationError(f"{path}: no prompts")
  eval_runner.check_ids([o["id"] for o in out])
  return out


def dataset_rows(cfg, model, lines: Optional[list[dict]] = None) -> list[Row]:
  """The rows of the config's dataset (`lines`: a JSONL dataset already read)."""
  if cfg.dataset == "arithmetic":
    problems = arithmetic.problems(int(cfg.limit) or ARITHMETIC_PROBLEMS, seed=cfg.dataset_seed)
    return [Row(i, encode_text(model, p.prompt, cfg), {"prompt": p.prompt, "answer": p.answer})
            for i, p in enumerate(problems)]
  lines = read_jsonl(cfg.dataset, int(cfg.limit)) if lines is None else lines
  rows = []
  for obj in lines:
    ids = obj["prompt_ids"] if "prompt_ids" in obj else encode_text(model, obj["prompt"], cfg)
    rows.append(Row(int(obj["id"]), ids,
                    {k: v for k, v in obj.items() if k not in ("id", "prompt_ids")}))
  return rows


def load(cfg):
  """The config's model, on one device (`eval_runner.evaluate` places it on the mesh)."""
  return load_model(cfg.model, numerics=cfg.numerics, batch_invariant=cfg.batch_invariant,
                    scan_layers=cfg.scan_layers, fused_projections=cfg.fused_projections,
                    matmul_kernel=cfg.matmul_kernel)


def summary(records: list[dict], seconds: float, dataset: str) -> dict:
  """Rows, output sequences, new tokens and seconds of a run; for arithmetic, the accuracy
  of the last number of each row's first output."""
  outs = [o for r in records for o in r["outputs"]]
  out: dict[str, Any] = {"rows": len(records), "sequences": len(outs),
                         "new_tokens": sum(len(o["output_ids"]) for o in outs),
                         "seconds": round(seconds, 2)}
  if dataset == "arithmetic":
    right = [_is_right(r) for r in records]
    out["accuracy"] = sum(right) / len(right)
  return out


def _is_right(record: dict) -> bool:
  answer = last_number(record["outputs"][0].get("text", ""))
  try:
    return answer is not None and float(answer) == record["answer"]
  except ValueError:
    return False


def run(cfg, err=None) -> list[dict]:
  """Evaluates the config's strategy over its dataset into `cfg.output`; returns the records
  in id order and prints a one-line summary (process 0) to `err` (stderr)."""
  settings = check_request(cfg)
  lines = None if cfg.dataset == "arithmetic" else read_jsonl(cfg.dataset, int(cfg.limit))
  d = cfg.distributed
  eval_runner.init_processes(d.coordinator, d.num_processes, d.process_id, d.cpu_collectives)
  mesh = eval_runner.mesh_axes((cfg.mesh.data, cfg.mesh.model))
  eval_runner.check_batch_size(cfg.batch_size, mesh[0])
  eval_runner.check_output(cfg.output)
  model = load(cfg)
  rows = dataset_rows(cfg, model, lines)
  t0 = time.perf_counter()
  records = eval_runner.evaluate(model, rows, settings, cfg.output, seed=cfg.seed,
                                 batch_size=cfg.batch_size, mesh=mesh,
                                 max_cache_len=cfg.max_cache_len, resources=Resources(),
                                 progress=cfg.progress, share_prefix=cfg.share_prefix)
  if jax.process_index() == 0:
    print(f"evaluated: {json.dumps(summary(records, time.perf_counter() - t0, cfg.dataset))}",
          file=err or sys.stderr)
  return records


def main() -> None:
  # the flag is defined here, not at import, so importing this module never collides with
  # another command's --config
  config = config_flags.DEFINE_config_file("config", "configs/evaluate.py",
                                           "Evaluation config file.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
    try:
      run(config.value)
    except (GenerationError, FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  main()

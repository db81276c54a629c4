"""Command-line generation.

  python -m decoding.generate --config=configs/generate.py --prompt="Hello"
  python -m decoding.generate --config=configs/generate.py \
      --config.strategy=sample --config.top_p=0.9 --input=prompts.jsonl --output=out.jsonl

Single-prompt mode prints the completion. Batch mode reads JSON lines with either
`{"prompt": str}` (chat template applied for instruct models unless
`--config.chat_template=False`) or `{"prompt_ids": [int]}` (used as given: no template,
no BOS), and writes one line per output sequence (num_return_sequences per input): every
field of `decoding.results.Generation` (index, rank, prompt_ids, output_ids,
token_logprobs, processed_logprobs, token_entropy, finished, score, score_kind,
self_certainty, gnll) plus `text`, the input `prompt` text when one was given, and the
strategy's extras. Every run ends with one line on stderr: the new tokens, the wall time split
into compiling and decoding, decode tokens/s and, for speculative strategies, tau (tokens
per target call). A line's output depends only on its content, its line number and the
seed, not on the batch it was run in. The config is mapped to the strategy's settings once
(`decoding.cli`); bad values are reported in one line before anything is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from decoding import cli
from decoding.errors import GenerationError, nearest
from decoding.prompts import check_request_line, encode_text  # encode_text: also for scripts
from decoding.registry import strategy_of
from decoding.runner import generate, validate_prompts
from decoding.strategy import Resources, Target
from decoding.timing import Stopwatch, speed_report
from models import packed_matmul, registry, sharding
from models.config import MATMUL_KERNELS
from models.lm import load_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/generate.py",
                                          "Generation config file.")
_PROMPT = flags.DEFINE_string("prompt", None, "A text prompt (single-prompt mode).")
_INPUT = flags.DEFINE_string("input", None, "JSONL file of prompts (batch mode).")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file for the results (batch mode).")


def read_requests(path: str, check_line=check_request_line) -> list[dict]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input file not found: {path}")
  requests = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
      check_line(obj, f"{path}:{lineno}")
      requests.append(obj)
  if not requests:
    raise ValueError(f"{path}: no prompts")
  return requests


def line_check(strategy):
  """How a JSONL line is checked: a prompt line, or the input of a strategy that reads its
  own (`Strategy.check_inputs`, e.g. exact_extract's {"passage", "question"})."""
  if strategy.check_inputs is None:
    return check_request_line

  def check(obj, where: str) -> None:
    try:
      strategy.check_inputs([obj])
    except GenerationError as e:
      raise GenerationError(f"{where}: {str(e).removeprefix('input 0: ')}") from None
  return check


def check_request(cfg, prompts_given: bool):
  """Everything that can be checked before loading or compiling anything; returns the
  strategy's settings."""
  settings = cli.settings_from_config(cfg, "text")
  if cfg.model not in registry.LANGUAGE_MODELS and not os.path.exists(cfg.model):
    raise GenerationError(
        f"unknown model {cfg.model!r}: not a registered language model "
        f"({sorted(registry.LANGUAGE_MODELS)}) and no such file or directory")
  if not prompts_given:
    raise GenerationError("give --prompt=TEXT or --input=FILE.jsonl --output=FILE.jsonl")
  check_matmul_kernel(cfg)
  return settings


def check_matmul_kernel(cfg) -> None:
  """The `matmul_kernel` field against the dtypes, the mesh and this machine."""
  if cfg.matmul_kernel not in MATMUL_KERNELS:
    raise GenerationError(f"matmul_kernel must be one of {MATMUL_KERNELS}, got "
                          f"{cfg.matmul_kernel!r}{nearest(str(cfg.matmul_kernel), MATMUL_KERNELS)}")
  if cfg.matmul_kernel != "packed":
    return
  if cfg.numerics == "bf16":
    raise GenerationError("matmul_kernel='packed' computes in float32: use numerics='fp32' or "
                          "'layercast' (bf16 weights, fp32 compute), or matmul_kernel='xla'")
  if cfg.mesh.data * cfg.mesh.model > 1:
    raise GenerationError("matmul_kernel='packed' runs on one CPU device; use "
                          "matmul_kernel='xla' with a mesh")
  reason = packed_matmul.unavailable_reason()
  if reason is not None:
    raise GenerationError(f"matmul_kernel='packed': {reason}")


def load(cfg):
  """The model of the config, placed on the config's device mesh: (model, shard function)."""
  model = load_model(cfg.model, numerics=cfg.numerics, batch_invariant=cfg.batch_invariant,
                     scan_layers=cfg.scan_layers,
                     fused_projections=cfg.fused_projections, matmul_kernel=cfg.matmul_kernel)
  shard = None
  if cfg.mesh.data * cfg.mesh.model > 1:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
    model.params = sharding.shard_params(model.params, mesh, column_only=cfg.batch_invariant)
    model.lm = dataclasses.replace(model.lm, mesh=mesh)
    shard = lambda arrays: sharding.shard_batch(arrays, mesh)
  return model, shard


def run(cfg, prompt: Optional[str], input_path: Optional[str], output_path: Optional[str],
        out=sys.stdout, err=None) -> list[dict]:
  """Generates for one prompt or a JSONL file; prints the completion(s) to `out` (single
  prompt) and one speed line to `err`: new tokens, wall seconds split into compile and decode
  (prefill included), decode tokens/s and, for speculative strategies, tau."""
  settings = check_request(cfg, prompt is not None or input_path is not None)
  if input_path is not None and output_path is None:
    raise GenerationError("--input needs --output")
  strategy = strategy_of(settings)
  if strategy.check_inputs is not None and input_path is None:
    raise GenerationError(f"strategy {strategy.name!r} reads its own input lines: give "
                          "--input=FILE.jsonl --output=FILE.jsonl")
  requests = read_requests(input_path, line_check(strategy)) if input_path else [
      {"prompt": prompt}]
  model, shard = load(cfg)
  if strategy.check_inputs is not None:
    prompts = requests
  else:
    prompts = [r["prompt_ids"] if "prompt_ids" in r else encode_text(model, r["prompt"], cfg)
               for r in requests]
    validate_prompts(prompts, model.lm.vocab_size)
  target, resources = Target.of(model), Resources()
  results, generations, watch = [], [], Stopwatch()
  bs = int(cfg.batch_size)
  chunks = range(0, len(prompts), bs)
  if input_path is not None:
    chunks = tqdm(chunks, desc="generating", unit="batch", file=sys.stderr)
  for start in chunks:
    with watch:
      gens = generate(target, prompts[start:start + bs], settings, seed=cfg.seed, batch_size=bs,
                      max_cache_len=cfg.max_cache_len,
                      row_ids=range(start, min(start + bs, len(prompts))), shard=shard,
                      resources=resources)
    generations += gens
    for g in gens:
      g.index += start
      text = model.tokenizer.decode(g.output_ids, skip_special_tokens=True) if (
          model.tokenizer is not None) else ""
      text = g.extras.get("text", text)  # a strategy's own text (exact_extract: the span)
      given = {"prompt": requests[g.index]["prompt"]} if "prompt" in requests[g.index] else {}
      results.append(g.to_json(text=text, **given))
  if output_path is not None:
    with open(output_path, "w") as f:
      for r in results:
        f.write(json.dumps(r) + "\n")
  elif len(results) == 1:
    print(results[0]["text"], file=out)
  else:
    for r in results:
      print(f"--- sequence {r['rank']} (score {r['score']:.3f}, {r['score_kind']})", file=out)
      print(r["text"], file=out)
  print(f"speed: {speed_report(generations, watch).line()}", file=err or sys.stderr)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
  try:
    run(_CONFIG.value, _PROMPT.value, _INPUT.value, _OUTPUT.value)
  except (GenerationError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)

"""Command-line generation.

  python -m decoding.generate --config=configs/generate.py --prompt="Hello"
  python -m decoding.generate --config=configs/generate.py \
      --config.strategy=sample --config.top_p=0.9 --input=prompts.jsonl --output=out.jsonl

Single-prompt mode prints the completion. Batch mode reads JSON lines with either
`{"prompt": str}` (chat template applied for instruct models unless
`--config.chat_template=False`) or `{"prompt_ids": [int]}` (used as given: no template,
no BOS), and writes one line per output sequence (num_return_sequences per input) with
`index` (input line), `rank`, `prompt_ids`, `output_ids`, `text`, `token_logprobs`,
`score`, and strategy-specific fields (`gnll` for greedy, `self_certainty`, ...). A line's output depends only on its content, its line
number and the seed, not on the batch it was run in.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/generate.py",
                                          "Generation config file.")
_PROMPT = flags.DEFINE_string("prompt", None, "A text prompt (single-prompt mode).")
_INPUT = flags.DEFINE_string("input", None, "JSONL file of prompts (batch mode).")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file for the results (batch mode).")


def read_requests(path: str) -> list[dict]:
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
      if not isinstance(obj, dict) or (("prompt" in obj) == ("prompt_ids" in obj)):
        raise ValueError(f'{path}:{lineno}: expected exactly one of "prompt" or "prompt_ids"')
      if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise ValueError(f'{path}:{lineno}: "prompt" must be a string')
      if "prompt_ids" in obj and not (isinstance(obj["prompt_ids"], list) and all(
          isinstance(t, int) and not isinstance(t, bool) for t in obj["prompt_ids"])):
        raise ValueError(f'{path}:{lineno}: "prompt_ids" must be a list of integers')
      requests.append(obj)
  if not requests:
    raise ValueError(f"{path}: no prompts")
  return requests


def encode_text(model, text: str, cfg) -> list[int]:
  tok = model.tokenizer
  if tok is None:
    raise ValueError("this checkpoint has no tokenizer: give prompt_ids instead of text")
  if cfg.chat_template and model.instruct and tok.chat_template:
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
    messages.append({"role": "user", "content": text})
    return tok.encode_chat(messages, add_generation_prompt=True)
  return tok.encode(text)


def eos_and_pad(model) -> tuple[list[int], int]:
  tok = model.tokenizer
  eos = [tok.eos_id] if tok is not None and tok.eos_id is not None else []
  pad = tok.pad_id if tok is not None and tok.pad_id is not None else (eos[0] if eos else 0)
  return eos, pad


def check_request(cfg, prompts_given: bool) -> None:
  """Everything that can be checked before loading or compiling anything."""
  from decoding import generation
  from models import registry
  generation.validate_config(cfg)
  if cfg.model not in registry.MODELS and not os.path.exists(cfg.model):
    raise generation.GenerationError(
        f"unknown model {cfg.model!r}: not a registered name ({sorted(registry.MODELS)}) "
        "and no such file or directory")
  if not prompts_given:
    raise generation.GenerationError("give --prompt=TEXT or --input=FILE.jsonl --output=FILE.jsonl")


def load(cfg):
  from models.lm import load_model
  from models import sharding
  import dataclasses
  model = load_model(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     matmul_precision=cfg.matmul_precision, scan_layers=cfg.scan_layers)
  shard = None
  if cfg.mesh.data * cfg.mesh.model > 1:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
    model.params = sharding.shard_params(model.params, mesh)
    model.lm = dataclasses.replace(model.lm, mesh=mesh)
    shard = lambda arrays: sharding.shard_batch(arrays, mesh)
  return model, shard


def run(cfg, prompt: Optional[str], input_path: Optional[str], output_path: Optional[str],
        out=sys.stdout) -> list[dict]:
  from decoding import generation
  check_request(cfg, prompt is not None or input_path is not None)
  if input_path is not None and output_path is None:
    raise generation.GenerationError("--input needs --output")
  requests = read_requests(input_path) if input_path else [{"prompt": prompt}]
  model, shard = load(cfg)
  prompts = [r["prompt_ids"] if "prompt_ids" in r else encode_text(model, r["prompt"], cfg)
             for r in requests]
  generation.validate_prompts(prompts, model.lm.vocab_size)
  eos, pad = eos_and_pad(model)
  results = []
  bs = int(cfg.batch_size)
  chunks = range(0, len(prompts), bs)
  if input_path is not None:
    from tqdm import tqdm
    chunks = tqdm(chunks, desc="generating", unit="batch", file=sys.stderr)
  for start in chunks:
    gens = generation.generate(model.lm, model.params, prompts[start:start + bs], cfg, eos, pad,
                               row_ids=range(start, min(start + bs, len(prompts))), shard=shard,
                               tokenizer=model.tokenizer)
    for g in gens:
      text = model.tokenizer.decode(g.output_ids, skip_special_tokens=True) if (
          model.tokenizer is not None) else ""
      r = dict(index=start + g.index, rank=g.rank, prompt_ids=g.prompt_ids,
               output_ids=g.output_ids, text=text, token_logprobs=g.token_logprobs,
               score=g.score)
      for key in ("self_certainty", "gnll"):
        if getattr(g, key) is not None:
          r[key] = getattr(g, key)
      r.update({k: v for k, v in g.extras.items() if _jsonable(v)})
      results.append(r)
  if output_path is not None:
    with open(output_path, "w") as f:
      for r in results:
        f.write(json.dumps(r) + "\n")
  elif len(results) == 1:
    print(results[0]["text"], file=out)
  else:
    for r in results:
      print(f"--- sequence {r['rank']} (score {r['score']:.3f})", file=out)
      print(r["text"], file=out)
  return results


def _jsonable(v) -> bool:
  try:
    json.dumps(v)
    return True
  except (TypeError, ValueError):
    return False


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
  from decoding.generation import GenerationError
  try:
    run(_CONFIG.value, _PROMPT.value, _INPUT.value, _OUTPUT.value)
  except (GenerationError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)

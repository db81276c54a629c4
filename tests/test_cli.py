"""`python -m decoding.generate`: single-prompt and JSONL batch modes."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from configs import generate as generate_config
from decoding import generate as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_single_prompt_applies_chat_template(smollm, monkeypatch):
  monkeypatch.setattr(cli, "load", lambda cfg: (smollm, None))
  cfg = generate_config.get_config()
  cfg.max_new_tokens = 12
  out = io.StringIO()
  res = cli.run(cfg, "What is the capital of France?", None, None, out=out)
  tok = smollm.tokenizer
  expected_prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
  assert res[0]["prompt_ids"] == expected_prompt
  assert "Paris" in out.getvalue()
  cfg.chat_template = False
  res = cli.run(cfg, "What is the capital of France?", None, None, out=io.StringIO())
  assert res[0]["prompt_ids"] == tok.encode("What is the capital of France?")


def test_batch_mode_end_to_end(tmp_path, smollm):
  tok = smollm.tokenizer
  inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  ids = tok.encode("The capital of France is")
  lines = [{"prompt": "Name a fruit."}, {"prompt_ids": ids}, {"prompt": "Say hi."}]
  inp.write_text("".join(json.dumps(l) + "\n" for l in lines))
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.strategy=greedy", "--config.max_new_tokens=8", "--config.min_new_tokens=8",
         "--config.batch_size=2", f"--input={inp}", f"--output={outp}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "generating" in proc.stderr  # progress bar
  rows = [json.loads(l) for l in outp.read_text().splitlines()]
  assert len(rows) == 3
  for r in rows:
    assert set(r) >= {"prompt_ids", "output_ids", "text", "token_logprobs", "score"}
    assert len(r["output_ids"]) == 8 == len(r["token_logprobs"])
    assert r["score"] == pytest.approx(sum(r["token_logprobs"]), abs=1e-4)
    assert r["text"] == tok.decode(r["output_ids"], skip_special_tokens=True)
  assert rows[1]["prompt_ids"] == ids  # ids used as given: no template, no BOS
  assert rows[0]["prompt_ids"] == tok.encode_chat([{"role": "user", "content": "Name a fruit."}])


def test_cli_reports_bad_values_without_traceback():
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.strategy=sample", "--config.temperature=0", "--prompt=hi"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "error: temperature must be > 0" in proc.stderr
  assert "Traceback" not in proc.stderr


ISSUE_STRATEGIES = ("greedy", "sample", "beam", "diverse_beam", "momentum", "superposed",
                    "best_of_n", "self_agreement", "speculative")


@pytest.mark.parametrize("name", ISSUE_STRATEGIES)
def test_every_strategy_is_registered_with_a_valid_config(name):
  """Each strategy is reachable by name and its config file (or the base one) validates."""
  import importlib
  from decoding import generation
  assert name in generation.STRATEGIES
  module = name if name not in ("greedy", "sample") else "generate"
  cfg = importlib.import_module(f"configs.{module}").get_config()
  if module == "generate":
    cfg.strategy = name
  assert cfg.strategy == name
  generation.validate_config(cfg)
  # The base config carries every strategy's fields, so --config.strategy=NAME with
  # configs/generate.py accepts the same overrides as the strategy's own file.
  base = generate_config.get_config()
  assert set(cfg.keys()) <= set(base.keys())


def test_beam_flags_parse_on_the_command_line():
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.strategy=beam", "--config.num_beams=2", "--config.num_return_sequences=3",
         "--config.early_stopping=never", "--prompt=hi"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "num_return_sequences" in proc.stderr and "Traceback" not in proc.stderr

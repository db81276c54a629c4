"""`python -m decoding.generate`: single-prompt and JSONL batch modes."""
from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys

import pytest

from configs import generate as generate_config
from decoding import cli as cli_lib
from decoding import generate as cli
from decoding import registry
from tests import REPO as ROOT


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


@pytest.mark.slow
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
  for r in rows:  # everything a Generation holds, and the text
    assert set(r) >= {"index", "rank", "prompt_ids", "output_ids", "text", "token_logprobs",
                      "processed_logprobs", "token_entropy", "finished", "score", "score_kind",
                      "self_certainty", "gnll"}, sorted(r)
    assert len(r["output_ids"]) == 8 == len(r["token_logprobs"]) == len(r["token_entropy"])
    assert r["score_kind"] == "log_likelihood" and r["finished"] is False
    assert r["gnll"] == pytest.approx(-sum(r["token_logprobs"]), abs=1e-4)
    assert r["score"] == pytest.approx(sum(r["token_logprobs"]), abs=1e-4)
    assert r["text"] == tok.decode(r["output_ids"], skip_special_tokens=True)
  assert [r.get("prompt") for r in rows] == ["Name a fruit.", None, "Say hi."]
  assert rows[1]["prompt_ids"] == ids  # ids used as given: no template, no BOS
  assert rows[0]["prompt_ids"] == tok.encode_chat([{"role": "user", "content": "Name a fruit."}])


def test_cli_reports_bad_values_without_traceback():
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.strategy=sample", "--config.temperature=0", "--prompt=hi"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "error: temperature must be a number > 0" in proc.stderr
  assert "Traceback" not in proc.stderr


TEXT_STRATEGIES = tuple(registry.names("text"))  # every text strategy in the table


@pytest.mark.parametrize("name", TEXT_STRATEGIES)
def test_a_strategy_behaves_the_same_whichever_config_file_selected_it(name):
  """configs/<strategy>.py and configs/generate.py with --config.strategy=<strategy> give
  equal settings: every default lives in the strategy's settings type."""
  base = generate_config.get_config()
  base.strategy = name
  from_base = cli_lib.settings_from_config(base)
  assert from_base == registry.STRATEGIES[name].settings()  # the type's own defaults
  if os.path.exists(os.path.join(ROOT, "configs", f"{name}.py")):
    own = importlib.import_module(f"configs.{name}").get_config()
    assert own.strategy == name
    assert cli_lib.settings_from_config(own) == from_base


@pytest.mark.parametrize("modality,config", [("text", "generate"), ("image", "generate_images"),
                                             ("speech", "transcribe")])
def test_config_files_carry_exactly_the_strategies_fields(modality, config):
  """Every field a strategy reads can be set from its command's base config (so any
  --config.NAME the settings accept parses), and the config has no field no strategy reads."""
  cfg = importlib.import_module(f"configs.{config}").get_config()
  cli_lib.check_config_fields(cfg, modality)
  assert set(cli_lib.strategy_fields(modality)) <= set(cfg.keys())
  for name in registry.names(modality):
    cfg.strategy = name
    assert registry.strategy_of(cli_lib.settings_from_config(cfg, modality)).name == name


def test_a_misspelled_field_is_one_line_naming_the_nearest_field():
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.top_pp=0.9", "--prompt=hi"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "top_pp" in lines[0] and "'top_p'" in lines[0], proc.stderr


def test_a_field_the_strategy_ignores_is_an_error_from_the_cli():
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.num_beams=4", "--prompt=hi"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "num_beams does not apply to strategy 'greedy'" in proc.stderr


def test_beam_flags_parse_on_the_command_line():
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.strategy=beam", "--config.num_beams=2", "--config.num_return_sequences=3",
         "--config.early_stopping=never", "--prompt=hi"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "num_return_sequences" in proc.stderr and "Traceback" not in proc.stderr

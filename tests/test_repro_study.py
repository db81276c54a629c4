"""The reproducibility study's driver: `--no_run` reports without decoding anything, and a
configuration resumes from its saved chunks."""
import json
import types

import jax
import numpy as np
import pytest

from benchmarks import repro_study
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.strategy import Target
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params


def test_no_run_writes_the_report_without_starting_a_configuration(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("--no_run started a configuration")

  monkeypatch.setattr(repro_study, "run_config", refuse)
  monkeypatch.setattr(repro_study, "load_model", refuse)
  out = tmp_path / "study.json"
  result = repro_study.main(["--no_run", "--problems", "2", "--devices", "1",
                             "--batch_sizes", "1", "--out", str(out), "--readme", ""])
  assert result["missing"] == 3 and not result["complete"]
  assert json.loads(out.read_text())["missing_configs"] == ["bf16/b1/d1", "fp32/b1/d1",
                                                            "layercast/b1/d1"]


def test_a_configuration_resumed_from_its_chunks_equals_one_call(tmp_path, monkeypatch):
  """A configuration killed after its first saved chunk and rerun decodes only the rest, and
  its outputs and log-probs are bit for bit those of one `generate` call over every prompt
  (the chunks are padded to the whole list's shapes and hold whole batches)."""
  c = tiny_config(vocab_size=40, num_layers=2)
  model = types.SimpleNamespace(lm=TransformerLM(c), params=init_params(c, jax.random.PRNGKey(0)))
  monkeypatch.setattr(repro_study, "CHUNK", 3)  # chunks of 4 prompts at batch 2
  rng = np.random.default_rng(0)
  # the first chunk's prompts fit a 16-slot bucket, the longest prompt needs 32
  prompts = [rng.integers(2, 40, n).tolist() for n in (3, 5, 9, 2, 20, 4, 7, 1, 6)]
  one = generate(Target(model.lm, model.params, eos_ids=(1,), pad_id=0), prompts,
                 Greedy(max_new_tokens=6), batch_size=2)
  parts = str(tmp_path / "fp32_b2_d1.jsonl")
  calls, real = [], repro_study.generate

  def dies_after_one_chunk(*a, **k):
    if calls:
      raise KeyboardInterrupt
    calls.append(len(a[1]))
    return real(*a, **k)

  monkeypatch.setattr(repro_study, "generate", dies_after_one_chunk)
  with pytest.raises(KeyboardInterrupt):
    repro_study.run_config(model, prompts, "fp32", 2, 1, False, 6, (1,), 0, parts)
  assert calls == [4]

  def counts(*a, **k):
    calls.append(len(a[1]))
    return real(*a, **k)

  monkeypatch.setattr(repro_study, "generate", counts)
  row = repro_study.run_config(model, prompts, "fp32", 2, 1, False, 6, (1,), 0, parts)
  assert calls == [4, 4, 1]
  assert row["outputs"] == [g.output_ids for g in one]
  assert row["top1_logprobs"] == [[float(x) for x in g.token_logprobs] for g in one]
  with pytest.raises(SystemExit, match="delete it"):  # chunks of another request
    repro_study.run_config(model, prompts, "fp32", 2, 1, False, 5, (1,), 0, parts)

"""Bad input gets a clear error before anything is compiled."""
from __future__ import annotations

import numpy as np
import pytest

from configs import generate as generate_config
from decoding import adadec, token_loop
from decoding import generate as cli
from decoding.errors import GenerationError
from tests.fakes import BigramLM
from tests.helpers import run_config


def cfg(**kw):
  c = generate_config.get_config()
  c.update(kw)
  return c


@pytest.fixture()
def no_compile(monkeypatch):
  """Fails the test if the decode loop is traced."""
  def boom(*a, **k):
    raise AssertionError("compiled before validating")
  monkeypatch.setattr(token_loop, "decode", boom)
  monkeypatch.setattr(adadec, "decode", boom)


LM = BigramLM(vocab_size=10, max_positions=64)
TABLE = np.zeros((10, 10), np.float32)


@pytest.mark.parametrize("kw,prompts,match", [
    (dict(max_cache_len=16, max_new_tokens=8), [[1] * 12], "exceeds the KV cache"),
    (dict(max_new_tokens=60), [[1] * 10], "exceeds the model's context"),
    (dict(), [[]], "empty"),
    (dict(), [], "no prompts"),
    (dict(), [[1, 2, 10]], "outside the vocabulary"),
    (dict(), [[1, -1]], "outside the vocabulary"),
    (dict(strategy="sample", temperature=0.0), [[1]], "temperature"),
    (dict(strategy="sample", temperature=-1.0), [[1]], "temperature"),
    (dict(strategy="sample", top_p=0.0), [[1]], "top_p"),
    (dict(strategy="sample", top_p=1.5), [[1]], "top_p"),
    (dict(strategy="sample", top_k=-3), [[1]], "top_k"),
    (dict(strategy="nucleus_magic"), [[1]], "unknown strategy"),
    (dict(max_new_tokens=0), [[1]], "max_new_tokens"),
    (dict(min_new_tokens=100, max_new_tokens=10), [[1]], "min_new_tokens"),
    (dict(repetition_penalty=0.0), [[1]], "repetition_penalty"),
    (dict(strategy="sample", min_p=2.0), [[1]], "min_p"),
    (dict(top_pp=0.9), [[1]], "did you mean 'top_p'"),
    (dict(top_p=0.9), [[1]], "top_p does not apply to strategy 'greedy'"),
    (dict(num_beams=4), [[1]], "num_beams does not apply to strategy 'greedy'"),
    (dict(strategy="sample", diversity_penalty=0.5), [[1]], "diversity_penalty does not apply"),
    (dict(strategy="speculative", drafter="prompt_lookup", tree_budget=4), [[1]],
     "tree_budget does not apply to drafter 'prompt_lookup'"),
    (dict(strategy="speculative", drafter="eagle", eagle_draft_vocab=-1), [[1]],
     "eagle_draft_vocab must be an integer >= 0"),
    (dict(strategy="adadec", lookahead_candidates=0), [[1]],
     "lookahead_candidates must be an integer >= 1"),
    (dict(strategy="adadec", lookahead_candidates=11, max_new_tokens=8), [[1]],
     "lookahead_candidates=11 exceeds the vocabulary of 10 tokens"),
    (dict(strategy="adadec", lookahead_steps=0), [[1]], "lookahead_steps must be an integer >= 1"),
    (dict(strategy="adadec", lookahead_weight=0.0), [[1]], "lookahead_weight must be a number > 0"),
    (dict(strategy="adadec", lookahead_weight=-1.0), [[1]], "lookahead_weight"),
    (dict(strategy="adadec", entropy_threshold=float("nan")), [[1]],
     "entropy_threshold must be a number of nats"),
    (dict(strategy="adadec", lookahead_step=2), [[1]], "did you mean 'lookahead_steps'"),
    (dict(entropy_threshold=1.0), [[1]], "entropy_threshold does not apply to strategy 'greedy'"),
    (dict(strategy="sjd"), [[1]], "generates images"),
    # sampled speculative decoding is not deterministic: the message must not say it is
    (dict(strategy="speculative", do_sample=True, num_return_sequences=2), [[1]],
     "^num_return_sequences does not apply to strategy 'speculative' \\(it is a field of "
     "sample, beam, diverse_beam, superposed, soft_thinking, scmoe\\)$"),
])
def test_generate_rejects(no_compile, kw, prompts, match):
  with pytest.raises(GenerationError, match=match):
    run_config(LM, TABLE, prompts, cfg(**kw), [1], 0)


@pytest.mark.parametrize("slots", [-1, 2.5, "32"])
def test_generate_rejects_bad_prompt_slots(no_compile, slots):
  with pytest.raises(GenerationError, match="prompt_slots must be an integer >= 0"):
    run_config(LM, TABLE, [[1, 2]], cfg(max_new_tokens=8), [1], 0, prompt_slots=slots)


def test_unknown_model_rejected_before_loading(monkeypatch):
  monkeypatch.setattr(cli, "load", lambda c: (_ for _ in ()).throw(AssertionError("loaded")))
  with pytest.raises(GenerationError, match="unknown model"):
    cli.run(cfg(model="no-such-model-7b"), "hi", None, None)


def test_unknown_strategy_rejected_before_loading(monkeypatch):
  monkeypatch.setattr(cli, "load", lambda c: (_ for _ in ()).throw(AssertionError("loaded")))
  with pytest.raises(GenerationError, match="unknown strategy"):
    cli.run(cfg(strategy="beam_me_up"), "hi", None, None)


def _with_mesh(data, model, **kw):
  c = cfg(**kw)
  c.mesh.data, c.mesh.model = data, model
  return c


@pytest.mark.parametrize("config,match", [
    (cfg(matmul_kernel="pakced"), "did you mean 'packed'"),
    (cfg(matmul_kernel="packed", numerics="bf16"), "computes in float32"),
    (cfg(numerics="layercats"), "did you mean 'layercast'"),
    (_with_mesh(2, 1, matmul_kernel="packed"), "one CPU device"),
])
def test_bad_matmul_kernel_rejected_before_loading(monkeypatch, config, match):
  monkeypatch.setattr(cli, "load", lambda c: (_ for _ in ()).throw(AssertionError("loaded")))
  with pytest.raises(GenerationError, match=match):
    cli.run(config, "hi", None, None)


def test_bad_jsonl_lines(tmp_path):
  f = tmp_path / "in.jsonl"
  for text, match in [('{"prompt": 3}', "must be a string"),
                      ('{"prompt_ids": [1, "a"]}', "list of integers"),
                      ('{"foo": 1}', "exactly one of"),
                      ("not json", "not valid JSON")]:
    f.write_text(text + "\n")
    with pytest.raises(ValueError, match=match):
      cli.read_requests(str(f))
  with pytest.raises(FileNotFoundError):
    cli.read_requests(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("argv,match", [
    (["--eagle_window", "-1"], "--eagle_window must be >= 1"),
    (["--eagle_window", "0"], "--eagle_window must be >= 1"),
    (["--eagle_tree_budget", "-2"], "--eagle_tree_budget must be >= 0"),
    (["--num_images", "15"], "multiple of 10"),
    (["--runs", "0"], "--runs must be >= 1"),
])
def test_bench_images_rejects_bad_arguments(argv, match, capsys):
  """The image benchmark refuses bad arguments before loading any model."""
  from benchmarks import bench_images
  with pytest.raises(SystemExit):
    bench_images.main(argv)
  assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--scan_layers", "2"], "--scan_layers must be 0 or 1"),
    (["--matmul_kernel", "pakced"], "invalid choice"),
])
def test_bench_speculative_rejects_bad_layout(argv, match, capsys):
  """The speculative benchmark refuses a bad layout flag before loading a model."""
  from benchmarks import bench_speculative
  with pytest.raises(SystemExit):
    bench_speculative.main(argv)
  assert match in capsys.readouterr().err


@pytest.mark.parametrize("module,argv,match", [
    ("bench_decode", ["--batch", "1"], "--batch must be >= 2"),
    ("bench_decode", ["--runs", "0"], "--runs, --new-tokens and --step-iters >= 1"),
    ("step_profile", ["--new-tokens", "1"], "--new-tokens must be >= 2"),
    ("step_profile", ["--fused", "2"], "invalid choice"),
    ("step_profile", ["--packed", "2"], "invalid choice"),
])
def test_decode_benchmarks_reject_bad_arguments(module, argv, match, capsys):
  """The decode-speed benchmarks refuse bad arguments before loading any model."""
  import importlib
  bench = importlib.import_module(f"benchmarks.{module}")
  with pytest.raises(SystemExit):
    bench.main(argv)
  assert match in capsys.readouterr().err

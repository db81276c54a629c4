"""The HumanEval benchmark (benchmarks/eval_humaneval.py): completion cutting, scoring in the
sandbox, its arguments, and a two-problem run on a tiny model."""
from __future__ import annotations

import json
import types

import jax
import pytest

from benchmarks import eval_humaneval as ee
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params


@pytest.mark.parametrize("text,cut", [
    ("    return x\n", "    return x\n"),
    ("    return x\n\ndef helper():\n    pass\n", "    return x\n"),
    ("    return x\nclass A:\n    pass", "    return x"),
    ("    return x\n\n\nif __name__ == '__main__':\n    main()", "    return x\n\n"),
    ("    return x\nprint(f(1))\n", "    return x"),
    ("    return x\n# tests\nassert f(1)\n", "    return x"),
    ("    # an indented comment stays\n    def inner():\n        return 1\n    return inner()\n",
     "    # an indented comment stays\n    def inner():\n        return 1\n    return inner()\n"),
    ("    if a:\n        print(a)\n    return a\n", "    if a:\n        print(a)\n    return a\n"),
    ("\ndef f():\n    pass", ""),
])
def test_truncate_completion(text, cut):
  assert ee.truncate_completion(text) == cut


def test_program_layout():
  task = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n",
          "entry_point": "f"}
  assert ee.program(task, "    return x + 1\n") == (
      "def f(x):\n    return x + 1\n\ndef check(c):\n    assert c(1) == 2\n\ncheck(f)\n")


class ByteTokenizer:
  """Bytes as tokens, with id 0 standing for "<|endoftext|>" (a special token)."""
  eos_id, pad_id, bos_id = 0, 0, None
  special_ids = frozenset({0})

  def encode(self, text, add_special_tokens=True):
    if text == "<|endoftext|>":
      return [0]
    return list(text.encode("utf-8"))

  def decode(self, ids, skip_special_tokens=False):
    ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
    return bytes(ids).decode("utf-8", errors="replace")


def test_eos_ids_adds_the_end_of_text_spellings():
  class Tok(ByteTokenizer):
    eos_id = 7
  assert ee.eos_ids(Tok()) == (7, 0)
  assert ee.eos_ids(ByteTokenizer()) == (0,)


def _args(**kw):
  base = dict(model="m", methods="adadec", entropy_threshold=None, threshold_file="")
  base.update(kw)
  return types.SimpleNamespace(**base)


def test_threshold_sources(tmp_path):
  assert ee.load_threshold(_args(entropy_threshold=0.9)) == (0.9, "--entropy_threshold")
  path = tmp_path / "t.json"
  with pytest.raises(ee.EvalError, match="train.adadec_threshold --model m"):
    ee.load_threshold(_args(threshold_file=str(path)))
  path.write_text(json.dumps({"model": "other", "tau": 1.2}))
  with pytest.raises(ee.EvalError, match="fitted for model 'other'"):
    ee.load_threshold(_args(threshold_file=str(path)))
  path.write_text(json.dumps({"model": "m", "tau": 1.2}))
  assert ee.load_threshold(_args(threshold_file=str(path))) == (1.2, str(path))
  # an explicit flag wins over the file
  assert ee.load_threshold(_args(threshold_file=str(path), entropy_threshold=0.5))[0] == 0.5


def test_missing_adadec_strategy_is_a_clear_error(monkeypatch):
  real = ee.importlib.import_module

  def no_adadec(name, *a):
    if name == "decoding.adadec":
      raise ImportError("No module named 'decoding.adadec'")
    return real(name, *a)
  monkeypatch.setattr(ee.importlib, "import_module", no_adadec)
  with pytest.raises(ee.EvalError, match="--methods greedy,beam"):
    ee.method_settings("adadec", 16, 1.0)


@pytest.mark.parametrize("argv,message", [
    (["--methods", "greedy,nucleus"], "--methods must name distinct methods"),
    (["--methods", "greedy,greedy"], "--methods must name distinct methods"),
    (["--limit", "-1"], "--limit must be >= 0"),
    (["--methods", "adadec", "--threshold_file", "/nonexistent/t.json"], "needs an entropy"),
    (["--model", "no-such-model", "--methods", "greedy"], "unknown model 'no-such-model'"),
])
def test_bad_arguments_error_before_any_model_load(argv, message, monkeypatch, capsys):
  monkeypatch.setattr(ee, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
  with pytest.raises(SystemExit) as e:
    ee.main(argv + ["--readme", ""])
  assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  return ee.load_tasks(6, str(tmp_path_factory.mktemp("tfds")))


@pytest.mark.data
def test_canonical_solutions_pass_and_wrong_completions_fail(tasks):
  assert [t["task_id"] for t in tasks] == [f"HumanEval/{i}" for i in range(6)]
  good = ee.check_completions(tasks, [t["canonical_solution"] for t in tasks])
  assert [r.status for r in good] == ["passed"] * 6, [r.stderr for r in good]
  wrong = ee.check_completions(tasks[:3], ["    return None\n"] * 3)
  assert all(r.status == "failed" for r in wrong)
  assert {r.exception for r in wrong} <= {"AssertionError", "TypeError"}
  # pass@1 bookkeeping over a mix: 2 of 3 solved
  mixed = ee.check_completions(tasks[:3], [tasks[0]["canonical_solution"], "    return None\n",
                                           tasks[2]["canonical_solution"]])
  assert ee.pass_at_1([r.passed for r in mixed]) == pytest.approx(2 / 3)


@pytest.mark.data
def test_cutting_rescues_a_completion_that_runs_on(tasks):
  """A right body followed by a main block that fails: it fails as generated and passes once
  cut at the top-level stop sequence."""
  task = tasks[2]
  generated = (task["canonical_solution"]
               + "\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n")
  assert ee.check_completions([task], [generated])[0].status == "failed"
  cut = ee.truncate_completion(generated)
  assert cut.strip() == task["canonical_solution"].strip()
  assert ee.check_completions([task], [cut])[0].passed


@pytest.mark.data
def test_two_problems_on_a_tiny_model(tmp_path, monkeypatch):
  """The whole command, greedy and beam, on a random byte-level model: the JSON, the table
  between its markers, and a rerun that resumes without generating again and says so."""
  cfg = tiny_config(vocab_size=256, max_position_embeddings=1024)
  model = types.SimpleNamespace(lm=TransformerLM(cfg), tokenizer=ByteTokenizer(), name="tiny",
                                params=init_params(cfg, jax.random.PRNGKey(0)), sha256=None)
  monkeypatch.setattr(ee, "load_model", lambda name: model)
  readme = tmp_path / "BENCH.md"
  readme.write_text("# Benchmarks\n")
  argv = ["--model", str(tmp_path), "--methods", "greedy,beam", "--limit", "2",
          "--max_new_tokens", "6", "--work_dir", str(tmp_path / "runs"),
          "--out", str(tmp_path / "he.json"), "--readme", str(readme),
          "--data_dir", str(tmp_path / "tfds")]
  result = ee.main(argv)
  saved = json.loads((tmp_path / "he.json").read_text())
  assert saved == json.loads(json.dumps(result))
  assert saved["problems"] == 2 and list(saved["methods"]) == ["greedy", "beam"]
  for m in saved["methods"].values():
    assert m["problems"] == 2 and m["passed"] == 0 and m["pass@1"] == 0.0
    assert 0 < m["new_tokens"] <= 12 and m["tokens_per_s"] > 0
    assert m["lookahead_share"] is None
  assert set(saved["per_task"]) == {"HumanEval/0", "HumanEval/1"}
  text = readme.read_text()
  marker = f"humaneval_{tmp_path.name}"
  assert f"<!-- {marker}:start -->" in text and "| greedy | 0.000 | 0/2 |" in text

  monkeypatch.setattr(ee, "generate", lambda *a, **k: pytest.fail("generated again"))
  again = ee.main(argv)
  assert again["methods"]["greedy"]["new_tokens"] == saved["methods"]["greedy"]["new_tokens"]
  assert saved["resumed_rows"] == 0 and again["resumed_rows"] == 2
  assert "this invocation" not in text
  assert "it resumed 2 of 2 problems decoded by earlier invocations" in readme.read_text()


@pytest.mark.data
def test_adadec_on_a_tiny_model(tmp_path, monkeypatch):
  """With tau = -inf AdaDec looks ahead at every step, and the benchmark reports that share."""
  pytest.importorskip("decoding.adadec")
  cfg = tiny_config(vocab_size=256, max_position_embeddings=1024)
  model = types.SimpleNamespace(lm=TransformerLM(cfg), tokenizer=ByteTokenizer(), name="tiny",
                                params=init_params(cfg, jax.random.PRNGKey(0)), sha256=None)
  monkeypatch.setattr(ee, "load_model", lambda name: model)
  result = ee.main(["--model", str(tmp_path), "--methods", "adadec,greedy", "--limit", "1",
                    "--max_new_tokens", "4", "--entropy_threshold=-inf",
                    "--work_dir", str(tmp_path / "runs"), "--out", str(tmp_path / "he.json"),
                    "--readme", "", "--data_dir", str(tmp_path / "tfds")])
  ada = result["methods"]["adadec"]
  assert result["entropy_threshold"] == float("-inf")
  assert ada["lookahead_share"] == 1.0 and result["methods"]["greedy"]["lookahead_share"] is None

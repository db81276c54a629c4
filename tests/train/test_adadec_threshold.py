"""AdaDec threshold learning (train/adadec_threshold.py) and its code corpus (train/code_corpus.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import ForwardOutput, init_params
from train import adadec_threshold as at
from train import code_corpus

# ------------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("w,b,p", [(-2.631, 1.742, 0.15), (-0.5, 3.0, 0.5), (-7.0, -1.0, 0.99),
                                   (-1.0, 0.0, 0.01)])
def test_threshold_puts_the_fitted_probability_at_p_star(w, b, p):
  tau = at.threshold(w, b, p)
  assert at.sigmoid(w * tau + b) == pytest.approx(p, rel=1e-12)
  # above tau the fitted P(rank1) is below p*: those are the steps AdaDec looks ahead at
  assert at.sigmoid(w * (tau + 1e-3) + b) < p < at.sigmoid(w * (tau - 1e-3) + b)


def test_reference_statistics_give_the_cards_tau():
  """The reference code's Qwen3-0.6B fit, w = -2.631, b = 1.742, p* = 0.15 -> 1.321."""
  assert at.threshold(-2.631, 1.742, 0.15) == pytest.approx(1.321, abs=1e-3)


def test_threshold_refuses_a_non_negative_slope():
  with pytest.raises(at.ThresholdError, match="w = 0.5"):
    at.threshold(0.5, 0.0, 0.5)


def test_logistic_fit_recovers_known_parameters():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 4, 200_000)
  y = rng.random(x.size) < at.sigmoid(-2.6 * x + 1.7)
  w, b = at.fit_logistic(x, y)
  assert w == pytest.approx(-2.6, abs=0.05) and b == pytest.approx(1.7, abs=0.05)
  # the maximum likelihood: the gradient vanishes
  p = at.sigmoid(w * x + b)
  assert abs(np.sum(y - p)) < 1e-5 * x.size and abs(np.sum((y - p) * x)) < 1e-5 * x.size


def test_logistic_fit_errors():
  with pytest.raises(at.ThresholdError, match="both classes"):
    at.fit_logistic(np.arange(5.0), np.ones(5))
  with pytest.raises(at.ThresholdError, match="separable"):
    at.fit_logistic(np.arange(10.0), np.arange(10) < 5)


def test_balanced_indices():
  y = np.array([1] * 70 + [0] * 30, bool)
  keep = at.balanced_indices(y, np.random.default_rng(0))
  assert y[keep].sum() == 30 and (~y[keep]).sum() == 30 and len(set(keep)) == 60


def test_choose_probability_is_the_best_of_the_grid():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 4, 2000)
  y = rng.random(x.size) < at.sigmoid(-2 * x + 2)
  p, acc = at.choose_probability(-2.0, 2.0, x, y)
  accs = [np.mean((at.sigmoid(-2 * x + 2) >= q) == y) for q in at.P_GRID]
  assert acc == pytest.approx(max(accs)) and p == at.P_GRID[int(np.argmax(accs))]


def test_fit_threshold_on_synthetic_steps():
  """Functions whose steps follow a known P(rank1 | H): the fit finds the slope, tau
  satisfies sigmoid(w tau + b) = p*, and the counts and diagnostics add up."""
  rng = np.random.default_rng(2)
  ent, rank = [], []
  for _ in range(400):
    h = rng.gamma(1.5, 0.6, rng.integers(20, 60))
    top1 = rng.random(h.size) < at.sigmoid(-2.5 * h + 2.0)
    ent.append(h.astype(np.float32))
    rank.append(np.where(top1, 0, 1 + rng.poisson(2 * h)))
  fit = at.fit_threshold(ent, rank, seed=0)
  assert fit["w"] == pytest.approx(-2.5, abs=0.15)
  assert at.sigmoid(fit["w"] * fit["tau"] + fit["b"]) == pytest.approx(fit["p_star"])
  c = fit["counts"]
  assert c["functions"] == 400 and c["heldout_functions"] == 80
  assert c["steps"] == sum(len(e) for e in ent) == c["train_steps"] + c["heldout_steps"]
  assert c["balanced_train_steps"] == 2 * min(c["train_rank1_steps"],
                                              c["train_steps"] - c["train_rank1_steps"])
  all_h = np.concatenate(ent)
  assert fit["share_steps_entropy_at_least_tau"] == pytest.approx(np.mean(all_h >= fit["tau"]))
  assert fit["spearman_rho_entropy_rank"] > 0.3  # more entropy, worse rank
  assert fit["heldout_accuracy"] >= fit["heldout_majority_accuracy"]
  json.dumps(fit)  # JSON-able


# ---------------------------------------------------------------------- teacher forcing


def _log_softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_teacher_forced_entropy_matches_a_float64_reference():
  """On a tiny transformer, ragged rows scored in batches with padding: each step's entropy
  equals the float64 entropy of the logits of the row run alone, and rank 0 is the argmax."""
  cfg = tiny_config(vocab_size=37)
  lm = TransformerLM(cfg)
  params = jax.tree.map(lambda x: 3 * x, init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, 37, n)) for n in (3, 9, 1, 14, 6)]
  conts = [list(rng.integers(0, 37, n)) for n in (5, 1, 12, 7, 20)]
  for _ in range(4):  # the first row continues greedily: rank 0 at those steps
    seq = jnp.asarray([prompts[0] + conts[0]], jnp.int32)
    logits = lm(params, seq, jnp.arange(seq.shape[1])[None], None).logits
    conts[0].append(int(jnp.argmax(logits[0, -1])))
  ent, rank = at.teacher_force(lm, params, prompts, conts, batch_size=2)
  for p, c, e, r in zip(prompts, conts, ent, rank):
    seq = jnp.asarray([p + c], jnp.int32)
    logits = lm(params, seq, jnp.arange(seq.shape[1])[None], None).logits[0]
    logp = _log_softmax64(logits)[len(p) - 1:len(p) - 1 + len(c)]
    ref_h = -np.sum(np.exp(logp) * logp, axis=-1)
    assert e.shape == r.shape == (len(c),)
    np.testing.assert_allclose(e, ref_h, rtol=1e-5, atol=1e-6)
    ref_rank = np.sum(logp > logp[np.arange(len(c)), c][:, None], axis=-1)
    np.testing.assert_array_equal(r, ref_rank)
  assert any((r == 0).any() for r in rank) and any((r > 0).any() for r in rank)


def test_teacher_force_errors():
  lm = TransformerLM(tiny_config(vocab_size=37, max_position_embeddings=16))
  params = init_params(lm.config, jax.random.PRNGKey(0))
  with pytest.raises(at.ThresholdError, match="exceeds the model's context of 16"):
    at.teacher_force(lm, params, [[1] * 10], [[2] * 10])


def test_auto_batch_size():
  assert at.auto_batch_size(151_936, 128) == 6  # Qwen2.5's vocabulary
  assert at.auto_batch_size(49_152, 128) == 16  # SmolLM2's, capped
  assert at.auto_batch_size(10**9, 128) == 1


# ------------------------------------------------------------------------ the code corpus

SOURCE = '''\
"""A module."""
import os


def add(a, b):
    """Adds two numbers."""
    total = a + b
    return total


def undocumented(x):
    return x


class Box:
    """A box."""

    @staticmethod
    def make(size,
             color="red"):
        """Makes a box.

        Returns it."""
        # a comment belongs to the body
        return Box()

    def one_line(self): return 1

    def only_doc(self):
        """Nothing else."""

    class Inner:
        async def fetch(self):
            """Fetches."""
            text = """
a string at column 0
"""
            return text


def outer():
    """Has a nested function."""
    def inner():
        """Stays in outer's body."""
        return 1
    return inner
'''


def test_function_extraction():
  got = {e.name: e for e in code_corpus.extract_functions(SOURCE, "/x/mod.py")}
  assert list(got) == ["add", "Box.make", "Box.Inner.fetch", "outer"]
  assert got["add"].prompt == 'def add(a, b):\n    """Adds two numbers."""\n'
  assert got["add"].continuation == "    total = a + b\n    return total\n"
  assert got["add"].file == "mod.py" and got["add"].lineno == 5
  make = got["Box.make"]
  assert make.lineno == 18
  assert make.prompt == ('@staticmethod\ndef make(size,\n         color="red"):\n'
                         '    """Makes a box.\n\n    Returns it."""\n')
  assert make.continuation == "    # a comment belongs to the body\n    return Box()\n"
  fetch = got["Box.Inner.fetch"]
  assert fetch.prompt == 'async def fetch(self):\n    """Fetches."""\n'
  assert fetch.continuation == ('    text = """\na string at column 0\n"""\n'
                                "    return text\n")
  assert got["outer"].continuation == ('    def inner():\n        """Stays in outer\'s body."""'
                                       "\n        return 1\n    return inner\n")
  for name in ("add", "outer"):  # module level: the pair is the function's text
    assert got[name].prompt + got[name].continuation in SOURCE


def test_function_extraction_without_docstrings():
  got = {e.name: e for e in code_corpus.extract_functions(SOURCE, require_docstring=False)}
  assert "undocumented" in got and "Box.one_line" not in got and "Box.only_doc" not in got
  assert got["undocumented"].prompt == "def undocumented(x):\n"
  assert got["undocumented"].continuation == "    return x\n"


def _fake_stdlib(root, version: str, files: dict[str, str]) -> str:
  d = os.path.join(root, f"python{version}")
  os.makedirs(d)
  for name, text in {"ast.py": "", "typing.py": "", **files}.items():
    with open(os.path.join(d, name), "w") as f:
      f.write(text)
  return d


def test_find_stdlib_dir(tmp_path):
  with pytest.raises(code_corpus.SourceError, match="libpython3-stdlib"):
    code_corpus.find_stdlib_dir(str(tmp_path))
  _fake_stdlib(tmp_path, "3.9", {})
  newest = _fake_stdlib(tmp_path, "3.11", {})
  os.makedirs(tmp_path / "python3.12")  # no sources in it: not a candidate
  assert code_corpus.find_stdlib_dir(str(tmp_path)) == newest


def test_collect_functions_skips_unparsable_files(tmp_path):
  d = _fake_stdlib(tmp_path, "3.11", {"good.py": SOURCE, "bad.py": "def f(:\n"})
  examples, skipped = code_corpus.collect_functions(d)
  assert skipped == ["bad.py"] and len(examples) == 4
  with pytest.raises(code_corpus.SourceError, match="does not exist"):
    code_corpus.collect_functions(str(tmp_path / "nowhere"))


@pytest.mark.data
def test_debian_stdlib_sources_are_found():
  """Needs Debian's libpython3-stdlib (the README's test command installs it)."""
  d = code_corpus.find_stdlib_dir()
  examples, _ = code_corpus.collect_functions(d)
  assert len(examples) > 1000
  assert any(e.file == "textwrap.py" and e.name == "dedent" for e in examples)


# -------------------------------------------------------------------------- command line


def _no_load(*args, **kwargs):
  raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("argv,message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "vqvae-fmnist"], "not a language model"),
    (["--model", "smollm2-135m-instruct", "--functions", "1"], "--functions must be >= 2"),
])
def test_bad_arguments_error_before_any_model_load(argv, message, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(at, "load_model", _no_load)
  d = _fake_stdlib(tmp_path, "3.11", {"m.py": SOURCE})
  with pytest.raises(SystemExit) as e:
    at.main(argv + ["--source_dir", d, "--out", str(tmp_path / "o.json")])
  assert e.value.code == 2
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o.json")


def test_missing_source_dir_errors_before_any_model_load(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(at, "load_model", _no_load)
  with pytest.raises(SystemExit):
    at.main(["--model", "smollm2-135m-instruct", "--source_dir", str(tmp_path / "none")])
  assert "does not exist" in capsys.readouterr().err
  monkeypatch.setattr(code_corpus, "DEBIAN_LIB", str(tmp_path))  # no python3.X there
  with pytest.raises(SystemExit):
    at.main(["--model", "smollm2-135m-instruct"])
  err = capsys.readouterr().err
  assert "no Python standard-library sources" in err and "apt-get install" in err


@dataclasses.dataclass(frozen=True)
class BigramLM:
  """Next-byte logits depend only on the current byte (`params[byte]`, a [256, 256] table),
  with the boundary `score_tokens` calls."""
  vocab_size: int = 256
  max_positions: int = 4096

  def __call__(self, params, tokens, positions, cache, logits_at=None, **kw):
    logits = params[tokens]
    if logits_at is not None:
      logits = jnp.take_along_axis(logits, logits_at[:, :, None], axis=1)
    return ForwardOutput(logits=logits, hidden=None, penultimate=None, cache=cache)


class ByteTokenizer:
  pad_id, eos_id = 0, None

  def encode(self, text, add_special_tokens=True):
    return list(text.encode("utf-8"))


def test_command_end_to_end_on_a_bigram_model(tmp_path, monkeypatch):
  """Functions returning strings sampled from a bigram model over letters whose rows range
  from flat to peaked: the command teacher-forces them through the same model, and the
  fitted slope is negative (the flatter the row, the less often its argmax comes next)."""
  rng = np.random.default_rng(0)
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  table = 0.01 * rng.standard_normal((256, 256))  # no exact ties among other bytes
  for i, a in enumerate(letters):
    table[a, letters] += 1.0
    table[a, letters[(i + 1) % 26]] += 0.25 * i  # row i: more peaked as i grows
  table[:, ~np.isin(np.arange(256), letters)] -= 30.0  # from a letter, only letters follow
  probs = np.exp(table - table.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)

  def sample(n):
    out = [rng.choice(letters)]
    for _ in range(n - 1):
      out.append(rng.choice(256, p=probs[out[-1]]))
    return bytes(out).decode()

  src = "\n\n".join(f'def f{i}():\n    """Returns a string."""\n    return "{sample(60)}"\n'
                     for i in range(30))
  d = _fake_stdlib(tmp_path, "3.11", {"m.py": src})
  fake = types.SimpleNamespace(lm=BigramLM(), params=jnp.asarray(table, jnp.float32),
                               tokenizer=ByteTokenizer(), sha256=None)
  monkeypatch.setattr(at, "load_model", lambda name: fake)
  out = tmp_path / "t.json"
  result = at.main(["--model", str(tmp_path), "--source_dir", d, "--functions", "30",
                    "--max_continuation_tokens", "48", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved == json.loads(json.dumps(result))
  assert saved["counts"]["functions"] == 30 and saved["counts"]["steps"] == 30 * 48
  assert saved["w"] < 0 and saved["spearman_rho_entropy_rank"] > 0
  assert at.sigmoid(saved["w"] * saved["tau"] + saved["b"]) == pytest.approx(saved["p_star"])
  assert 0.01 <= saved["p_star"] <= 0.99 and saved["data"]["truncated_continuations"] == 30
  assert saved["command"].startswith("python -m train.adadec_threshold --model ")
  assert len(saved["data"]["functions"]) == 30 and saved["data"]["source_dir"] == d

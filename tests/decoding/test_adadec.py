"""AdaDec (decoding/adadec.py): greedy at tau = inf, the stated score against brute force at
tau = -inf (model runs on every candidate and greedy continuation, in float64 on the host),
the entropy against float64, batch independence, the code-stop state machine against the
reference's string checks, the lookahead counters and the command line. Tiny random
transformers, a few seconds each."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from decoding import adadec
from decoding import generate as cli
from decoding.adadec import AdaDec, code_start, code_step, code_tables
from decoding.cli import settings_from_config
from decoding.greedy import Greedy
from decoding.runner import generate
from models.config import tiny_config
from models.lm import LoadedModel, TransformerLM
from models.transformer import init_params
from tests import REPO as ROOT
from tests.helpers import target

INF = math.inf
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15], [3, 3]]
# Ragged prompts, rows that end (EOS = 16 is a frequent greedy token of this model) and a
# penalty, so the processed distribution is not the raw one.
RUN = dict(max_new_tokens=10, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def tiny():
  c = tiny_config(vocab_size=40, num_layers=2)
  # Scaled up from the initialization's 0.02 so that greedy does not just repeat a token.
  params = jax.tree.map(lambda x: 8.0 * x, init_params(c, jax.random.PRNGKey(0)))
  return target(TransformerLM(c), params, [16], 0)


@dataclasses.dataclass(frozen=True)
class PieceTokenizer:
  """Token id -> a fixed text piece; ids 0 (pad) and 1 (EOS) are special (decode to "" when
  skipped). Pieces with newlines, indents and unindented text make the code stops fire."""
  pieces: tuple = ("<pad>", "<eos>", "\n", "    ", "x", " y", "\n\n", "a\n", "\tb", "=",
                   "\n  ", " \n")
  eos_id, pad_id, bos_id, chat_template = 1, 0, None, None

  def __len__(self):
    return len(self.pieces)

  def decode(self, ids, skip_special_tokens=False):
    return "".join("" if skip_special_tokens and int(i) in (0, 1) else self.pieces[int(i)]
                   for i in ids)

  def encode(self, text, add_special_tokens=True):
    raise NotImplementedError("the tests give prompt_ids")


def reference_stop(text: str) -> bool:
  """The reference's rollout stop on the generated text (SYSUSELab/AdaDec, llm/generator.py,
  `get_lookahead_score`), as it is written there."""
  lines = text.split("\n")
  consecutive_empty = len(lines) >= 4 and all(line.strip() == "" for line in lines[-4:])
  all_lines_valid = all(not line or line.startswith((" ", "\t")) for line in lines)
  return consecutive_empty or not all_lines_valid


def run_machine(sequences: list[list[str]]) -> np.ndarray:
  """[R, T] bool: stopped (an unindented line so far, or 4 trailing blank lines) after each
  token, for R token-string sequences of equal length T, through `code_tables`/`code_step`."""
  vocab = sorted({t for seq in sequences for t in seq})
  table = jnp.asarray(code_tables(vocab))
  ids = np.asarray([[vocab.index(t) for t in seq] for seq in sequences])
  fresh, blank = code_start((len(sequences),))
  violated = jnp.zeros((len(sequences),), bool)
  out = []
  for j in range(ids.shape[1]):
    fresh, blank, v = code_step(table, fresh, blank, jnp.asarray(ids[:, j]))
    violated = violated | v
    out.append(np.asarray(violated | (blank >= adadec.MAX_BLANK)))
  return np.stack(out, axis=1)


# ------------------------------------------------------------------------ limits


def test_infinite_threshold_is_greedy_token_for_token_on_a_ragged_batch(tiny):
  greedy = generate(tiny, PROMPTS, Greedy(**RUN))
  ada = generate(tiny, PROMPTS, AdaDec(entropy_threshold=INF, **RUN))
  assert any(g.finished for g in greedy) and not all(g.finished for g in greedy)
  for g, a in zip(greedy, ada):
    assert a.output_ids == g.output_ids and a.finished == g.finished
    np.testing.assert_array_equal(a.token_logprobs, g.token_logprobs)
    np.testing.assert_array_equal(a.processed_logprobs, g.processed_logprobs)
    assert a.gnll == g.gnll  # tau = inf is greedy decoding, so the G-NLL is reported


@pytest.mark.parametrize("threshold,share", [(INF, 0.0), (-INF, 1.0)])
def test_lookahead_share_is_zero_at_inf_and_one_at_minus_inf(tiny, threshold, share):
  for g in generate(tiny, PROMPTS, AdaDec(entropy_threshold=threshold, **RUN)):
    assert g.extras["lookahead_share"] == share
    assert g.extras["lookahead_steps_taken"] == share * len(g.output_ids)
  row = generate(tiny, PROMPTS, AdaDec(entropy_threshold=threshold, **RUN))[0].to_json()
  assert row["lookahead_share"] == share and "lookahead_steps_taken" in row  # in the JSONL


def test_lookahead_fires_exactly_at_steps_whose_entropy_reaches_the_threshold(tiny):
  tau = 1.0
  for g in generate(tiny, PROMPTS, AdaDec(entropy_threshold=tau, **RUN)):
    h = np.asarray(g.token_entropy)  # the raw distribution's entropy at each step
    assert (np.sum(h >= tau + 1e-5) <= g.extras["lookahead_steps_taken"]
            <= np.sum(h >= tau - 1e-5)), (h, g.extras)
    assert g.extras["lookahead_share"] == pytest.approx(
        g.extras["lookahead_steps_taken"] / len(g.output_ids))


def test_step_entropy_matches_a_float64_reference():
  rng = np.random.RandomState(0)
  logits = rng.randn(6, 97).astype(np.float32) * np.asarray([0.1, 1, 3, 10, 30, 3])[:, None]
  logits[5, ::3] = -np.inf  # banned tokens add nothing
  x = logits.astype(np.float64)
  logp = x - np.max(x, -1, keepdims=True)
  logp = logp - np.log(np.sum(np.exp(logp), -1, keepdims=True))
  p = np.exp(logp)
  want = -np.sum(p * np.where(p > 0, logp, 0.0), -1)
  for invariant in (False, True):
    got = np.asarray(jax.jit(adadec.step_entropy, static_argnums=1)(jnp.asarray(logits),
                                                                     invariant))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------ brute force


@pytest.fixture(scope="module")
def toy():
  """Vocabulary of 12 (`PieceTokenizer`), EOS = 1."""
  c = tiny_config(vocab_size=12, num_layers=2, max_position_embeddings=64)
  params = jax.tree.map(lambda x: 6.0 * x, init_params(c, jax.random.PRNGKey(3)))
  return TransformerLM(c), params


def next_logp_fn(lm, params, T: int = 48):
  """seq -> float64 log-softmax of the model's next-token logits after `seq` (one full causal
  forward pass, no decoding loop, no KV cache reuse)."""
  @jax.jit
  def logits(tokens, n):
    out = lm(params, tokens[None], jnp.arange(T, dtype=jnp.int32)[None], lm.init_cache(1, T),
             logits_at=jnp.reshape(n - 1, (1, 1)))
    return out.logits[0, 0]

  def next_logp(seq):
    tokens = np.zeros((T,), np.int32)
    tokens[:len(seq)] = seq
    x = np.asarray(logits(jnp.asarray(tokens), len(seq)), np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())
  return next_logp


def code_stopped(main_text: str, text: str) -> bool:
  """The stated rollout stop on the generated text `text` (main text then candidate and
  rollout): 4 trailing blank lines, or a non-empty line starting with neither a space nor a
  tab whose first character the candidate or the rollout wrote."""
  lines = text.split("\n")
  if len(lines) >= 4 and all(line.strip() == "" for line in lines[-4:]):
    return True
  offset = 0
  for line in lines:
    if line and offset >= len(main_text) and line[0] not in " \t":
      return True
    offset += len(line) + 1
  return False


def brute_force_choice(next_logp, prompt, gen, tok, K, L, eos, stats):
  """(scores [K] of the top-K candidates, the candidates) at the step after prompt + gen."""
  lp = next_logp(prompt + gen)
  cands = sorted(range(len(lp)), key=lambda v: (-lp[v], v))[:K]
  main_text = tok.decode(gen, skip_special_tokens=True) if tok else ""
  scores = []
  for c in cands:
    seq, S, ell, stopped = [c], 0.0, 0, c == eos
    stats["eos"] += stopped
    while not stopped and ell < L:
      q = next_logp(prompt + gen + seq)
      r = int(np.argmax(q))
      S, ell = S + q[r], ell + 1
      seq.append(r)
      if r == eos:
        stopped = True
        stats["eos"] += 1
      elif tok and code_stopped(main_text, tok.decode(gen + seq, skip_special_tokens=True)):
        stopped = True
        stats["code"] += 1
    stats["early"] += stopped and ell < L
    scores.append((lp[c] + S) / (ell + 1))
  return np.asarray(scores), cands


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_minus_inf_threshold_picks_the_brute_force_argmax_of_the_stated_score(toy,
                                                                             with_tokenizer):
  lm, params = toy
  tok = PieceTokenizer() if with_tokenizer else None
  K, L, N, EOS = 3, 3, 8, 1
  prompts = [[2, 3, 4], [9], [5, 6, 7, 8, 10, 11], [3, 3], [7, 2], [4, 9, 5, 11, 2]]
  s = AdaDec(entropy_threshold=-INF, lookahead_candidates=K, lookahead_steps=L,
             max_new_tokens=N)
  out = generate(target(lm, params, [EOS], 0, tokenizer=tok), prompts, s)
  next_logp = next_logp_fn(lm, params)
  stats = {"eos": 0, "code": 0, "early": 0}
  checked = 0
  for p, g in zip(prompts, out):
    assert g.extras["lookahead_share"] == 1.0
    for t, chosen in enumerate(g.output_ids):
      scores, cands = brute_force_choice(next_logp, p, g.output_ids[:t], tok, K, L, EOS, stats)
      best = int(np.argmax(scores))
      near = np.abs(scores - scores[best]) < 1e-4
      if near.sum() == 1:  # no near-tie that float32 could break the other way
        assert chosen == cands[best], (p, t, scores, cands, chosen)
        checked += 1
      else:
        assert chosen in [c for c, n in zip(cands, near) if n]
  assert checked >= 0.9 * sum(len(g.output_ids) for g in out)
  # the rollouts stopped early, at EOS and (with a tokenizer) on the code heuristics
  assert stats["eos"] > 0 and stats["early"] > 0
  assert (stats["code"] > 0) == with_tokenizer


def test_a_row_chooses_the_same_alone_and_in_a_batch(tiny):
  s = AdaDec(entropy_threshold=-INF, **RUN)
  batch = generate(tiny, PROMPTS, s)
  for p, b in zip(PROMPTS, batch):
    alone = generate(tiny, [p], s)[0]
    assert alone.output_ids == b.output_ids
    # the same tokens; the log-probs only up to the batch shape's float rounding (this model
    # is not in the batch-invariant mode)
    np.testing.assert_allclose(alone.token_logprobs, b.token_logprobs, atol=1e-4)


# ------------------------------------------------------------------ code stops


@pytest.mark.parametrize("tokens,stops", [
    # indented lines go on
    (["    return x", "\n", "    y = 1", "\n"], [False] * 4),
    # an unindented line stops, as soon as its first character is written
    (["    a = 1", "\n", "print", "(a)"], [False, False, True, True]),
    # a tab indents; whitespace-only lines are blank, not unindented
    (["\tif a:", "\n", "\t\treturn", "\n  \n"], [False] * 4),
    # 4 consecutive blank lines (counting the one being written) stop
    (["    a", "\n\n", "\n", "\n"], [False, False, False, True]),
    (["    a", "\n", " ", "\n", "\n", "\n"], [False] * 5 + [True]),
    # blank lines interrupted by text do not
    (["    a", "\n\n", "  b", "\n\n"], [False] * 4),
    # newlines inside a token: a line started inside it that is unindented stops
    (["    a", "\nb = 2"], [False, True]),
    (["    a\n    b\n", "    c"], [False, False]),
    (["    a\n\n\n\n"], [True]),
    # text continuing a line never starts one
    (["  ", "x", "y"], [False, False, False]),
    # the generated text starts at a line start
    (["def"], [True]),
    # empty (special) tokens change nothing
    (["", "    a", "", "\n", "", "z"], [False, False, False, False, False, True]),
])
def test_code_stop_state_machine_on_hand_written_tokens(tokens, stops):
  assert [reference_stop("".join(tokens[:j + 1])) for j in range(len(tokens))] == stops
  assert run_machine([tokens])[0].tolist() == stops


def test_code_stop_state_machine_matches_the_reference_checks_on_random_tokens():
  alphabet = ["\n", "\n\n", "  ", "\t", "x", " y", "a\n", "\n b", " \n", "\nc\n", "\n\n\n",
              "", "  \n\t\n", "z = 1", "\r\n"]
  rng = np.random.RandomState(0)
  seqs = [[alphabet[i] for i in rng.randint(len(alphabet), size=8)] for _ in range(400)]
  got = run_machine(seqs)
  want = np.asarray([[reference_stop("".join(s[:j + 1])) for j in range(8)] for s in seqs])
  np.testing.assert_array_equal(got, want)
  assert 0.1 < want.mean() < 0.9  # both outcomes are exercised


def test_token_texts_skip_special_tokens():
  pieces = PieceTokenizer().pieces
  # ids 0 and 1 are special; ids past the tokenizer's vocabulary (the model's padding rows): ""
  assert adadec.token_texts(PieceTokenizer(), 14) == ["", ""] + list(pieces[2:]) + ["", ""]


# ------------------------------------------------------------------ command line


def parse(*overrides) -> object:
  """The config `python -m decoding.generate` builds from these flags."""
  path = os.path.join(ROOT, "configs", "generate.py")
  argv = ["generate", f"--config={path}", *overrides]
  fv = flags.FlagValues()  # the override flags are read from argv when the flag is defined
  config_flags.DEFINE_config_file("config", path, flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_threshold_flags_parse_inf_and_map_to_the_settings():
  cfg = parse("--config.strategy=adadec", "--config.entropy_threshold=inf",
              "--config.lookahead_candidates=2", "--config.lookahead_steps=4",
              "--config.lookahead_weight=0.5", "--config.code_stops=False")
  assert settings_from_config(cfg) == AdaDec(entropy_threshold=INF, lookahead_candidates=2,
                                             lookahead_steps=4, lookahead_weight=0.5,
                                             code_stops=False)
  assert settings_from_config(parse("--config.strategy=adadec",
                                    "--config.entropy_threshold=-inf")).entropy_threshold == -INF


def test_cli_runs_adadec_on_a_tiny_model(tmp_path, monkeypatch, toy):
  lm, params = toy
  model = LoadedModel("toy", lm, params, PieceTokenizer(), False, None)
  monkeypatch.setattr(cli, "load", lambda cfg: (model, None))
  inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  inp.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in ([2, 3, 4], [9])))
  cfg = parse("--config.strategy=adadec", "--config.entropy_threshold=-inf",
              "--config.lookahead_candidates=3", "--config.lookahead_steps=3",
              "--config.max_new_tokens=8")
  cli.run(cfg, None, str(inp), str(outp), err=io.StringIO())
  rows = [json.loads(line) for line in outp.read_text().splitlines()]
  assert len(rows) == 2
  for r in rows:
    assert r["lookahead_share"] == 1.0 and r["lookahead_steps_taken"] == len(r["output_ids"])
    assert r["text"] == PieceTokenizer().decode(r["output_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("flag,message", [
    ("--config.entropy_threshold=nan", "error: entropy_threshold must be a number"),
    ("--config.lookahead_candidates=0", "error: lookahead_candidates must be an integer >= 1"),
    ("--config.lookahead_stepz=3", "did you mean 'lookahead_steps'"),
])
def test_cli_reports_bad_adadec_fields_in_one_line(flag, message):
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.strategy=adadec", flag, "--prompt=hi"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], proc.stderr

"""The strategy-speed benchmark (benchmarks/bench_strategies.py): its argument and threshold
checks, soft thinking's thinking budget, and the whole table on a random byte-level model."""
from __future__ import annotations

import json
import random
import types

import jax
import pytest

from benchmarks import bench_strategies as bs
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params


def test_learned_threshold_reads_the_fit_and_names_the_command(tmp_path):
  path = tmp_path / "t.json"
  with pytest.raises(ValueError, match="python -m train.adadec_threshold --model "
                                       "smollm2-135m-instruct"):
    bs.learned_threshold(str(path))
  path.write_text(json.dumps({"model": bs.MODEL, "tau": 1.25}))
  assert bs.learned_threshold(str(path)) == 1.25
  for bad in ({"model": "other", "tau": 1.25}, {"model": bs.MODEL}, {"model": bs.MODEL,
                                                                      "tau": "1.25"}):
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="no numeric 'tau'"):
      bs.learned_threshold(str(path))


@pytest.mark.parametrize("new_tokens,end_tokens,budget", [
    (256, 3, 192),  # the default fits: kept
    (197, 4, 192),  # just fits (192 thinking + 4 marker + 1 answer)
    (196, 4, 147),  # does not: 3/4 of the length
    (64, 3, 48),
    (12, 8, 3),  # 3/4 would leave no answer token: capped
    (10, 8, 1),
])
def test_think_budget_fits_marker_and_answer(new_tokens, end_tokens, budget):
  assert bs.think_budget(new_tokens, end_tokens) == budget
  assert budget + end_tokens < new_tokens
  for s in bs.soft_thinking_settings(new_tokens, end_tokens).values():
    assert s.max_think_tokens == budget and s.max_new_tokens == new_tokens


def test_think_budget_refuses_a_length_without_room():
  with pytest.raises(ValueError, match="--new-tokens >= 10"):
    bs.think_budget(9, 8)


@pytest.mark.parametrize("argv,match", [
    (["--runs", "0"], "--runs and --new-tokens must be >= 1"),
    (["--new-tokens", "0"], "--runs and --new-tokens must be >= 1"),
    (["--extract-passages", "-1"], "--extract-passages must be >= 0"),
    ([], "fit it with `python -m train.adadec_threshold --model smollm2-135m-instruct`"),
])
def test_bad_arguments_error_before_any_model_load(argv, match, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(bs, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
  monkeypatch.setattr(bs, "THRESHOLD_FILE", str(tmp_path / "missing.json"))
  with pytest.raises(SystemExit) as e:
    bs.main(argv + ["--out", str(tmp_path / "B.md")])
  assert e.value.code == 2 and match in capsys.readouterr().err


class ByteChatTokenizer:
  """Bytes as tokens (ids 0-2 special, 2 the EOS), a chat prompt as its text: what the
  benchmark asks of SmolLM2's tokenizer."""
  eos_id, pad_id, bos_id = 2, 0, None
  chat_template = None

  def encode(self, text, add_special_tokens=True):
    return list(text.encode("utf-8"))

  def decode(self, ids, skip_special_tokens=False):
    return bytes(int(i) for i in ids if int(i) > 2 or not skip_special_tokens).decode(
        "utf-8", errors="replace")

  def encode_chat(self, messages, add_generation_prompt=True):
    return self.encode("".join(m["content"] for m in messages) + "\n")


@pytest.mark.slow
def test_the_table_on_a_tiny_model(tmp_path, monkeypatch, capsys):
  """Every row (the AdaDec, soft-thinking and exact-extract ones included) on a random
  byte-level model, written between the markers."""
  cfg = tiny_config(vocab_size=256, max_position_embeddings=1024)
  model = types.SimpleNamespace(lm=TransformerLM(cfg), tokenizer=ByteChatTokenizer(),
                                config=cfg, params=init_params(cfg, jax.random.PRNGKey(0)),
                                name="tiny", sha256=None)
  monkeypatch.setattr(bs, "load_model", lambda name: model)
  fit = tmp_path / "fit.json"
  fit.write_text(json.dumps({"model": bs.MODEL, "tau": 1.5}))
  monkeypatch.setattr(bs, "THRESHOLD_FILE", str(fit))
  # Superposed's n-gram tables from a few random documents, not a corpus tokenized by bytes.
  from decoding import ngram
  rng = random.Random(0)
  docs = [[rng.randrange(3, 256) for _ in range(100)] for _ in range(10)]
  monkeypatch.setattr(ngram, "load_ngram_model",
                      lambda corpus, tok, max_context=ngram.MAX_CONTEXT:
                      ngram.build_ngram_model(docs, 256, max_context))
  out = tmp_path / "BENCH.md"
  out.write_text("# Benchmarks\n")
  bs.main(["--runs", "1", "--new-tokens", "16", "--skip-hf", "--extract-passages", "1",
           "--out", str(out)])
  text = out.read_text()
  assert "<!-- bench_strategies:start -->" in text and "<!-- bench_strategies:end -->" in text
  assert "| AdaDec (tau = 1.50 nats, learned; looked ahead at " in text
  assert "| AdaDec (tau = -inf; looked ahead at 100% of steps) |" in text
  # "</think>" is 8 byte tokens, so 16 tokens leave 7 thinking steps (16 - 8 - 1).
  for variant in ("vanilla", "dirichlet", "gumbel"):
    assert f"| soft thinking, {variant} (7 thinking + 9 marker and answer tokens) |" in text
  assert "Exact-extract (zero-shot, no token stream, so no tokens/s): 1 generated passage of" \
      in text
  assert "--extract-passages 1`" in text
  assert "of the start positions; scoring every start took" in text
  assert text.count("| greedy |") == 1

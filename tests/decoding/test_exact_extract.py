"""Exact-extract (decoding/exact_extract.py): every span's score against teacher-forced brute
force, spans inside the passage, agreement with greedy, ragged batches, windows, the CLI."""
from __future__ import annotations

import dataclasses
import io
import json

import jax
import numpy as np
import pytest

from configs import generate as generate_config
from decoding import generate as cli
from decoding.errors import GenerationError
from decoding.exact_extract import ExactExtract, Query, exact_extract, search, windows
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.scoring import score_continuations
from decoding.strategy import Target
from models import transformer
from models.config import tiny_config
from models.lm import TransformerLM
from tests.fakes import BigramLM

V, EOS = 32, 1
ALL = 200  # top_spans large enough to return every span of a short passage


def tiny(vocab: int = V, eos: int = EOS, max_positions: int = 128) -> Target:
  """A random two-layer decoder, scaled up for peaked next-token distributions."""
  c = tiny_config(vocab_size=vocab, max_position_embeddings=max_positions)
  params = jax.tree.map(lambda x: x * 4.0, transformer.init_params(c, jax.random.PRNGKey(0)))
  return Target(TransformerLM(c), params, eos_ids=(eos,), pad_id=0)


def random_query(rng, n: int, example: int = 0) -> Query:
  tok = lambda k: tuple(int(t) for t in rng.randint(2, V, k))
  return Query(before=tok(rng.randint(1, 5)), passage=tok(n), after=tok(rng.randint(1, 4)),
               example=example)


def brute_force(target: Target, q: Query, max_len: int = 0) -> dict:
  """{(start, end): NLL of [prompt, span, EOS]} scoring each span alone, teacher-forced."""
  n = len(q.passage)
  keys = [(i, j) for i in range(n) for j in range(i + 1, n + 1) if not max_len or j - i <= max_len]
  scores = score_continuations(target.lm, target.params, [q.prompt_ids] * len(keys),
                               [list(q.passage[i:j]) + [EOS] for i, j in keys])
  return {k: s.nll for k, s in zip(keys, scores)}


@pytest.mark.parametrize("n", [1, 5, 12])
def test_every_span_score_and_the_argmin_match_brute_force(n):
  target = tiny()
  q = random_query(np.random.RandomState(n), n)
  spans = search(target, [q], ExactExtract(top_spans=ALL, start_chunk=4))[0]
  brute = brute_force(target, q)
  assert len(spans) == len(brute) == n * (n + 1) // 2
  for sp in spans:
    assert sp.nll == pytest.approx(brute[(sp.start, sp.end)], rel=1e-4, abs=1e-4)
    assert -sum(sp.logprobs) == pytest.approx(sp.nll, rel=1e-4, abs=1e-4)
  assert (spans[0].start, spans[0].end) == min(brute, key=brute.get)


def test_length_normalized_ranking_divides_by_scored_tokens():
  target = tiny()
  q = random_query(np.random.RandomState(3), 8)
  spans = search(target, [q], ExactExtract(top_spans=ALL, length_normalize=True))[0]
  brute = brute_force(target, q)
  norm = {k: v / (k[1] - k[0] + 1) for k, v in brute.items()}
  assert (spans[0].start, spans[0].end) == min(norm, key=norm.get)
  for sp in spans:
    assert sp.score == pytest.approx(norm[(sp.start, sp.end)], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("max_len", [0, 1, 3])
def test_answers_are_passage_spans_that_never_cross_the_passage_end(max_len):
  target = tiny()
  rng = np.random.RandomState(7)
  queries = [random_query(rng, n) for n in (2, 6, 11)]
  s = ExactExtract(max_span_tokens=max_len, top_spans=ALL)
  for q, gen in zip(queries, exact_extract(s, target, queries)):
    n = len(q.passage)
    for sp in gen.extras["top_spans"]:
      a, b = sp["span"]
      assert 0 <= a < b <= n and (not max_len or b - a <= max_len)
      assert np.isfinite(sp["nll"])
    a, b = gen.extras["span"]
    assert gen.output_ids == list(q.passage[a:b]) + [EOS]
    assert gen.nll == pytest.approx(gen.extras["nll"], rel=1e-5)
    expected = n * (n + 1) // 2 if not max_len else sum(min(max_len, n - i) for i in range(n))
    assert len(gen.extras["top_spans"]) == expected
  brute = brute_force(target, queries[2], 3)
  spans = search(target, [queries[2]], ExactExtract(max_span_tokens=3, top_spans=ALL))[0]
  assert {(sp.start, sp.end) for sp in spans} == set(brute)


def test_greedy_and_exact_extract_agree_when_greedy_returns_the_best_span():
  """A bigram model whose greedy continuation of the prompt is tokens 5 6 then EOS, all
  near-certain: that output is a span of the passage and the most likely one."""
  vocab = 12
  table = np.zeros((vocab, vocab), np.float32)
  table[:, 9] = 2.0  # a weak default next token
  table[4, 5] = table[5, 6] = table[6, EOS] = 12.0  # prompt ends with 4: 5 6 EOS
  bigram = Target(BigramLM(vocab), jax.numpy.asarray(table), eos_ids=(EOS,), pad_id=0)
  q = Query(before=(3, 3), passage=(7, 8, 5, 6, 9, 2), after=(4,))
  greedy = generate(bigram, [q.prompt_ids], Greedy(max_new_tokens=8))[0]
  assert greedy.output_ids == [5, 6, EOS]
  gen = exact_extract(ExactExtract(), bigram, [q])[0]
  assert gen.extras["span"] == [2, 4] and gen.output_ids == greedy.output_ids
  assert gen.nll == pytest.approx(greedy.nll, abs=1e-4)


def test_ragged_batch_gives_each_example_its_own_result():
  target = tiny()
  rng = np.random.RandomState(11)
  queries = [random_query(rng, n, example=e) for e, n in enumerate((3, 12, 1, 7, 9))]
  s = ExactExtract(top_spans=4, start_chunk=8)
  together = exact_extract(s, target, queries, batch_size=4)  # two prefill groups, mixed chunks
  for q, g in zip(queries, together):
    alone = exact_extract(s, target, [dataclasses.replace(q, example=0)])[0]
    assert g.extras["span"] == alone.extras["span"]
    spans = lambda gen: [t["span"] for t in gen.extras["top_spans"]]
    assert spans(g) == spans(alone)
    np.testing.assert_allclose([t["nll"] for t in g.extras["top_spans"]],
                               [t["nll"] for t in alone.extras["top_spans"]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("top", [1, 3])
def test_pruning_skips_starts_and_returns_the_same_spans_as_scoring_every_start(normalize, top):
  target = tiny()
  rng = np.random.RandomState(5)
  queries = [random_query(rng, n, example=e) for e, n in enumerate((30, 4, 25, 17, 1))]
  kw = dict(top_spans=top, length_normalize=normalize, start_chunk=4, max_span_tokens=6)
  pruned = exact_extract(ExactExtract(**kw), target, queries, batch_size=3)
  every = exact_extract(ExactExtract(prune_starts=False, **kw), target, queries, batch_size=3)
  for p, e in zip(pruned, every):
    assert [t["span"] for t in p.extras["top_spans"]] == [t["span"] for t in e.extras["top_spans"]]
    np.testing.assert_allclose([t["nll"] for t in p.extras["top_spans"]],
                               [t["nll"] for t in e.extras["top_spans"]], rtol=1e-5, atol=1e-5)
    assert e.extras["starts_scored"] == e.extras["starts"]
  assert [g.extras["starts"] for g in pruned] == [30, 4, 25, 17, 1]
  if not normalize:  # the normalized bound (divided by the longest span + 1) is much weaker
    assert sum(g.extras["starts_scored"] for g in pruned) < sum(g.extras["starts"] for g in pruned)


def test_pruned_passes_after_the_first_run_longest_first(monkeypatch):
  """After the first pass (best bounds) the kept starts are grouped by pass length, so no pass
  is stretched to the length of one long suffix mixed into short ones."""
  from decoding import exact_extract as ee
  lengths, real = [], ee.score_starts
  monkeypatch.setattr(ee, "score_starts", lambda lm, params, cache, first, query, tokens, *a:
                      lengths.append(tokens.shape[1]) or real(lm, params, cache, first, query,
                                                              tokens, *a))
  q = random_query(np.random.RandomState(9), 40)
  s = ExactExtract(top_spans=3, start_chunk=4)
  spans = search(tiny(), [q], s)[0]
  assert len(lengths) > 1 and lengths[1:] == sorted(lengths[1:], reverse=True)
  assert max(lengths) == 64 and min(lengths) < 64  # suffixes of 1 to 40 tokens
  every = search(tiny(), [q], s.replace(prune_starts=False))[0]
  assert [(x.start, x.end) for x in spans] == [(x.start, x.end) for x in every]


def test_pruned_argmin_matches_brute_force():
  target = tiny()
  for seed in range(4):
    q = random_query(np.random.RandomState(100 + seed), 14)
    best = search(target, [q], ExactExtract(top_spans=1, start_chunk=2))[0][0]
    brute = brute_force(target, q)
    assert (best.start, best.end) == min(brute, key=brute.get)
    assert best.nll == pytest.approx(min(brute.values()), rel=1e-4, abs=1e-4)


def test_windows_give_the_brute_force_best_span_over_windows():
  target = tiny()
  q = random_query(np.random.RandomState(5), 14)
  s = ExactExtract(window_tokens=6, window_stride=3, max_span_tokens=3, top_spans=ALL)
  wins = windows(q, s, target.lm.max_positions)
  assert [w.offset for w in wins] == [0, 3, 6, 8] and all(len(w.passage) == 6 for w in wins)
  best: dict = {}
  for w in wins:
    for (a, b), nll in brute_force(target, w, 3).items():
      key = (a + w.offset, b + w.offset)
      best[key] = min(nll, best.get(key, np.inf))
  gen = exact_extract(s, target, [q])[0]
  assert tuple(gen.extras["span"]) == min(best, key=best.get)
  assert gen.extras["nll"] == pytest.approx(min(best.values()), rel=1e-4, abs=1e-4)
  assert {tuple(t["span"]) for t in gen.extras["top_spans"]} == set(best)


def test_a_passage_longer_than_the_context_is_windowed():
  target = tiny(max_positions=32)
  q = random_query(np.random.RandomState(2), 40)
  s = ExactExtract(max_span_tokens=4, top_spans=3)
  wins = windows(q, s, 32)
  assert len(wins) > 1 and all(len(w.prompt_ids) + 4 <= 32 for w in wins)
  gen = exact_extract(s, target, [q])[0]
  a, b = gen.extras["span"]
  assert gen.output_ids == list(q.passage[a:b]) + [EOS] and b - a <= 4


# ---------------------------------------------------------------------------------- CLI


class ByteTok:
  """UTF-8 bytes as tokens (ids < 256), EOS 256: enough of the tokenizer boundary for the CLI."""
  eos_id, pad_id, bos_id, chat_template = 256, None, None, None

  def encode(self, text, add_special_tokens=True):
    return list(text.encode("utf-8"))

  def decode(self, ids, skip_special_tokens=False):
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


@dataclasses.dataclass
class FakeModel:  # the fields of models.lm.LoadedModel the CLI reads
  lm: object
  params: object
  tokenizer: object
  name: str = "tiny"
  sha256: str = None
  instruct: bool = False


def byte_model() -> FakeModel:
  t = tiny(vocab=257, eos=256, max_positions=512)
  return FakeModel(t.lm, t.params, ByteTok())


def test_cli_jsonl_round_trip(tmp_path, monkeypatch):
  monkeypatch.setattr(cli, "load", lambda cfg: (byte_model(), None))
  lines = [{"passage": "Ann met Bo.", "question": "Who met Bo?"},
           {"passage": "It rained.", "question": "What happened?",
            "examples": [{"passage": "Cy ran.", "question": "Who ran?", "answer": "Cy"}]}]
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  inp.write_text("".join(json.dumps(l) + "\n" for l in lines))
  cfg = generate_config.get_config()
  cfg.strategy, cfg.max_span_tokens, cfg.top_spans = "exact_extract", 4, 3
  res = cli.run(cfg, None, str(inp), str(out), err=io.StringIO())
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert rows == json.loads(json.dumps(res)) and len(rows) == 2
  for r, line in zip(rows, lines):
    passage = (" " + line["passage"]).encode()
    a, b = r["span"]
    assert b - a <= 4 and r["text"] == passage[a:b].decode().strip()
    assert r["text"] in line["passage"] and len(r["top_spans"]) == 3
    assert r["top_spans"][0] == {"text": r["text"], "span": r["span"], "nll": r["nll"]}
    assert r["nll"] == pytest.approx(-sum(r["token_logprobs"]), rel=1e-5)


@pytest.mark.parametrize("line, message", [
    ({"question": "q"}, 'missing "passage"'),
    ({"passage": "  ", "question": "q"}, '"passage" is empty'),
    ({"passage": 3, "question": "q"}, '"passage" must be a string'),
    ({"passage": "p", "question": "q", "answer": "a"}, "unknown field(s) ['answer']"),
    ({"passage": "p", "question": "q", "examples": [{"passage": "p"}]}, "examples[0]"),
    ({"prompt": "hi"}, "unknown field(s) ['prompt']"),
])
def test_bad_input_lines_are_errors_before_loading(tmp_path, monkeypatch, line, message):
  def never(cfg):
    raise AssertionError("loaded a model for a bad request")
  monkeypatch.setattr(cli, "load", never)
  inp = tmp_path / "in.jsonl"
  inp.write_text(json.dumps({"passage": "ok", "question": "q"}) + "\n" + json.dumps(line) + "\n")
  cfg = generate_config.get_config()
  cfg.strategy = "exact_extract"
  with pytest.raises(GenerationError, match=f"in.jsonl:2: .*{__import__('re').escape(message)}"):
    cli.run(cfg, None, str(inp), str(tmp_path / "out.jsonl"))


def test_bad_settings_and_requests_are_errors():
  with pytest.raises(GenerationError, match="max_span_tokens"):
    ExactExtract(max_span_tokens=-1)
  with pytest.raises(GenerationError, match="window_stride"):
    ExactExtract(window_tokens=4, window_stride=5)
  cfg = generate_config.get_config()
  cfg.strategy, cfg.max_span_tokenz = "exact_extract", 3
  with pytest.raises(GenerationError, match="max_span_tokens"):
    cli.check_request(cfg, True)
  cfg = generate_config.get_config()
  cfg.max_span_tokens = 3  # a greedy run
  with pytest.raises(GenerationError, match="does not apply"):
    cli.check_request(cfg, True)
  cfg.strategy = "exact_extract"
  with pytest.raises(GenerationError, match="--input"):
    cli.run(cfg, "a prompt", None, None)
  target = tiny()
  with pytest.raises(GenerationError, match="passage has no tokens"):
    generate(target, [Query((3,), (), (4,))], ExactExtract())
  with pytest.raises(GenerationError, match="needs the model's tokenizer"):
    generate(target, [{"passage": "p", "question": "q"}], ExactExtract())
  with pytest.raises(GenerationError, match="prompt_slots is not supported"):
    generate(target, [Query((3,), (4, 5), (6,))], ExactExtract(), prompt_slots=32)


def test_the_config_file_and_the_base_config_give_the_default_settings():
  import importlib
  from decoding import cli as cli_lib
  base = generate_config.get_config()
  base.strategy = "exact_extract"
  own = importlib.import_module("configs.exact_extract").get_config()
  cli_lib.check_config_fields(own)
  assert cli_lib.settings_from_config(own) == cli_lib.settings_from_config(base) == ExactExtract()


def test_the_command_reports_a_bad_line_in_one_line_before_loading(tmp_path):
  import subprocess
  import sys
  from tests import REPO
  inp = tmp_path / "in.jsonl"
  inp.write_text(json.dumps({"passage": "", "question": "q"}) + "\n")
  cmd = [sys.executable, "-m", "decoding.generate", "--config=configs/generate.py",
         "--config.strategy=exact_extract", "--config.max_span_tokens=4", f"--input={inp}",
         f"--output={tmp_path / 'out.jsonl'}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip() == f'error: {inp}:1: "passage" is empty', proc.stderr

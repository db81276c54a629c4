"""Momentum decoding (card 19): loop lengths, resistance, reference equality, greedy limit."""
from __future__ import annotations

import io
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import momentum as momentum_config
from decoding import generate as cli
from decoding import momentum
from decoding.errors import GenerationError
from decoding.processors import ProcessorContext
from tests.fakes import BigramLM
from tests.helpers import run_config

EOS, PAD, V = 1, 0, 12
# Ragged prompts shared by the fake-model tests (equal shapes and configs reuse compiles).
PROMPTS = [[2, 3, 4, 5], [7], [9, 2, 3, 8, 2, 3, 4]]


def cfg(**kw):
  base = dict(strategy="momentum", max_new_tokens=30, seed=0, batch_size=8)
  if kw.get("strategy", "momentum") == "momentum":
    base.update(momentum_alpha=0.2, momentum_top_k=5, momentum_max_ngram=5,
                momentum_resistance="ours")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def loopy_table(seed=0):
  """A bigram LM that loves the cycle 2 -> 3 -> 4 -> 5 -> 6 -> 2, with noisy alternatives
  and a rare EOS."""
  rng = np.random.default_rng(seed)
  t = rng.normal(0.0, 1.5, (V, V)).astype(np.float32)
  for a in range(V):
    t[a, 2 + (a - 1) % 5 if a >= 2 else 2] += 6.0
  t[:, EOS] -= 4.0
  return jnp.asarray(t)


def brute_loop_length(h: list, v: int, max_n: int) -> int:
  """The definition: 0 off the graph, else the longest repeated n-gram (n <= max_n), else 1."""
  if v not in h:
    return 0
  for n in range(max_n, 1, -1):
    if len(h) >= n - 1:
      query = tuple(h[len(h) - n + 1:] + [v])
      if any(tuple(h[i:i + n]) == query for i in range(len(h) - n + 1)):
        return n
  return 1


def reference_decode(table, prompt, steps, alpha, k, max_n, resistance):
  """Step-by-step Python momentum decoding on a bigram LM (the reference's procedure)."""
  r = momentum.RESISTANCES[resistance]
  probs = np.asarray(jax.nn.softmax(table, axis=-1))
  h, out = list(prompt), []
  for _ in range(steps):
    logits, p = np.asarray(table[h[-1]]), probs[h[-1]]
    cands = np.argsort(-logits, kind="stable")[:k]
    penalty = lambda v: 0.0 if alpha == 0 else np.float32(alpha * r(brute_loop_length(h, v, max_n)))
    scores = [p[v] - penalty(int(v)) for v in cands]
    tok = int(cands[int(np.argmax(scores))])  # first maximum; all -inf -> top-1
    h.append(tok)
    out.append(tok)
    if tok == EOS:
      break
  return out


def repeated_ngram(seq: list, n: int) -> bool:
  grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
  return len(set(grams)) < len(grams)


def test_loop_lengths_match_brute_force_on_ragged_rows():
  loop_lengths = jax.jit(momentum.loop_lengths, static_argnums=(2, 3))
  rng = np.random.default_rng(0)
  B, S, vocab = 6, 24, 5
  seqs = rng.integers(0, vocab, (B, S)).astype(np.int32)
  seqs[0, :8] = [1, 2, 3, 1, 2, 3, 1, 2]  # long repeats
  lens = np.array([8, 24, 1, 3, 17, 10], np.int32)  # padding beyond holds real token ids
  for max_n in (2, 3, 5):
    got = np.asarray(loop_lengths(jnp.asarray(seqs), jnp.asarray(lens), max_n, vocab))
    want = [[brute_loop_length(list(seqs[b, :lens[b]]), v, max_n) for v in range(vocab)]
            for b in range(B)]
    np.testing.assert_array_equal(got, want)
  assert got[0].tolist() == [0, 1, 1, 5, 0]  # (2,3,1,2,3) repeats; 0 and 4 are not nodes


def test_resistance_tables():
  inf = math.inf
  tab = lambda name, n=5: momentum.penalty_table(1.0, name, n).tolist()
  assert tab("ours") == tab("block") == [0, 0, 0, 0, 5, inf]
  assert tab("linear", 7) == [0, 1, 2, 3, 4, 5, inf, inf]
  assert tab("constant") == [0, 2, 2, 2, 2, 2]
  np.testing.assert_allclose(tab("log")[1:], [math.log(1 + l, 6) / 0.2 for l in range(1, 6)],
                             rtol=1e-6)
  np.testing.assert_allclose(tab("exp")[1:], [1.5 ** l / 2 for l in range(1, 6)], rtol=1e-6)
  assert tab("log")[0] == tab("exp")[0] == 0
  # alpha = 0 gives no penalty at all, even where R is infinite.
  assert momentum.penalty_table(0.0, "ours", 5).tolist() == [0] * 6


def test_scores_penalize_only_graph_nodes():
  rng = np.random.default_rng(1)
  B, S, vocab, k = 3, 16, 10, 6
  logits = jnp.asarray(rng.normal(0, 2, (B, vocab)), jnp.float32)
  seqs = rng.integers(0, 5, (B, S)).astype(np.int32)  # tokens 5..9 never in the graph
  lens = np.array([16, 5, 9], np.int32)
  ctx = ProcessorContext(sequences=jnp.asarray(seqs), seq_len=jnp.asarray(lens),
                         prompt_len=jnp.asarray(lens), step=jnp.zeros((), jnp.int32))
  alpha = 0.05
  penalty = jnp.asarray(momentum.penalty_table(alpha, "constant", 5))
  scores = np.asarray(jax.jit(momentum.momentum_scores, static_argnums=(3, 4))(
      logits, ctx, penalty, k, 5))
  p = np.asarray(jax.nn.softmax(logits, -1))
  for b in range(B):
    top = np.argsort(-np.asarray(logits[b]), kind="stable")[:k].tolist()
    h = list(seqs[b, :lens[b]])
    want = {v: p[b, v] - (0.0 if brute_loop_length(h, v, 5) == 0 else np.float32(alpha * 2.0))
            for v in top}
    assert any(brute_loop_length(h, v, 5) == 0 for v in top)
    for v in range(vocab):
      assert scores[b, v] == (pytest.approx(want[v], rel=1e-6) if v in top else -np.inf)
    assert int(np.argmax(scores[b])) == max(top, key=lambda v: want[v])


@pytest.mark.parametrize("resistance,k,max_n,alpha", [
    ("ours", 5, 5, 0.2), ("ours", V, 5, 0.2), ("linear", 3, 7, 0.1), ("log", 100, 5, 0.2),
    ("exp", 2, 4, 0.05)])
def test_matches_reference_procedure_on_ragged_batch(resistance, k, max_n, alpha):
  # k > V means the whole vocabulary.
  table = loopy_table()
  c = cfg(momentum_resistance=resistance, momentum_top_k=k, momentum_max_ngram=max_n,
          momentum_alpha=alpha)
  out = run_config(BigramLM(V), table, PROMPTS, c, [EOS], PAD)
  for p, g in zip(PROMPTS, out):
    assert g.output_ids == reference_decode(table, p, 30, alpha, k, max_n, resistance)


def test_ragged_batch_equals_each_row_alone():
  table, c = loopy_table(1), cfg()
  together = run_config(BigramLM(V), table, PROMPTS, c, [EOS], PAD)
  for p, g in zip(PROMPTS, together):
    alone = run_config(BigramLM(V), table, [p], c, [EOS], PAD)[0]
    assert alone.output_ids == g.output_ids
    assert alone.token_logprobs == pytest.approx(g.token_logprobs, abs=1e-6)


def test_default_resistance_never_repeats_a_5gram():
  table, lm = loopy_table(), BigramLM(V)
  greedy = run_config(lm, table, PROMPTS, cfg(strategy="greedy"), [EOS], PAD)
  assert all(repeated_ngram(p + g.output_ids, 5) for p, g in zip(PROMPTS, greedy))
  # k = V: some candidate is always allowed (no 4-gram context occurs V times in 37 tokens).
  out = run_config(lm, table, PROMPTS, cfg(momentum_top_k=V), [EOS], PAD)
  for p, g in zip(PROMPTS, out):
    assert len(g.output_ids) == 30 and not repeated_ngram(p + g.output_ids, 5)
    prev = (p + g.output_ids)[len(p) - 1:-1]
    lp = jax.nn.log_softmax(table, -1)
    assert g.token_logprobs == pytest.approx([float(lp[a, b]) for a, b in zip(prev, g.output_ids)],
                                             abs=1e-5)


def test_alpha_zero_or_one_candidate_is_greedy_on_fake_model():
  table = loopy_table(2)
  greedy = run_config(BigramLM(V), table, PROMPTS, cfg(strategy="greedy"), [EOS], PAD)
  assert all(repeated_ngram(p + g.output_ids, 5) for p, g in zip(PROMPTS, greedy))
  # k = 1: the only candidate is blocked whenever greedy repeats a 5-gram, and is emitted anyway.
  for c in (cfg(momentum_alpha=0.0), cfg(momentum_top_k=1)):
    out = run_config(BigramLM(V), table, PROMPTS, c, [EOS], PAD)
    assert [g.output_ids for g in out] == [g.output_ids for g in greedy]


@pytest.mark.slow
def test_alpha_zero_is_greedy_on_smollm(smollm, prompt_ids):
  c = cfg(max_new_tokens=12, momentum_alpha=0.0)
  out = run_config(smollm.lm, smollm.params, prompt_ids, c, [2], 2)
  greedy = run_config(smollm.lm, smollm.params, prompt_ids,
                               cfg(strategy="greedy", max_new_tokens=12), [2], 2)
  for g, m in zip(greedy, out):
    assert m.output_ids == g.output_ids
    assert m.token_logprobs == pytest.approx(g.token_logprobs, abs=1e-5)


def test_alpha_zero_with_min_new_tokens_and_no_eos_is_greedy():
  """Without EOS ids the minimum-length rule has nothing to ban: it must not ban the last
  vocabulary token (an EOS array padded with -1 once indexed it)."""
  t = np.zeros((V, V), np.float32)
  t[2, V - 1], t[V - 1, 3], t[3, V - 1] = 4.0, 4.0, 4.0  # greedy: 11 3 11 3 ...
  table = jnp.asarray(t)
  greedy = run_config(BigramLM(V), table, [[2]], cfg(strategy="greedy", max_new_tokens=6,
                                                      min_new_tokens=3), [], PAD)
  assert greedy[0].output_ids == [V - 1, 3, V - 1, 3, V - 1, 3]
  c = cfg(max_new_tokens=6, min_new_tokens=3, momentum_alpha=0.0, momentum_top_k=V)
  assert run_config(BigramLM(V), table, [[2]], c, [], PAD)[0].output_ids == greedy[0].output_ids


@pytest.mark.parametrize("bad", [
    dict(momentum_resistance="quadratic"), dict(momentum_alpha=-0.1),
    dict(momentum_alpha=float("inf")), dict(momentum_top_k=0), dict(momentum_top_k=2.5),
    dict(momentum_max_ngram=1), dict(num_return_sequences=2)])
def test_bad_configs_raise_before_compiling(bad):
  with pytest.raises(GenerationError):
    run_config(BigramLM(V), loopy_table(), [[2]], cfg(**bad), [EOS], PAD)


class LetterTokenizer:
  """Token i <-> the letter chr(ord("a") + i); "b" (1) is EOS and "a" (0) padding."""
  eos_id, pad_id, chat_template = EOS, PAD, None

  def encode(self, text):
    return [ord(ch) - ord("a") for ch in text]

  def decode(self, ids, skip_special_tokens=False):
    return "".join(chr(ord("a") + i) for i in ids if not (skip_special_tokens and i == EOS))


def test_cli_runs_momentum_config(monkeypatch):
  table = loopy_table()
  model = types.SimpleNamespace(lm=BigramLM(V), params=table, tokenizer=LetterTokenizer(),
                                instruct=False, name=None, sha256=None)
  monkeypatch.setattr(cli, "load", lambda c: (model, None))
  c = momentum_config.get_config()
  c.max_new_tokens = 30
  out = io.StringIO()
  res = cli.run(c, "cdef", None, None, out=out)
  want = reference_decode(table, [2, 3, 4, 5], 30, 0.2, 5, 5, "ours")
  assert res[0]["output_ids"] == want
  assert out.getvalue().strip() == LetterTokenizer().decode(want, skip_special_tokens=True)

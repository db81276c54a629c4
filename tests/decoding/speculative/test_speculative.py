"""Speculative decoding: exactness in greedy mode, the target's distribution in sampling
mode, the tree builder against brute force, and the bookkeeping (KV rollback/compaction,
prompt-lookup re-alignment, EOS and length budgets)."""
import dataclasses
import itertools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import processors, token_loop
from decoding.errors import GenerationError
from decoding.speculative import dyspec, loop, model_drafter, prompt_lookup, verify
from decoding.speculative.acceptance import Lenient
from decoding.speculative.eagle import EagleDrafter
from models import eagle_head
from models import transformer
from models.config import tiny_config
from models.kv_cache import KVCache
from models.lm import TransformerLM
from tests.fakes import BigramLM, RandomDrafter
from tests.helpers import chi2_pvalue, processor_of, row_keys, run_config

V = 12


def _bigram(seed, sharp=3.0, V=V):
  return jnp.asarray(np.random.RandomState(seed).randn(V, V) * sharp, jnp.float32)


def _ragged(B, P, V, seed=0):
  rng = np.random.RandomState(seed)
  prompts = jnp.asarray(rng.randint(0, V, (B, P)), jnp.int32)
  lens = jnp.asarray(rng.randint(1, P + 1, (B,)), jnp.int32)
  return prompts, lens


def _greedy(lm, params, prompts, lens, eos, proc, n, cache_len=64):
  return token_loop.decode(lm, params, prompts, lens, row_keys(prompts.shape[0]), eos, processor=proc,
                     select=token_loop.greedy_select, pad_id=0, max_new_tokens=n,
                     cache_len=cache_len)


def _spec(lm, params, drafter, dparams, prompts, lens, eos, proc, n, sample=False, keys=None,
          cache_len=64):
  keys = row_keys(prompts.shape[0]) if keys is None else keys
  return loop.speculative_decode(lm, params, drafter, dparams, prompts, lens, keys, eos,
                                 processor=proc, sample=sample, pad_id=0, max_new_tokens=n,
                                 cache_len=cache_len)


def _tau(res):
  return float(res.extras["verified_tokens"].sum() / np.maximum(res.extras["target_calls"].sum(), 1))


# --------------------------------------------------------------------------- unit: verify


def test_verify_chain_greedy_counts_and_next_token():
  logits = jnp.full((2, 4, 5), -5.0)
  argmax = jnp.asarray([[1, 2, 3, 4], [0, 0, 0, 0]])
  logits = logits.at[jnp.arange(2)[:, None], jnp.arange(4)[None], argmax].set(5.0)
  drafts = jnp.asarray([[1, 2, 0], [0, 0, 0]])
  v = verify.verify_chain(logits, drafts, None, row_keys(2), sample=False)
  assert v.num_accepted.tolist() == [2, 3]
  assert v.next_token.tolist() == [3, 0]  # correction; bonus token


def test_verify_tree_greedy_follows_the_targets_argmax():
  # root -> {a:1 (node1), b:2 (node2)}; node1 -> {3 (node3)}; node2 -> {4 (node4)}
  parents = jnp.asarray([[-1, 0, 0, 1, 2]])
  depth = jnp.asarray([[0, 1, 1, 2, 2]])
  tokens = jnp.asarray([[9, 1, 2, 3, 4]])
  argmax = jnp.asarray([[2, 0, 4, 0, 7]])  # root wants 2 -> node2 wants 4 -> node4 says 7
  logits = jnp.full((1, 5, 10), -5.0).at[0, jnp.arange(5), argmax[0]].set(5.0)
  v = verify.verify_tree(logits, tokens, parents, depth, jnp.ones((1, 5), bool), row_keys(1),
                         False, max_depth=2)
  assert v.num_accepted.tolist() == [2]
  assert v.path.tolist() == [[2, 4]]
  assert v.next_token.tolist() == [7]
  invalid = jnp.ones((1, 5), bool).at[0, 4].set(False)  # padding nodes are never accepted
  v = verify.verify_tree(logits, tokens, parents, depth, invalid, row_keys(1), False, max_depth=2)
  assert v.num_accepted.tolist() == [1] and v.next_token.tolist() == [4]


def test_kv_compact_moves_the_accepted_path_into_place():
  cfg = tiny_config()
  cache = KVCache.init(cfg, 2, 16)
  marks = jnp.arange(16, dtype=jnp.float32)[None, None, None, :, None]  # slot index as value
  cache = cache.replace(k=jnp.broadcast_to(marks, cache.k.shape) + 0.0,
                        v=jnp.broadcast_to(marks, cache.v.shape) + 0.0)
  start = jnp.asarray([3, 5])
  out = cache.compact(start, jnp.asarray([[2, 5], [1, 3]]))
  k = np.asarray(out.k[0, :, 0, :, 0])  # [B, T]
  assert k[0, 4] == 5 and k[0, 5] == 8  # slot 3+1 <- 3+2, slot 3+2 <- 3+5
  assert k[1, 6] == 6 and k[1, 7] == 8
  assert k[0, 3] == 3 and k[1, 5] == 5  # roots untouched


# ------------------------------------------------------------------ greedy: exactly greedy

CONTEXT_CFG = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}


@pytest.mark.parametrize("cfg", [{}, CONTEXT_CFG], ids=["plain", "context_processors"])
def test_greedy_is_exact_for_any_drafter_on_a_ragged_batch(cfg):
  target = BigramLM(V)
  tparams = _bigram(0)
  draft_params = tparams + _bigram(1, sharp=2.0)  # a noisy copy of the target
  prompts, lens = _ragged(6, 7, V)
  eos = jnp.asarray([5], jnp.int32)
  proc = processor_of(cfg, [5])
  ref = _greedy(target, tparams, prompts, lens, eos, proc, 16)
  for drafter, dparams in [
      (RandomDrafter(V, 3), None),
      (model_drafter.ModelDrafter(BigramLM(V), 4), draft_params),
      (prompt_lookup.PromptLookupDrafter(5, 2, 1), None),
      (dyspec.DySpecDrafter(BigramLM(V), tree_budget=7, max_depth=4, max_children=3), draft_params),
  ]:
    res = _spec(target, tparams, drafter, dparams, prompts, lens, eos, proc, 16)
    np.testing.assert_array_equal(res.tokens, ref.tokens, err_msg=type(drafter).__name__)
    np.testing.assert_array_equal(res.lengths, ref.lengths)
    np.testing.assert_array_equal(res.finished, ref.finished)
    np.testing.assert_allclose(res.token_logprobs, ref.token_logprobs, atol=1e-5)
    calls, verified = res.extras["target_calls"], res.extras["verified_tokens"]
    # every generated token but the first comes from a verification call
    np.testing.assert_array_equal(verified, np.asarray(res.lengths) - 1)
    assert np.all(calls <= verified) and np.all(verified <= calls * (drafter.depth + 1))


def test_greedy_is_exact_on_a_transformer_with_real_kv_rollback():
  """A tiny transformer (real KV cache): chain self-draft and a DySpec tree (compaction)."""
  cfg = tiny_config(vocab_size=24, num_layers=3)
  lm = TransformerLM(cfg)
  params = jax.tree.map(lambda x: 3 * x, transformer.init_params(cfg, jax.random.PRNGKey(0)))
  prompts, lens = _ragged(4, 8, 24, seed=3)
  eos = jnp.asarray([-1], jnp.int32)
  proc = processor_of({}, [])
  ref = _greedy(lm, params, prompts, lens, eos, proc, 20)
  for drafter in [model_drafter.ModelDrafter(lm, 3, self_layers=1),
                  dyspec.DySpecDrafter(lm, tree_budget=6, max_depth=4, max_children=2,
                                      self_layers=2)]:
    res = _spec(lm, params, drafter, None, prompts, lens, eos, proc, 20)
    np.testing.assert_array_equal(res.tokens, ref.tokens, err_msg=type(drafter).__name__)
    np.testing.assert_allclose(res.token_logprobs, ref.token_logprobs, atol=1e-4)
    assert _tau(res) > 1.0  # the self-draft agrees with the target sometimes


def test_draft_equal_to_target_accepts_everything():
  target = BigramLM(V)
  tparams = _bigram(0)
  prompts, lens = _ragged(3, 5, V)
  eos = jnp.asarray([-1], jnp.int32)
  proc = processor_of({}, [])
  res = _spec(target, tparams, model_drafter.ModelDrafter(BigramLM(V), 4), tparams, prompts, lens,
              eos, proc, 21)
  np.testing.assert_array_equal(res.extras["target_calls"], [4, 4, 4])  # 20 tokens, 5 per call
  np.testing.assert_array_equal(res.extras["accepted_drafts"], [16, 16, 16])


# ------------------------------------------------------------ sampling: the target's law

def _sequence_probs(table, prompt_last, N, cfg):
  """Exact probability of every length-N continuation under the processed bigram target."""
  proc = processor_of(cfg, [], sampling=True)
  ctx = processors.ProcessorContext(sequences=None, seq_len=None, prompt_len=None,
                                    step=jnp.zeros((), jnp.int32))
  logp = np.asarray(jax.nn.log_softmax(proc(table, ctx), -1))
  Vt = table.shape[0]
  seqs = np.array(list(itertools.product(range(Vt), repeat=N)))
  prev = np.concatenate([np.full((len(seqs), 1), prompt_last), seqs[:, :-1]], axis=1)
  return seqs, np.exp(logp[prev, seqs].sum(1))


def _chi_square_pvalue(tokens, seqs, probs, Vt):
  N = seqs.shape[1]
  idx = (np.asarray(tokens)[:, :N] * (Vt ** np.arange(N - 1, -1, -1))).sum(1)
  counts = np.bincount(idx, minlength=Vt ** N)
  expected = probs * len(idx)
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  assert counts[expected == 0].sum() == 0  # nothing outside the support
  return chi2_pvalue(obs[keep], exp[keep])


def test_sampling_matches_the_targets_sequence_distribution():
  """Chi-square over all 5^3 continuations, 20000 independent rows (seeds), with a sampled
  draft (min(1, p/q) rule), a DySpec tree (multi-candidate rule) and prompt lookup
  (point-mass drafts), under temperature and top-k."""
  Vt, N, B = 5, 3, 20000
  table = _bigram(4, sharp=1.0, V=Vt)
  draft_table = _bigram(5, sharp=1.0, V=Vt)
  cfg = {"temperature": 0.9, "top_k": 4}
  proc = processor_of(cfg, [], sampling=True)
  prompts = jnp.asarray([[1, 2, 3]] * B, jnp.int32)
  lens = jnp.full((B,), 3, jnp.int32)
  eos = jnp.asarray([-1], jnp.int32)
  seqs, probs = _sequence_probs(table, 3, N, cfg)
  target = BigramLM(Vt)
  for drafter, dparams in [
      (model_drafter.ModelDrafter(BigramLM(Vt), 2), draft_table),
      (dyspec.DySpecDrafter(BigramLM(Vt), tree_budget=4, max_depth=2, max_children=2), draft_table),
      (prompt_lookup.PromptLookupDrafter(2, 1, 1), None),
  ]:
    res = _spec(target, table, drafter, dparams, prompts, lens, eos, proc, N, sample=True,
                keys=row_keys(B, seed=11))
    p = _chi_square_pvalue(res.tokens, seqs, probs, Vt)
    assert p > 1e-3, (type(drafter).__name__, p)
    assert _tau(res) > 1.0


def test_sampled_drafts_accept_at_one_minus_tv():
  """Acceptance of one sampled draft token = sum_v min(p, q) = 1 - TV(p, q)."""
  Vt, B = 6, 20000
  p_logits = jnp.asarray(np.random.RandomState(0).randn(Vt), jnp.float32)
  q_logits = jnp.asarray(np.random.RandomState(1).randn(Vt), jnp.float32)
  p, q = jax.nn.softmax(p_logits), jax.nn.softmax(q_logits)
  keys = row_keys(B, seed=3)
  drafts = jax.vmap(lambda k: jax.random.categorical(jax.random.fold_in(k, 99), q_logits))(keys)
  logits = jnp.broadcast_to(p_logits, (B, 2, Vt))
  v = verify.verify_chain(logits, drafts[:, None].astype(jnp.int32),
                          jnp.broadcast_to(q, (B, 1, Vt)), keys, sample=True)
  expected = float(jnp.minimum(p, q).sum())
  assert abs(float(v.num_accepted.mean()) - expected) < 4 * np.sqrt(expected * (1 - expected) / B)
  # and the emitted token (accepted draft or residual draw) is distributed as p
  out = np.where(np.asarray(v.num_accepted) == 1, np.asarray(drafts), np.asarray(v.next_token))
  counts = np.bincount(out, minlength=Vt)
  assert chi2_pvalue(counts, np.asarray(p)) > 1e-3


def test_deterministic_drafts_reproduce_ancestral_sampling_exactly():
  """With point-mass drafts the verifier draws the target's token at index i with the key
  of index i, exactly as strategy='sample' does: same seed, same tokens."""
  target = BigramLM(V)
  tparams = _bigram(0, sharp=1.0)
  prompts, lens = _ragged(8, 6, V, seed=2)
  eos = jnp.asarray([5], jnp.int32)
  proc = processor_of({"temperature": 0.8}, [5], sampling=True)
  ref = token_loop.decode(target, tparams, prompts, lens, row_keys(8), eos, processor=proc,
                    select=token_loop.sample_select, pad_id=0, max_new_tokens=24, cache_len=64)
  res = _spec(target, tparams, prompt_lookup.PromptLookupDrafter(4, 2, 1), None, prompts, lens, eos,
              proc, 24, sample=True)
  np.testing.assert_array_equal(res.tokens, ref.tokens)


def test_rows_do_not_depend_on_the_batch():
  target = BigramLM(V)
  tparams = _bigram(0, sharp=1.0)
  prompts, lens = _ragged(4, 6, V, seed=5)
  eos = jnp.asarray([-1], jnp.int32)
  proc = processor_of({}, [], sampling=True)
  d = model_drafter.ModelDrafter(BigramLM(V), 3)
  dp = _bigram(1, sharp=1.0)
  full = _spec(target, tparams, d, dp, prompts, lens, eos, proc, 12, sample=True)
  one = _spec(target, tparams, d, dp, prompts[2:3], lens[2:3], eos, proc, 12, sample=True,
              keys=row_keys(4)[2:3])
  np.testing.assert_array_equal(full.tokens[2:3], one.tokens)


# --------------------------------------------------------------- prompt lookup / IAD rule

def test_prompt_lookup_realignment_rule():
  d = prompt_lookup.PromptLookupDrafter(num_draft=3, max_ngram=2, min_ngram=1)
  #          prompt: 0  1  2  3  4  5  6  7 | generated
  seq = np.array([[7, 1, 2, 9, 1, 2, 8, 4, 1, 2, 0, 0]])
  plen = jnp.asarray([8])
  L = jnp.asarray([10])  # the row ends with the bigram (1, 2): occurs ending at 3 and 6
  s = lambda align: int(d.match_start(jnp.asarray(seq), L, plen, jnp.asarray([align]))[0])
  assert s(0) == 3  # first occurrence at or after the alignment point
  assert s(4) == 6
  assert s(7) == 6  # none after 7: the last one before it
  seq2 = seq.copy()
  seq2[0, 8] = 5  # now only the unigram (2) matches: same ends, found by the shorter n-gram
  assert int(d.match_start(jnp.asarray(seq2), L, plen, jnp.asarray([0]))[0]) == 3
  seq3 = seq.copy()
  seq3[0, 9] = 11  # no occurrence at all: continue from the alignment point
  assert int(d.match_start(jnp.asarray(seq3), L, plen, jnp.asarray([5]))[0]) == 5


def test_iad_copies_the_input_in_one_target_call():
  """A target that copies its input (a 'copy' model) finishes in one verification call."""
  Vt, SEP, EOS = 12, 10, 11
  text = [3, 7, 1, 8, 2, 9, 4]
  table = np.full((Vt, Vt), -10.0, np.float32)
  for a, b in zip([SEP] + text, text + [EOS]):
    table[a, b] = 10.0
  prompts = jnp.asarray([text + [SEP]], jnp.int32)
  lens = jnp.asarray([8])
  eos = jnp.asarray([EOS], jnp.int32)
  proc = processor_of({}, [EOS])
  res = _spec(BigramLM(Vt), jnp.asarray(table), prompt_lookup.PromptLookupDrafter(8, 3, 1), None,
              prompts, lens, eos, proc, 16)
  assert res.tokens[0, :8].tolist() == text + [EOS]
  assert int(res.extras["target_calls"][0]) == 1


WIDTHS = []  # block widths of the target calls made by _WidthLM (host callback)


class _WidthLM(BigramLM):
  def __call__(self, params, tokens, positions, cache, attn_mask=None, **kw):
    jax.debug.callback(lambda w: WIDTHS.append(int(w)), jnp.int32(tokens.shape[1]),
                       ordered=True)
    return super().__call__(params, tokens, positions, cache, attn_mask, **kw)


def test_prompt_lookup_without_a_match_makes_plain_target_calls():
  """When no active row finds an n-gram of its sequence in its prompt, the iteration
  verifies no drafts (a one-token call); with a match anywhere in the batch it verifies
  K + 1 positions. The tokens are the greedy tokens either way."""
  Vt, K, n = 12, 4, 10
  table = np.full((Vt, Vt), -10.0, np.float32)
  for a in range(Vt):  # every token leads into the cycle 6 -> 7 -> 8 -> 9 -> 6
    table[a, 6 + (a - 5) % 4 if a >= 6 else 6] = 10.0
  tparams = jnp.asarray(table)
  eos = jnp.asarray([-1], jnp.int32)
  proc = processor_of({}, [])
  d = prompt_lookup.PromptLookupDrafter(K, 2, 1)
  nothing = (jnp.asarray([[1, 2, 3, 0, 0]], jnp.int32), jnp.asarray([3]))  # never copied
  both = (jnp.asarray([[1, 2, 3, 0, 0], [6, 7, 8, 9, 0]], jnp.int32), jnp.asarray([3, 5]))
  for prompts, lens in (nothing, both):
    WIDTHS.clear()
    res = _spec(_WidthLM(Vt), tparams, d, None, prompts, lens, eos, proc, n)
    ref = _greedy(BigramLM(Vt), tparams, prompts, lens, eos, proc, n)
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    assert res.tokens[0].tolist() == [6, 7, 8, 9] * 2 + [6, 7]
    calls = np.asarray(res.extras["target_calls"])
    assert calls[0] == n - 1  # one token per call: nothing was ever copied
    copying = calls[1] if len(calls) > 1 else 0  # the second row copies 3 tokens per call
    assert copying in (0, 3)
    # WIDTHS[0] is the prefill; K + 1 positions while the copying row is active, then 1
    assert WIDTHS[1:] == [K + 1] * copying + [1] * (calls[0] - copying), WIDTHS


# ------------------------------------------------------------------------- DySpec trees

def test_dyspec_tree_is_the_brute_force_top_budget_nodes():
  """The best-first builder selects exactly the `budget` nodes of highest path value
  (product of draft probabilities), among the top-C children of each node."""
  Vt, C, D, budget = 6, 3, 4, 10
  for seed in range(3):
    table = jax.nn.log_softmax(_bigram(seed, sharp=1.5, V=Vt), -1)  # toy drafter: bigram
    root = table[2][None]

    def expand(i, tokens, parents, depth, aux):
      return table[tokens[:, i]], aux

    draft, values, _ = dyspec.best_first_tree(root, expand, (), budget, D, C)
    tok, par = np.asarray(draft.tokens[0]), np.asarray(draft.parents[0])
    def path(i):
      out = []
      while i > 0:
        out.append(int(tok[i]))
        i = int(par[i])
      return tuple(reversed(out))
    got = {path(i) for i in range(1, budget + 1)}
    # brute force: every path of depth <= D through top-C children
    t = np.asarray(table)
    cands = {}
    def walk(prefix, last, value):
      if len(prefix) == D:
        return
      for c in np.argsort(-t[last])[:C]:
        p = prefix + (int(c),)
        cands[p] = value + t[last, c]
        walk(p, c, value + t[last, c])
    walk((), 2, 0.0)
    best = sorted(cands, key=lambda p: -cands[p])[:budget]
    assert got == set(best)
    assert np.allclose(sorted(np.asarray(values[0, 1:])), sorted(cands[p] for p in best))


def test_dyspec_tree_accepts_at_least_as_much_as_a_chain_of_the_same_budget():
  target = BigramLM(V)
  tparams = _bigram(0, sharp=1.0)
  dparams = tparams + _bigram(1, sharp=0.7)
  prompts, lens = _ragged(32, 6, V, seed=7)
  eos = jnp.asarray([-1], jnp.int32)
  proc = processor_of({}, [])
  chain = _spec(target, tparams, model_drafter.ModelDrafter(BigramLM(V), 6), dparams, prompts, lens,
                eos, proc, 24)
  tree = _spec(target, tparams, dyspec.DySpecDrafter(BigramLM(V), 6, 6, 3), dparams, prompts,
               lens, eos, proc, 24)
  np.testing.assert_array_equal(tree.tokens, chain.tokens)
  assert _tau(tree) >= _tau(chain)


# ---------------------------------------------------------------- strategy and bad input

def test_unknown_drafter_and_bad_values_fail_before_compiling():
  from configs import speculative as spec_cfg
  lm = TransformerLM(tiny_config())
  params = transformer.init_params(lm.config, jax.random.PRNGKey(0))
  for key, value, msg in [("drafter", "nope", "unknown drafter"),
                          ("num_draft_tokens", 0, "num_draft_tokens"),
                          ("draft_layers", 2, "draft_layers"),
                          ("tree_budget", -1, "tree_budget")]:
    c = spec_cfg.get_config()
    c.max_new_tokens = 4
    c[key] = value
    with pytest.raises(GenerationError, match=msg):
      run_config(lm, params, [[1, 2]], c, [3], 0)
  c = spec_cfg.get_config()
  c.drafter = "model"
  with pytest.raises(GenerationError, match="draft_model"):
    run_config(lm, params, [[1, 2]], c, [3], 0)


# ---------------------------------------------------------------------------- EAGLE heads

class _CheckedHead(eagle_head.EagleHead):
  """An EAGLE head that records, at every call, whether the entries it writes fit its cache."""
  writes_fit: ClassVar[list] = []

  def __call__(self, hparams, tparams, features, tokens, positions, cache, *args, **kw):
    fits = jnp.all(cache.lengths + tokens.shape[1] <= cache.max_len)
    jax.debug.callback(lambda ok: _CheckedHead.writes_fit.append(bool(ok)), fits)
    return super().__call__(hparams, tparams, features, tokens, positions, cache, *args, **kw)


@pytest.mark.slow
def test_eagle_chain_and_tree_are_exact_whatever_the_head():
  """An untrained (random) EAGLE head still gives exactly the greedy tokens, as a chain and as
  an EAGLE-2 tree, on a ragged batch with context processors: exactness must not depend on the
  head at all. The caches are sized as the strategy sizes them (prompt + new tokens, plus the
  drafter's `extra_slots`), and every head write fits in its cache."""
  cfg = tiny_config(vocab_size=24, num_layers=2)
  lm = TransformerLM(cfg)
  params = jax.tree.map(lambda x: 3 * x, transformer.init_params(cfg, jax.random.PRNGKey(0)))
  head = _CheckedHead(eagle_head.HeadConfig(cfg, feature_sampling=True))
  hparams = eagle_head.init_head_params(head, jax.random.PRNGKey(1))
  prompts, lens = _ragged(4, 8, 24, seed=4)
  eos = jnp.asarray([-1], jnp.int32)
  proc = processor_of(CONTEXT_CFG, [])
  n = 18
  ref = _greedy(lm, params, prompts, lens, eos, proc, n)
  ids = jnp.asarray([5, 0, 17, 3, 9, 22, 11, 8], jnp.int32)  # a reduced draft vocabulary
  reduced = {"head": hparams, "vocab_ids": ids,
             "vocab_w": eagle_head.draft_vocab_matrix(params, head.config, ids)}
  for drafter, dparams in [
      (EagleDrafter(head, num_draft=3), {"head": hparams}),
      (EagleDrafter(head, tree=True, tree_budget=16, max_depth=6, max_children=4),
       {"head": hparams}),
      (EagleDrafter(head, num_draft=3, draft_vocab=8), reduced),
      (EagleDrafter(head, tree=True, tree_budget=16, max_depth=6, max_children=4,
                    draft_vocab=8), reduced)]:
    what = f"tree={drafter.tree}, draft_vocab={drafter.draft_vocab}"
    _CheckedHead.writes_fit.clear()
    res = _spec(lm, params, drafter, dparams, prompts, lens, eos, proc, n,
                cache_len=prompts.shape[1] + n)
    np.testing.assert_array_equal(res.tokens, ref.tokens, err_msg=what)
    assert _CheckedHead.writes_fit and all(_CheckedHead.writes_fit), what


def test_guided_eagle_runs_the_head_on_both_streams_and_guides_its_drafts():
  """Under classifier-free guidance the drafter's head call on paired features [B, S, 2D]
  equals two separate head calls, one per stream, each with its own cache; its draft logits
  are the guided combination of the two streams' head logits."""
  from decoding.guidance import guide
  cfg = tiny_config(vocab_size=24, num_layers=2)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  head = eagle_head.EagleHead(eagle_head.HeadConfig(cfg, feature_sampling=True))
  hp = {"head": eagle_head.init_head_params(head, jax.random.PRNGKey(1))}
  drafter = EagleDrafter(head, num_draft=2, guidance=1.7)
  B, S, D, T = 2, 5, cfg.hidden_size, 12
  kc, ku, kt = jax.random.split(jax.random.PRNGKey(2), 3)
  fc, fu = jax.random.normal(kc, (B, S, D)), jax.random.normal(ku, (B, S, D))
  tokens = jax.random.randint(kt, (B, S), 0, 24)
  pos = jnp.broadcast_to(jnp.arange(1, S + 1), (B, S))
  out = drafter._call(hp, params, jnp.concatenate([fc, fu], -1), tokens, pos,
                      drafter._init_cache(B, T))
  for half, f in ((slice(0, D), fc), (slice(D, 2 * D), fu)):
    ref = head(hp["head"], params, f, tokens, pos, head.init_cache(B, T))
    np.testing.assert_allclose(out.features[..., half], ref.features, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.cache.lengths, jnp.full((B,), S))
  got = drafter._logits(hp, params, out.features)
  want = guide(head.logits(params, out.features[..., :D]),
               head.logits(params, out.features[..., D:]), 1.7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- sampling: the bonus-token path

def _sequence_law(lm, params, prompt, N, proc):
  """Every continuation of length N over the vocabulary and its exact probability under the
  processed target (one cache-free forward of all of them)."""
  Vt = lm.vocab_size
  seqs = np.array(list(itertools.product(range(Vt), repeat=N)), np.int32)
  full = np.concatenate([np.broadcast_to(prompt, (len(seqs), len(prompt))), seqs], axis=1)
  P = len(prompt)
  positions = jnp.broadcast_to(jnp.arange(full.shape[1]), full.shape)
  at = jnp.broadcast_to(P - 1 + jnp.arange(N), (len(seqs), N))
  logits = lm(params, jnp.asarray(full), positions, None, logits_at=at).logits  # [S, N, V]
  ctx = processors.ProcessorContext(sequences=None, seq_len=None, prompt_len=None,
                                    step=jnp.zeros((), jnp.int32))
  logp = jax.nn.log_softmax(proc(logits.reshape(-1, Vt), ctx).reshape(logits.shape), -1)
  picked = np.take_along_axis(np.asarray(logp), seqs[..., None], -1)[..., 0]
  return seqs, np.exp(picked.sum(1))


def _bonus_case():
  """A tiny transformer over 3 tokens (its whole vocabulary fits a small tree), sampled at
  temperature 0.9, and 12000 rows of one prompt."""
  cfg = tiny_config(vocab_size=3, num_layers=2, max_position_embeddings=32)
  lm = TransformerLM(cfg)
  params = transformer.init_params(cfg, jax.random.PRNGKey(7))
  return lm, params, processor_of({"temperature": 0.9}, [], sampling=True), 12000


@pytest.mark.parametrize("name", ["self-draft chain", "eagle chain", "eagle-2 tree",
                                  "dyspec tree", "eagle chain, reduced vocabulary"])
def test_sampling_law_holds_through_the_bonus_token(name):
  """Chi-square over every continuation of depth + 2 tokens: the prefill's token, then one
  verification call that accepts the whole draft (chain) or a full-depth path (tree) and draws
  the bonus token after it. The self-draft chain and the DySpec tree use all of the target's
  layers (q = p: every draft is accepted) and the trees hold every path of their depth, so the
  bonus is drawn on every row; the EAGLE chain's head is untrained, so only some rows reach the
  bonus token, and the test checks that enough do. With a reduced draft vocabulary the chain's
  q is zero on the token it never drafts, which the target must still emit at its rate."""
  lm, params, proc, B = _bonus_case()
  L = lm.config.num_layers
  if name == "self-draft chain":
    drafter, dparams, depth = model_drafter.ModelDrafter(lm, 2, self_layers=L), None, 2
  elif name == "dyspec tree":  # depth 2, all 3 + 9 nodes: every sampled path is in the tree
    drafter = dyspec.DySpecDrafter(lm, tree_budget=12, max_depth=2, max_children=3,
                                   self_layers=L)
    dparams, depth = None, 2
  else:
    head = eagle_head.EagleHead(eagle_head.HeadConfig(lm.config, feature_sampling=True))
    dparams = {"head": eagle_head.init_head_params(head, jax.random.PRNGKey(3))}
    tree = name == "eagle-2 tree"  # depth 2, 3 + 9 candidates, all kept: a full tree
    n_vocab = 0
    if "reduced" in name:  # drafts from tokens {2, 0} only: q is zero on token 1
      n_vocab, ids = 2, jnp.asarray([2, 0], jnp.int32)
      dparams.update(vocab_ids=ids,
                     vocab_w=eagle_head.draft_vocab_matrix(params, head.config, ids))
    drafter = EagleDrafter(head, num_draft=2, tree=tree, tree_budget=12, max_depth=2,
                           max_children=3, draft_vocab=n_vocab)
    depth = 2
  N = depth + 2
  prompt = np.asarray([1, 0, 2], np.int32)
  prompts = jnp.asarray(np.broadcast_to(prompt, (B, 3)))
  lens = jnp.full((B,), 3, jnp.int32)
  res = _spec(lm, params, drafter, dparams, prompts, lens, jnp.asarray([-1], jnp.int32), proc,
              N, sample=True, keys=row_keys(B, seed=21), cache_len=3 + N)
  # rows whose one verification call accepted the whole depth: their last token is the bonus
  bonus_rows = int(np.sum((np.asarray(res.extras["target_calls"]) == 1)
                          & (np.asarray(res.extras["accepted_drafts"]) == depth)))
  assert bonus_rows >= (B // 20 if "eagle chain" in name else B), bonus_rows
  seqs, probs = _sequence_law(lm, params, prompt, N, proc)
  p = _chi_square_pvalue(res.tokens, seqs, probs, lm.vocab_size)
  assert p > 1e-3, (name, p)


def test_prompt_lookup_proposes_once_per_iteration():
  """With plain target calls while nothing matches, the loop still asks the drafter for one
  proposal per iteration (plus the first), never a second one to test its condition."""
  calls = []

  @dataclasses.dataclass(frozen=True)
  class Counting(prompt_lookup.PromptLookupDrafter):
    def propose(self, *args):
      jax.debug.callback(lambda: calls.append(1))
      return super().propose(*args)

  Vt, n = 12, 10
  table = np.full((Vt, Vt), -10.0, np.float32)
  for a in range(Vt):  # every token leads into the cycle 6 -> 7 -> 8 -> 9 -> 6
    table[a, 6 + (a - 5) % 4 if a >= 6 else 6] = 10.0
  prompts = jnp.asarray([[1, 2, 3, 0, 0], [6, 7, 8, 9, 0]], jnp.int32)  # one never matches
  res = _spec(BigramLM(Vt), jnp.asarray(table), Counting(4, 2, 1), None, prompts,
              jnp.asarray([3, 5]), jnp.asarray([-1], jnp.int32), processor_of({}, []), n)
  iterations = int(np.max(res.extras["target_calls"]))
  assert iterations == n - 1  # the unmatched row: one token per call
  assert len(calls) == iterations + 1, (len(calls), iterations)


# ----------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_speculative_greedy_equals_greedy(smollm, prompt_ids):
  """On the real model, through `generate`: prompt lookup gives the greedy tokens and their
  log-probabilities (a ragged batch of raw and chat prompts). The other drafters' exactness is
  tested on tiny transformers above (the self-draft on the real model: bench_speculative's
  `exact` column)."""
  import ml_collections
  from configs import speculative as spec_cfg
  prompts = [prompt_ids[1], prompt_ids[6], prompt_ids[7]]
  eos, pad = [smollm.tokenizer.eos_id], smollm.tokenizer.pad_id
  base = ml_collections.ConfigDict(dict(strategy="greedy", max_new_tokens=24, batch_size=4))
  ref = run_config(smollm.lm, smollm.params, prompts, base, eos, pad)
  for drafter, extra in [("prompt_lookup", dict(num_draft_tokens=6))]:
    c = spec_cfg.get_config()
    c.max_new_tokens, c.batch_size, c.drafter = 24, 4, drafter
    for k, v in extra.items():
      c[k] = v
    out = run_config(smollm.lm, smollm.params, prompts, c, eos, pad)
    assert [o.output_ids for o in out] == [r.output_ids for r in ref], drafter
    for o, r in zip(out, ref):
      np.testing.assert_allclose(o.token_logprobs, r.token_logprobs, atol=2e-3)
      assert o.extras["target_calls"] >= 1


@pytest.mark.slow
def test_smollm2_shipped_eagle_head_is_exact_and_accepts_drafts(smollm, prompt_ids):
  """The shipped EAGLE head on SmolLM2 through `generate`: as a chain drafting from its
  8192-token reduced vocabulary and as an EAGLE-2 tree over the whole vocabulary, the greedy
  tokens are exactly greedy decoding's, and the head's drafts are accepted (tau > 1.3 on
  chat prompts; held-out chains of the trained head accept about 1 draft in 5)."""
  from decoding.cli import settings_from_config
  from decoding.runner import generate
  from decoding.strategy import Target
  target = Target.of(smollm)
  prompts = [prompt_ids[1], prompt_ids[6], prompt_ids[7]]
  ref = generate(target, prompts, settings_from_config(dict(strategy="greedy",
                                                             max_new_tokens=32)), batch_size=4)
  for extra in (dict(eagle_tree=False, num_draft_tokens=4, eagle_draft_vocab=8192),
                dict(eagle_tree=True, tree_budget=8, tree_depth=5, tree_children=2)):
    s = settings_from_config(dict(strategy="speculative", drafter="eagle", max_new_tokens=32,
                                  **extra))
    out = generate(target, prompts, s, batch_size=4)
    assert [o.output_ids for o in out] == [r.output_ids for r in ref], extra
    tau = (sum(o.extras["verified_tokens"] for o in out)
           / sum(o.extras["target_calls"] for o in out))
    assert tau > 1.3, (extra, tau)


def test_greedy_speculative_output_reports_its_gnll():
  """Lossless greedy speculative decoding is greedy decoding: its outputs carry the same
  G-NLL; sampled or LOSSY outputs are not greedy outputs and carry none."""
  prompts = [[2, 3], [5]]
  table = _bigram(0)
  base = dict(max_new_tokens=8, drafter="prompt_lookup")
  greedy = run_config(BigramLM(V), table, prompts, dict(strategy="greedy", max_new_tokens=8))
  spec = run_config(BigramLM(V), table, prompts, dict(strategy="speculative", **base))
  assert [g.gnll for g in spec] == pytest.approx([g.gnll for g in greedy])
  assert all(g.gnll is not None for g in spec)
  sampled = run_config(BigramLM(V), table, prompts,
                       dict(strategy="speculative", do_sample=True, **base))
  assert all(g.gnll is None for g in sampled)


def test_lossy_rules_reduce_to_the_lossless_ones_at_their_neutral_settings():
  """GAD++ with beta = 1 or tau = 0 is greedy verification; a larger beta/tau accepts at
  least as much. Lenience 1 is the lossless rule; lenience < 1 accepts at least as much."""
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(64, 5, 7) * 2, jnp.float32)
  drafts = jnp.asarray(rng.randint(0, 7, (64, 4)), jnp.int32)
  exact = verify.verify_chain(logits, drafts, None, row_keys(64), sample=False)
  for beta, tau in [(1, 3.0), (5, 0.0)]:
    r = verify.verify_chain_relaxed(logits, drafts, beta, tau)
    np.testing.assert_array_equal(r.num_accepted, exact.num_accepted)
    np.testing.assert_array_equal(r.next_token, exact.next_token)
  loose = verify.verify_chain_relaxed(logits, drafts, 5, 3.0)
  assert np.all(loose.num_accepted >= exact.num_accepted)
  assert loose.num_accepted.sum() > exact.num_accepted.sum()
  q = jax.nn.softmax(jnp.asarray(rng.randn(64, 4, 7), jnp.float32), -1)
  strict = verify.verify_chain(logits, drafts, q, row_keys(64), sample=True)
  same = verify.verify_chain(logits, drafts, q, row_keys(64), sample=True,
                             acceptance=Lenient(epsilon=1.0))
  lenient = verify.verify_chain(logits, drafts, q, row_keys(64), sample=True,
                                acceptance=Lenient(epsilon=0.3))
  np.testing.assert_array_equal(strict.num_accepted, same.num_accepted)
  assert np.all(lenient.num_accepted >= strict.num_accepted)

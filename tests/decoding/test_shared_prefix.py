"""Prefilling a prompt prefix common to a batch once (decoding/prefill.py): the same logits,
cache and tokens as prefilling every row in full, for greedy, sampling and exact-extract."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import prefill, runner
from decoding.beam_search import Beam
from decoding.errors import GenerationError
from decoding.exact_extract import ExactExtract, Query, search
from decoding.greedy import Greedy
from decoding.sampling import Sample
from decoding.strategy import Target
from models import transformer
from models.config import tiny_config
from models.lm import TransformerLM

V, EOS = 48, 1


@pytest.fixture(scope="module")
def tiny() -> Target:
  c = tiny_config(vocab_size=V, num_layers=2, max_position_embeddings=512)
  params = jax.tree.map(lambda x: x * 3.0, transformer.init_params(c, jax.random.PRNGKey(1)))
  return Target(TransformerLM(c), params, eos_ids=(EOS,), pad_id=0)


def few_shot_prompts(n: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
  """n prompts that start with the same `prefix_len` tokens (the in-context examples) and
  end in questions of different lengths."""
  rng = np.random.default_rng(seed)
  prefix = rng.integers(2, V, prefix_len).tolist()
  return [prefix + rng.integers(2, V, int(rng.integers(1, 20))).tolist() for _ in range(n)]


def test_shared_prefix_len_is_whole_blocks_and_leaves_each_prompt_a_token():
  assert prefill.shared_prefix_len([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]], block=4) == 4
  assert prefill.shared_prefix_len([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7]], block=2) == 4
  # identical prompts: the last token stays each row's own, so 8 tokens share 7 -> one block
  assert prefill.shared_prefix_len([[3] * 8, [3] * 8], block=4) == 4
  assert prefill.shared_prefix_len([[1, 2, 3, 4], [2, 2, 3, 4]], block=1) == 0
  assert prefill.shared_prefix_len([[1, 2, 3, 4, 5]], block=1) == 0  # one prompt: nothing to share
  assert prefill.shared_prefix_len(few_shot_prompts(5, 150)) == 128


@pytest.mark.parametrize("chunk", [512, 16])  # the rest in one pass, and in chunks
def test_prefill_with_shared_prefix_equals_full_prefill(tiny, chunk):
  lm, params = tiny.lm, tiny.params
  prompts = few_shot_prompts(3, 70)
  P = 96
  padded = np.zeros((3, P), np.int32)
  for b, p in enumerate(prompts):
    padded[b, :len(p)] = p
  lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
  full = prefill.prefill(lm, params, jnp.asarray(padded), lens, lm.init_cache(3, 128),
                         chunk=chunk, return_hidden=True)
  shared = prefill.prefill(lm, params, jnp.asarray(padded), lens, lm.init_cache(3, 128),
                           chunk=chunk, return_hidden=True, shared=64)
  np.testing.assert_allclose(shared[0], full[0], atol=1e-4)
  np.testing.assert_array_equal(shared[1].lengths, full[1].lengths)
  for b, n in enumerate(lens.tolist()):  # every valid cache slot and hidden state
    np.testing.assert_allclose(shared[1].k[:, b, :, :n], full[1].k[:, b, :, :n], atol=1e-4)
    np.testing.assert_allclose(shared[1].v[:, b, :, :n], full[1].v[:, b, :, :n], atol=1e-4)
    np.testing.assert_allclose(shared[2][b, :n], full[2][b, :n], atol=1e-4)


def test_prefill_refuses_a_shared_prefix_as_long_as_the_block(tiny):
  lm, params = tiny.lm, tiny.params
  with pytest.raises(ValueError, match="shared prefix"):
    prefill.prefill(lm, params, jnp.ones((2, 8), jnp.int32), jnp.full((2,), 8, jnp.int32),
                    lm.init_cache(2, 16), shared=8)


@pytest.mark.parametrize("settings", [Greedy(max_new_tokens=12),
                                      Sample(max_new_tokens=12, temperature=1.0, top_k=0,
                                             num_return_sequences=2)],
                         ids=["greedy", "sample"])
def test_generate_with_shared_prefix_gives_the_same_tokens(tiny, settings, monkeypatch):
  prompts = few_shot_prompts(6, 140, seed=2)
  used = []
  real = runner.shared_prefix_len
  monkeypatch.setattr(runner, "shared_prefix_len", lambda ps: used.append(real(ps)) or used[-1])
  plain = runner.generate(tiny, prompts, settings, seed=3, batch_size=4)
  shared = runner.generate(tiny, prompts, settings, seed=3, batch_size=4, share_prefix=True)
  assert used and all(u == 128 for u in used)  # the shared path ran, on every batch
  assert [g.output_ids for g in shared] == [g.output_ids for g in plain]
  for a, b in zip(shared, plain):
    np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)


def test_exact_extract_with_shared_prefix_ranks_the_same_spans(tiny):
  rng = np.random.default_rng(4)
  demos = tuple(int(t) for t in rng.integers(2, V, 100))  # the in-context examples
  tok = lambda k: tuple(int(t) for t in rng.integers(2, V, k))
  queries = [Query(before=demos + tok(3), passage=tok(int(rng.integers(5, 12))), after=tok(2),
                   example=e) for e in range(4)]
  s = ExactExtract(top_spans=10)
  plain = search(tiny, queries, s, batch_size=4)
  shared = search(tiny, queries, s, batch_size=4, share_prefix=True)
  for a, b in zip(shared, plain):
    assert [(sp.start, sp.end) for sp in a] == [(sp.start, sp.end) for sp in b]
    np.testing.assert_allclose([sp.nll for sp in a], [sp.nll for sp in b], atol=1e-4)


def test_share_prefix_is_refused_by_a_strategy_that_cannot(tiny):
  with pytest.raises(GenerationError, match="cannot share a prompt prefix.*greedy"):
    runner.generate(tiny, few_shot_prompts(2, 70), Beam(num_beams=2, max_new_tokens=4),
                    share_prefix=True)

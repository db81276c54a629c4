"""LANTERN relaxed acceptance: the neighbour table (self excluded, nearest first), the relaxed
mass (<= delta), delta = 0 is the strict rule, acceptance grows with delta, and the loop runs
it with speculative Jacobi decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.speculative import jacobi, lantern, loop, verify
from decoding.speculative.acceptance import Lantern, Strict
from tests.fakes import BigramLM
from tests.helpers import processor_of, row_keys


def test_neighbor_table_is_the_brute_force_order_without_self():
  rng = np.random.RandomState(0)
  cb = rng.randn(16, 2)
  t = np.asarray(lantern.neighbor_table(cb, 5, vocab_size=19))
  assert t.shape == (19, 5) and (t[16:] == -1).all()
  for v in range(16):
    d = ((cb - cb[v]) ** 2).sum(1)
    d[v] = np.inf
    assert t[v].tolist() == sorted(range(16), key=lambda j: (d[j], j))[:5]
    assert v not in t[v]


def _random_case(B=64, K=4, V=16, k=6, seed=0):
  rng = np.random.RandomState(seed)
  logits = jnp.asarray(rng.randn(B, K + 1, V) * 1.5, jnp.float32)
  q = jax.nn.softmax(jnp.asarray(rng.randn(B, K, V), jnp.float32), -1)
  keys = row_keys(B, seed)
  dkeys = jax.vmap(lambda kk: jax.random.split(jax.random.fold_in(kk, 99), K))(keys)
  drafts = jax.vmap(jax.vmap(jax.random.categorical))(dkeys, jnp.log(q)).astype(jnp.int32)
  table = lantern.neighbor_table(rng.randn(V, 2), k)
  return logits, drafts, q, keys, table


def test_relaxed_mass_never_exceeds_delta():
  logits, drafts, _, _, table = _random_case()
  p = jax.nn.softmax(logits[:, :-1], -1)
  for delta in (0.0, 0.05, 0.1, 0.3):
    extra, lent = verify.latent_relaxation(p, drafts, table, delta)
    assert float(extra.max()) <= delta + 1e-7
    # the lent neighbours are exactly those whose mass was added
    nb = table[drafts]
    lent_mass = jnp.sum(jnp.where(lent, jnp.take_along_axis(p, nb, -1), 0.0), -1)
    np.testing.assert_allclose(lent_mass, extra, atol=1e-6)
    assert not bool(jnp.any(lent & (nb == drafts[..., None])))


def test_delta_zero_is_the_strict_rule_and_acceptance_grows_with_delta():
  logits, drafts, q, keys, table = _random_case()
  offsets = jnp.zeros((logits.shape[0],), jnp.int32)
  for sample, probs in ((True, q), (True, None), (False, None)):
    strict = verify.verify_chain(logits, drafts, probs, keys, sample, offsets)
    zero = verify.verify_chain(logits, drafts, probs, keys, sample, offsets,
                               Lantern(neighbors=table, delta=0.0))
    np.testing.assert_array_equal(zero.num_accepted, strict.num_accepted)
    np.testing.assert_array_equal(zero.next_token, strict.next_token)
    prev = None
    for delta in (0.0, 0.05, 0.1, 0.2, 0.5):
      n = verify.verify_chain(logits, drafts, probs, keys, sample, offsets,
                              Lantern(neighbors=table, delta=delta)).num_accepted
      if prev is not None and probs is not None:  # same uniforms: row by row
        assert bool(jnp.all(n >= prev)), (sample, delta)
      prev = n
    assert float(prev.mean()) > float(strict.num_accepted.mean())


def test_lantern_in_the_loop_with_jacobi_decoding():
  """SJD with LANTERN (delta > 0) accepts more drafts per call than strict SJD on the same
  seeds (delta = 0 is the strict rule: test_delta_zero_is_the_strict_rule...)."""
  V = 24
  lm, params = BigramLM(V), jnp.asarray(np.random.RandomState(1).randn(V, V) * 2.0, jnp.float32)
  table = lantern.neighbor_table(np.random.RandomState(2).randn(V, 2), 4)
  B = 16
  prompts = jnp.asarray(np.random.RandomState(3).randint(0, V, (B, 3)), jnp.int32)
  lens = jnp.full((B,), 3, jnp.int32)
  proc = processor_of({"temperature": 0.7}, [], sampling=True)
  d = jacobi.JacobiDrafter(num_draft=4)

  def run(acceptance):
    return loop.speculative_decode(
        lm, params, d, None, prompts, lens, row_keys(B, 5), jnp.asarray([-1], jnp.int32),
        processor=proc, sample=True, pad_id=0, max_new_tokens=16, cache_len=16,
        acceptance=acceptance)

  strict = run(Strict())
  relaxed = run(Lantern(neighbors=table, delta=0.3))
  tau = lambda r: float(r.extras["verified_tokens"].sum() / r.extras["target_calls"].sum())
  assert tau(relaxed) > tau(strict)


def _one_token_law(p, q, table, delta, point_mass, n=200000, seed=0):
  """The empirical law of the token one verified position emits (the accepted draft, or the
  residual draw after a rejection), over n independent draws, and the fraction accepted."""
  V = p.shape[0]
  keys = row_keys(n, seed)
  logits = jnp.broadcast_to(jnp.log(p), (n, 2, V))
  if point_mass:  # a deterministic draft: always the same token, q = one-hot
    drafts = jnp.full((n, 1), int(jnp.argmax(q)), jnp.int32)
    probs = None
  else:  # a sampled draft, d ~ q
    dkeys = jax.vmap(lambda k: jax.random.fold_in(k, 99))(keys)
    drafts = jax.vmap(jax.random.categorical, (0, None))(dkeys, jnp.log(q))[:, None]
    probs = jnp.broadcast_to(q, (n, 1, V))
  v = verify.verify_chain(logits, drafts.astype(jnp.int32), probs, keys, True,
                          jnp.zeros((n,), jnp.int32), Lantern(neighbors=table, delta=delta))
  out = np.where(np.asarray(v.num_accepted) == 1, np.asarray(drafts[:, 0]),
                 np.asarray(v.next_token))
  return np.bincount(out, minlength=V) / n, float(np.mean(np.asarray(v.num_accepted)))


@pytest.mark.slow
def test_lantern_bounds_the_borrowed_mass_not_the_output_distance():
  """What LANTERN bounds is the mass a draft borrows from its neighbours (c <= delta). With a
  point-mass draft the emitted token's law is the target's with that mass moved from the
  lent neighbours onto the draft: its total variation from the target is exactly c. With a
  sampled draft the residual heuristic breaks this, and the distance exceeds delta here
  (about 0.17 at delta = 0.1; decoding/speculative/lantern.py quotes this test)."""
  rng = np.random.RandomState(6)
  V, k, delta = 8, 3, 0.1
  table = lantern.neighbor_table(rng.randn(V, 2), k)
  p = jax.nn.softmax(jnp.asarray(rng.randn(V) * 1.5, jnp.float32))
  q = jax.nn.softmax(jnp.asarray(rng.randn(V) * 1.5, jnp.float32))
  noise = 0.01  # ~ 3 standard errors of a TV estimate from 2e5 draws over 8 tokens
  tv = lambda law: 0.5 * float(np.abs(law - np.asarray(p)).sum())
  for point_mass in (False, True):  # delta = 0: the target's law either way
    assert tv(_one_token_law(p, q, table, 0.0, point_mass)[0]) < noise
  d = jnp.argmax(q)
  borrowed = float(verify.latent_relaxation(p[None, None], d[None, None], table, delta)[0][0, 0])
  assert 0 < borrowed <= delta
  assert abs(tv(_one_token_law(p, q, table, delta, True)[0]) - borrowed) < noise
  assert tv(_one_token_law(p, q, table, delta, False)[0]) > delta + noise


def _two_child_tree(B, p, d1, d2):
  """Root (node 0) with two children d1 (node 1, the drafter's first) and d2 (node 2); the
  target distribution after the root is p, after the children anything."""
  V = p.shape[0]
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (B, 3, V))
  tokens = jnp.broadcast_to(jnp.asarray([0, d1, d2], jnp.int32), (B, 3))
  parents = jnp.broadcast_to(jnp.asarray([-1, 0, 0], jnp.int32), (B, 3))
  depth = jnp.broadcast_to(jnp.asarray([0, 1, 1], jnp.int32), (B, 3))
  valid = jnp.ones((B, 3), bool)
  return logits, tokens, parents, depth, valid


def _tree_first_token(v, d1, d2):
  n, path = np.asarray(v.num_accepted), np.asarray(v.path[:, 0])
  return np.where(n == 1, np.where(path == 1, d1, d2), np.asarray(v.next_token))


def test_tree_lantern_at_delta_zero_is_the_strict_tree_rule():
  rng = np.random.RandomState(5)
  V, B, N = 12, 32, 7
  logits = jnp.asarray(rng.randn(B, N, V) * 2, jnp.float32)
  tokens = jnp.asarray(rng.randint(0, V, (B, N)), jnp.int32)
  parents = jnp.broadcast_to(jnp.asarray([-1, 0, 0, 1, 1, 2, 3], jnp.int32), (B, N))
  depth = jnp.broadcast_to(jnp.asarray([0, 1, 1, 2, 2, 2, 3], jnp.int32), (B, N))
  valid = jnp.ones((B, N), bool)
  table = lantern.neighbor_table(rng.randn(V, 2), 4)
  for sample in (False, True):
    strict = verify.verify_tree(logits, tokens, parents, depth, valid, row_keys(B), sample, 3)
    zero = verify.verify_tree(logits, tokens, parents, depth, valid, row_keys(B), sample, 3,
                              acceptance=Lantern(neighbors=table, delta=0.0))
    for field in ("num_accepted", "path", "next_token"):
      np.testing.assert_array_equal(getattr(strict, field), getattr(zero, field))
    relaxed = verify.verify_tree(logits, tokens, parents, depth, valid, row_keys(B), sample, 3,
                                 acceptance=Lantern(neighbors=table, delta=0.3))
    assert bool(jnp.all(relaxed.num_accepted >= strict.num_accepted)), sample


@pytest.mark.slow
def test_tree_lantern_moves_each_childs_lent_mass_onto_it():
  """Sampling: the token a two-child node emits follows the target's law with each child's
  lent neighbours' mass moved onto that child (an exact match wins; the first child wins a
  neighbour both could borrow). Chi-square against that law over 100k draws."""
  from scipy import stats
  V = 8
  p = np.asarray([0.05, 0.2, 0.04, 0.03, 0.3, 0.08, 0.1, 0.2])
  codebook = np.asarray([[0, 0], [20, 20], [0.1, 0], [5, 0], [-20, 0], [5.1, 0], [0, -20],
                         [20, -20]])  # 0 lends from 2 (and 3, a drafted child); 3 from 5
  table = lantern.neighbor_table(codebook, 3)
  d1, d2, delta = 0, 3, 0.1
  extra, lent = verify.latent_relaxation(jnp.asarray(p, jnp.float32)[None, None].repeat(2, 1),
                                         jnp.asarray([[d1, d2]], jnp.int32), table, delta)
  law = p.copy()
  taken = {d1, d2}
  for d, row in ((d1, 0), (d2, 1)):
    for nb, is_lent in zip(np.asarray(table[d]), np.asarray(lent[0, row])):
      if is_lent and nb not in taken:
        law[d] += law[nb]
        law[nb] = 0.0
        taken.add(int(nb))
  assert law[d1] > p[d1] and law[d2] > p[d2]  # both children borrow something here
  B = 100000
  v = verify.verify_tree(*_two_child_tree(B, p, d1, d2), row_keys(B, 7), True, 1,
                         acceptance=Lantern(neighbors=table, delta=delta))
  counts = np.bincount(_tree_first_token(v, d1, d2), minlength=V)
  keep = law > 0
  assert counts[~keep].sum() == 0
  assert stats.chisquare(counts[keep], law[keep] / law[keep].sum() * B).pvalue > 1e-3


def test_tree_lantern_greedy_accepts_a_child_whose_relaxed_mass_reaches_the_argmax():
  V = 6
  p = np.asarray([0.3, 0.26, 0.05, 0.02, 0.2, 0.17])  # argmax 0
  codebook = np.asarray([[9, 9], [0, 0], [0.1, 0], [-9, 0], [5, -5], [0, 0.1]])
  table = lantern.neighbor_table(codebook, 2)  # neighbours of 1: 2, 5; of 4: 2, 1
  tree = _two_child_tree(1, p, 4, 1)  # 4 borrows 0.05 (0.25 < 0.3), 1 borrows 0.05 (0.31)
  strict = verify.verify_tree(*tree, row_keys(1), False, 1)
  assert int(strict.num_accepted[0]) == 0 and int(strict.next_token[0]) == 0
  v = verify.verify_tree(*tree, row_keys(1), False, 1,
                         acceptance=Lantern(neighbors=table, delta=0.15))
  assert int(v.num_accepted[0]) == 1 and int(v.path[0, 0]) == 2  # node 2 holds token 1

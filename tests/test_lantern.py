"""LANTERN relaxed acceptance: the neighbour table (self excluded, nearest first), the relaxed
mass (<= delta), delta = 0 is the strict rule, acceptance grows with delta, and the loop runs
it with speculative Jacobi decoding."""
import jax
import jax.numpy as jnp
import numpy as np

from decoding import jacobi, lantern, processors, speculative, verify
from tests.test_speculative import _keys


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
  keys = _keys(B, seed)
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
    zero = verify.verify_chain(logits, drafts, probs, keys, sample, offsets, neighbors=table,
                               delta=0.0)
    np.testing.assert_array_equal(zero.num_accepted, strict.num_accepted)
    np.testing.assert_array_equal(zero.next_token, strict.next_token)
    prev = None
    for delta in (0.0, 0.05, 0.1, 0.2, 0.5):
      n = verify.verify_chain(logits, drafts, probs, keys, sample, offsets, neighbors=table,
                              delta=delta).num_accepted
      if prev is not None and probs is not None:  # same uniforms: row by row
        assert bool(jnp.all(n >= prev)), (sample, delta)
      prev = n
    assert float(prev.mean()) > float(strict.num_accepted.mean())


def test_lantern_in_the_loop_with_jacobi_decoding():
  """SJD with relaxation ("lantern", delta > 0) accepts more drafts per call than strict SJD
  on the same seeds (delta = 0 is the strict rule: test_delta_zero_is_the_strict_rule...)."""
  from tests.fakes import BigramLM
  V = 24
  lm, params = BigramLM(V), jnp.asarray(np.random.RandomState(1).randn(V, V) * 2.0, jnp.float32)
  table = lantern.neighbor_table(np.random.RandomState(2).randn(V, 2), 4)
  B = 16
  prompts = jnp.asarray(np.random.RandomState(3).randint(0, V, (B, 3)), jnp.int32)
  lens = jnp.full((B,), 3, jnp.int32)
  proc = processors.build({"temperature": 0.7}, [], sampling=True)
  d = jacobi.JacobiDrafter(num_draft=4)

  def run(relaxation):
    return speculative.speculative_decode(
        lm, params, d, None, prompts, lens, _keys(B, 5), jnp.asarray([-1], jnp.int32),
        processor=proc, reads_context=False, sample=True, pad_id=0, max_new_tokens=16,
        cache_len=32, relaxation=relaxation, neighbors=table)

  strict = speculative.speculative_decode(
      lm, params, d, None, prompts, lens, _keys(B, 5), jnp.asarray([-1], jnp.int32),
      processor=proc, reads_context=False, sample=True, pad_id=0, max_new_tokens=16,
      cache_len=32)
  relaxed = run(("lantern", 0.3))
  tau = lambda r: float(r.extras["verified_tokens"].sum() / r.extras["target_calls"].sum())
  assert tau(relaxed) > tau(strict)

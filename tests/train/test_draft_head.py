"""The EAGLE / FSPAD draft head (models/eagle_head.py) and its training (train/draft_head.py),
on tiny random models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from models import artifacts, checkpoint, eagle_head as dh, registry, transformer
from models.config import tiny_config
from models.lm import TransformerLM
from train import data as data_lib
from train import draft_head as tdh
from train import optim, tasks, trainer

TARGET = tiny_config(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                     max_position_embeddings=256)
SHA = registry.MODELS["smollm2-135m-instruct"].sha256


# One head configuration for every test (each distinct config compiles its own functions):
# both FSPAD options on. Partial alignment only changes the loss, so the network is the
# feature-sampling one.
HEAD = dh.EagleHead(dh.HeadConfig(TARGET, feature_sampling=True, partial_alignment=True,
                                  partial_fraction=0.75))


def _setup(seed=0):
  tp = transformer.init_params(TARGET, jax.random.PRNGKey(seed))
  hp = dh.init_head_params(HEAD, jax.random.PRNGKey(seed + 1))
  # the sampler's matrix starts at zero: give it weight so the tests cover it
  hp["feature_sampler"]["kernel"] = 0.2 * jax.random.normal(
      jax.random.PRNGKey(seed + 2), hp["feature_sampler"]["kernel"].shape)
  return tp, HEAD, hp


def _inputs(B, S, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(100 + seed))
  feats = jax.random.normal(k1, (B, S, TARGET.hidden_size))
  toks = jax.random.randint(k2, (B, S), 0, TARGET.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(1, S + 1, dtype=jnp.int32), (B, S))
  return feats, toks, pos


B = 8  # every test uses 8 rows and a 32-slot head cache: compiled functions are shared


def test_incremental_decoding_equals_full_pass():
  tp, head, hp = _setup()
  S = 9
  feats, toks, pos = _inputs(B, S)
  full = head(hp, tp, feats, toks, pos, None)
  assert full.cache is None
  assert full.features.shape == (B, S, TARGET.hidden_size)
  assert full.logits.shape == (B, S, TARGET.vocab_size) and full.logits.dtype == jnp.float32
  for blocks in ([1] * S, [3, 3, 3]):
    cache, outs, s = head.init_cache(B, 32), [], 0
    for n in blocks:
      out = head(hp, tp, feats[:, s:s + n], toks[:, s:s + n], pos[:, s:s + n], cache)
      cache, s = out.cache, s + n
      outs.append(out)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [S] * B)
    np.testing.assert_allclose(jnp.concatenate([o.features for o in outs], 1), full.features,
                               atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([o.logits for o in outs], 1), full.logits,
                               atol=2e-5, rtol=2e-5)
  # draft logits are the target's tied LM head applied to f̂
  np.testing.assert_allclose(full.logits, full.features @ tp["embed"]["table"], atol=1e-5)


def test_cache_mask_node_sees_only_its_ancestors():
  """A tree grown inside the cache: prefix (4 pairs), then nodes a, c (siblings), then b
  (child of a), then d (child of b). Each node's output equals the plain sequence
  prefix, a, b, d fed without a cache."""
  tp, head, hp = _setup()
  feats, toks, _ = _inputs(B, 8, seed=1)
  P = 4
  a, c, b, d = 4, 5, 6, 7  # columns of feats/toks used for the nodes
  cols = lambda *i: (feats[:, list(i)], toks[:, list(i)])
  at = lambda *v: jnp.broadcast_to(jnp.asarray(v, jnp.int32)[None], (B, len(v)))
  slots = jnp.arange(32)
  sees = lambda *extra: jnp.broadcast_to(
      ((slots < P) | jnp.isin(slots, jnp.asarray(extra)))[None, None], (B, 1, 32))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((2, 2), bool)), (B, 2, 2))
  cache = head.init_cache(B, 32)
  for s in (0, 2):  # the prefix, two pairs per call
    cache = head(hp, tp, *cols(s, s + 1), at(s + 1, s + 2), cache, attn_mask=causal).cache
  # depth 1: a and c in one call, each sees the prefix and itself, not its sibling
  lvl1 = head(hp, tp, *cols(a, c), at(P + 1, P + 1), cache,
              attn_mask=jnp.broadcast_to(jnp.eye(2, dtype=bool), (B, 2, 2)))
  # slots now: 0..3 prefix, 4 = a, 5 = c
  lvl2 = head(hp, tp, *cols(b), at(P + 2), lvl1.cache, cache_mask=sees(4))  # b: slot 6
  lvl3 = head(hp, tp, *cols(d), at(P + 3), lvl2.cache, cache_mask=sees(4, 6))
  path = [0, 1, 2, 3, a, b, d]
  plain = head(hp, tp, *cols(*path), at(*range(1, len(path) + 1)), None)
  np.testing.assert_allclose(lvl1.logits[:, 0], plain.logits[:, 4], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lvl2.features[:, 0], plain.features[:, 5], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lvl3.features[:, 0], plain.features[:, 6], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lvl3.logits[:, 0], plain.logits[:, 6], atol=2e-5, rtol=2e-5)
  # b allowed to see its sibling c too: a different output
  leaky = head(hp, tp, *cols(b), at(P + 2), lvl1.cache, cache_mask=sees(4, 5))
  assert not np.allclose(leaky.features, lvl2.features, atol=1e-4)


def _synthetic_arrays(tp, num, seed):
  """Target arrays of `num` bigram-source rows of 24 tokens (6 prompt + 18 answer)."""
  rows = tasks.synthetic_sequences(num, 24, TARGET.vocab_size, seed=seed)
  examples = [{"prompt_ids": list(map(int, r[:6])), "answer_ids": list(map(int, r[6:]))}
              for r in rows]
  return tdh.target_arrays(TransformerLM(TARGET), tp, examples, 24, B, log=lambda s: None)


def test_chain_drafts_match_step_by_step_drafting():
  """`train.draft_head.chain_drafts` (every chain at once, through cache_mask) equals
  drafting chain by chain with a plain cache, feeding f̂ back as the next feature."""
  tp, head, hp = _setup()
  arrays = _synthetic_arrays(tp, B, seed=3)
  out_w = dh.output_weights(tp, head.config)
  depth = 3
  drafts = np.asarray(tdh.chain_drafts(head, hp, out_w, arrays, depth))  # [B, depth, S]
  toks, hid = jnp.asarray(arrays["tokens"]), jnp.asarray(arrays["hidden"])
  at = lambda v: jnp.full((B, 1), v, jnp.int32)
  cache, after = head.init_cache(B, 32), []
  for t in range(16):  # the true pairs one at a time; keep each prefix's cache and output
    out = head(hp, tp, hid[:, t:t + 1], toks[:, t + 1:t + 2], at(t + 1), cache)
    cache = out.cache
    after.append(out)
  for t0 in (5, 9, 15):
    out = after[t0]  # depth 1 of the chain from t0
    for j in range(1, depth + 1):
      if j > 1:
        out = head(hp, tp, out.features, toks[:, t0 + j:t0 + j + 1], at(t0 + j), out.cache)
      np.testing.assert_array_equal(np.argmax(out.logits[:, 0], -1), drafts[:, j - 1, t0],
                                    err_msg=f"t0={t0} depth={j}")


def test_training_reduces_loss_and_raises_agreement():
  tp = transformer.init_params(TARGET, jax.random.PRNGKey(0))
  arrays = _synthetic_arrays(tp, 72, seed=5)  # the head learns the target's distributions
  train = {k: v[:64] for k, v in arrays.items()}
  held = {k: v[64:] for k, v in arrays.items()}
  head = HEAD
  out_w = dh.output_weights(tp, head.config)
  hp0 = dh.init_head_params(head, jax.random.PRNGKey(1))
  loss_fn = tdh.eagle_loss(head, w_cls=0.1, noise=0.05, ce_pairs=8)  # sampled CE pairs
  eval_fn = tdh.eagle_loss(head, w_cls=0.1, noise=0.0)
  steps = 300
  opt = ml_collections.ConfigDict(dict(name="adamw", learning_rate=3e-3, schedule="cosine",
                                       warmup_steps=20, grad_clip=1.0))
  tr = trainer.Trainer(loss_fn, optim.make_optimizer(opt, steps), assemble=lambda h, o: (h, o),
                       eval_loss_fn=eval_fn)
  state = tr.init_state(hp0, jax.random.key(0))
  before_eval = tr.evaluate(state, out_w, data_lib.eval_batches(held, 8))
  before = tdh.acceptance(head, hp0, out_w, held, depth=3, batch_size=8)
  state = tr.fit(state, out_w, data_lib.ArrayData(train, 16), steps, progress=False)
  after_eval = tr.evaluate(state, out_w, data_lib.eval_batches(held, 8))
  after = tdh.acceptance(head, state.params, out_w, held, depth=3, batch_size=8)
  assert after_eval["loss"] < 0.7 * before_eval["loss"], (before_eval, after_eval)
  assert after["top1"] > before["top1"] + 0.2, (before, after)
  assert after["expected_accepted"] > before["expected_accepted"], (before, after)


def test_save_load_round_trip_and_target_check(tmp_path):
  tp, head, hp = _setup()
  path = str(tmp_path / "head")
  dh.save_head(path, head, hp, {"note": "test"}, target_name="smollm2-135m-instruct",
               target_sha256=SHA)
  head2, hp2 = dh.load_head(path)  # checked against the registered target it names
  assert head2 == head and hash(head2) == hash(head)
  rounded = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), hp)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), rounded, hp2)
  _, manifest = artifacts.read_manifest(path, "eagle_head")
  assert manifest["params"]["storage_dtype"] == "bfloat16"
  assert manifest["target"] == {"name": "smollm2-135m-instruct", "sha256": SHA,
                                "architecture": artifacts.architecture(TARGET)}
  assert manifest["info"] == {"note": "test"}
  feats, toks, pos = _inputs(1, 5)
  np.testing.assert_allclose(head2(hp2, tp, feats, toks, pos, None).logits,
                             head(rounded, tp, feats, toks, pos, None).logits, atol=1e-5)
  # the stored checksum is the registry's; another target is refused with a clear message
  dh.load_head(path, target_sha256=SHA.upper())
  with pytest.raises(dh.TargetMismatchError, match="was trained on a target with sha256"):
    dh.load_head(path, target_sha256="0" * 64)
  assert issubclass(dh.TargetMismatchError, checkpoint.ChecksumError)
  with pytest.raises(ValueError, match="unknown model or artifact"):
    dh.load_head(str(tmp_path / "missing"))


def test_config_validation_and_registry():
  with pytest.raises(ValueError, match="feature"):
    dh.HeadConfig(TARGET, feature="penultimate")
  with pytest.raises(ValueError, match="partial_fraction"):
    dh.HeadConfig(TARGET, partial_alignment=True, partial_fraction=0.0)
  assert HEAD.config.aligned_dims == 24
  assert dh.HeadConfig(TARGET).aligned_dims == 32
  shipped = registry.ARTIFACTS["eagle-smollm2-135m"]
  assert shipped.kind == "eagle_head" and shipped.target == "smollm2-135m-instruct"
  untied = TARGET.replace(tie_word_embeddings=False)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  tp = {"embed": {"table": jax.random.normal(k1, (32, 48))},  # all the head reads
        "lm_head": {"kernel": jax.random.normal(k2, (32, 48))}}
  head = dh.EagleHead(dh.HeadConfig(untied))
  hp = dh.init_head_params(head, jax.random.PRNGKey(1))
  out = head(hp, tp, *_inputs(1, 3), None)
  np.testing.assert_allclose(out.logits, out.features @ tp["lm_head"]["kernel"], atol=1e-5)


def test_token_ranking_orders_by_count_then_id():
  counts = np.asarray([0, 5, 2, 5, 0, 9])
  np.testing.assert_array_equal(dh.token_ranking(counts), [5, 1, 3, 2, 0, 4])


@pytest.mark.parametrize("kernel", ["xla", "packed"])
def test_reduced_vocabulary_logits_are_the_full_logits_on_the_subset(kernel):
  """Draft logits over V' gathered LM-head columns equal the full head's logits at those ids
  (to matmul round-off) and are the finite NOT_DRAFTED filler everywhere else."""
  tp, head, _ = _setup()
  if kernel == "packed":
    from models import packed_matmul
    if packed_matmul.unavailable_reason():
      pytest.skip(packed_matmul.unavailable_reason())
    tp = transformer.pack_params(tp)
  ids = jnp.asarray(dh.token_ranking(np.arange(TARGET.vocab_size) % 7)[:16])
  w = dh.draft_vocab_matrix(tp, head.config, ids)
  assert w.ndim == (3 if kernel == "packed" else 2)
  feats = jax.random.normal(jax.random.PRNGKey(3), (2, 3, TARGET.hidden_size))
  full = np.asarray(head.logits(tp, feats))
  small = np.asarray(dh.draft_logits(w, ids, feats, TARGET.vocab_size))
  inside = np.zeros(TARGET.vocab_size, bool)
  inside[np.asarray(ids)] = True
  np.testing.assert_allclose(small[..., inside], full[..., inside], rtol=1e-5, atol=1e-5)
  assert np.all(small[..., ~inside] == dh.NOT_DRAFTED)


def test_the_ranking_is_saved_with_the_head_and_checked(tmp_path):
  tp, head, hp = _setup()
  ranking = dh.token_ranking(np.arange(TARGET.vocab_size)[::-1])
  path = str(tmp_path / "head")
  dh.save_head(path, head, hp, target_name="smollm2-135m-instruct", target_sha256=SHA,
               ranking=ranking)
  head2, hp2, got = dh.load_head(path, with_ranking=True)
  np.testing.assert_array_equal(got, ranking)
  assert set(hp2) == set(hp)  # the ranking is not a parameter of the network
  assert dh.load_head(path)[1].keys() == hp.keys()
  with pytest.raises(ValueError, match="every token id"):
    dh.save_head(str(tmp_path / "bad"), head, hp, target_name="smollm2-135m-instruct",
                 target_sha256=SHA, ranking=ranking[:-1])


def test_acceptance_with_a_reduced_vocabulary_never_drafts_outside_it():
  """Chain drafts restricted to a subset land in it; restricting to the tokens the head
  would draft anyway changes nothing."""
  tp, head, hp = _setup()
  out_w = dh.output_weights(tp, head.config)
  B, T = 2, 9
  tokens = jax.random.randint(jax.random.PRNGKey(4), (B, T), 0, TARGET.vocab_size)
  hidden = jax.random.normal(jax.random.PRNGKey(5), (B, T, TARGET.hidden_size))
  batch = {"tokens": tokens, "hidden": hidden}
  free = np.asarray(tdh.chain_drafts(head, hp, out_w, batch, 3))
  ids = np.asarray([1, 4, 9, 30])
  mask = jnp.zeros((TARGET.vocab_size,), bool).at[ids].set(True)
  restricted = np.asarray(tdh.chain_drafts(head, hp, out_w, batch, 3, mask))
  assert np.isin(restricted, ids).all()
  same = jnp.zeros((TARGET.vocab_size,), bool).at[np.unique(free)].set(True)
  np.testing.assert_array_equal(np.asarray(tdh.chain_drafts(head, hp, out_w, batch, 3, same)),
                                free)

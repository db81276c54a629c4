"""The EAGLE / FSPAD draft head (models/draft_head.py) and its training (train/draft_head.py),
on tiny random models."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from models import checkpoint, draft_head as dh, registry, transformer
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


def test_incremental_decoding_equals_full_pass():
  tp, head, hp = _setup()
  B, S = 2, 9
  feats, toks, pos = _inputs(B, S)
  full = head(hp, tp, feats, toks, pos, None)
  assert full.cache is None
  assert full.features.shape == (B, S, TARGET.hidden_size)
  assert full.logits.shape == (B, S, TARGET.vocab_size) and full.logits.dtype == jnp.float32
  for blocks in ([1] * S, [3, 3, 3]):
    cache, outs, s = head.init_cache(B, 16), [], 0
    for n in blocks:
      out = head(hp, tp, feats[:, s:s + n], toks[:, s:s + n], pos[:, s:s + n], cache)
      cache, s = out.cache, s + n
      outs.append(out)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [S, S])
    np.testing.assert_allclose(jnp.concatenate([o.features for o in outs], 1), full.features,
                               atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([o.logits for o in outs], 1), full.logits,
                               atol=2e-5, rtol=2e-5)
  # draft logits are the target's tied LM head applied to f̂
  np.testing.assert_allclose(full.logits, full.features @ tp["embed"]["table"], atol=1e-5)


def test_cache_mask_node_sees_only_its_ancestors():
  """A tree grown inside the cache: prefix P (4 pairs), then nodes a, c (siblings), then b
  (child of a), then d (child of b). d's output must equal the plain sequence P a b d."""
  tp, head, hp = _setup()
  feats, toks, _ = _inputs(1, 8, seed=1)
  P = 4
  f = lambda i: feats[:, i:i + 1]
  t = lambda i: toks[:, i:i + 1]
  p = lambda v: jnp.full((1, 1), v, jnp.int32)
  a, c, b, d = 4, 5, 6, 7  # rows of feats/toks used for the nodes
  pos_p = jnp.arange(1, P + 1, dtype=jnp.int32)[None]
  cache = head.init_cache(1, 12)
  cache = head(hp, tp, feats[:, :P], toks[:, :P], pos_p, cache).cache
  # depth 1: a and c together, each sees the prefix and itself (not its sibling)
  lvl1 = head(hp, tp, jnp.concatenate([f(a), f(c)], 1), jnp.concatenate([t(a), t(c)], 1),
              jnp.full((1, 2), P + 1, jnp.int32), cache, attn_mask=jnp.eye(2, dtype=bool)[None])
  cache = lvl1.cache  # slots: 0..3 prefix, 4 = a, 5 = c
  slots = jnp.arange(12)
  b_mask = ((slots < P) | (slots == 4))[None, None]  # prefix + a, not c
  lvl2 = head(hp, tp, f(b), t(b), p(P + 2), cache, cache_mask=b_mask)
  cache = lvl2.cache  # slot 6 = b
  d_mask = ((slots < P) | (slots == 4) | (slots == 6))[None, None]
  lvl3 = head(hp, tp, f(d), t(d), p(P + 3), cache, cache_mask=d_mask)
  path = [0, 1, 2, 3, a, b, d]
  plain = head(hp, tp, feats[:, path], toks[:, path],
               jnp.arange(1, len(path) + 1, dtype=jnp.int32)[None], None)
  np.testing.assert_allclose(lvl3.features[:, 0], plain.features[:, -1], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lvl2.features[:, 0], plain.features[:, -2], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lvl1.logits[:, 0], plain.logits[:, 4], atol=2e-5, rtol=2e-5)
  # without the mask, b would also see its sibling c, and its output changes
  unmasked = head(hp, tp, f(b), t(b), p(P + 2), lvl1.cache)
  assert not np.allclose(unmasked.features, lvl2.features, atol=1e-4)


def test_chain_metric_matches_step_by_step_drafting():
  """`train.draft_head.chain_matches` (all chains at once through cache_mask) equals drafting
  one chain at a time with a plain cache."""
  tp, head, hp = _setup()
  lm = TransformerLM(TARGET)
  rows = tasks.synthetic_sequences(2, 12, TARGET.vocab_size, seed=3)
  arrays = tdh.target_arrays(lm, tp, [{"prompt_ids": list(r[:4]), "answer_ids": list(r[4:])}
                                      for r in rows], 12, 2, log=lambda s: None)
  out_w = dh.output_weights(tp, head.config)
  batch = {k: jnp.asarray(arrays[k]) for k in ("tokens", "hidden", "argmax")}
  depth = 3
  m = np.asarray(tdh.chain_matches(head, hp, out_w, batch, depth))  # [B, depth, S]
  toks, hid, am = arrays["tokens"], arrays["hidden"], arrays["argmax"]
  for b in range(2):
    for t0 in (2, 5, 7):
      cache = head.init_cache(1, 16)
      out = head(hp, tp, jnp.asarray(hid[b:b + 1, :t0 + 1]), jnp.asarray(toks[b:b + 1, 1:t0 + 2]),
                 jnp.arange(1, t0 + 2, dtype=jnp.int32)[None], cache)
      for j in range(1, depth + 1):
        if j > 1:
          out = head(hp, tp, out.features[:, -1:], jnp.asarray(toks[b:b + 1, t0 + j:t0 + j + 1]),
                     jnp.full((1, 1), t0 + j, jnp.int32), out.cache)
        got = int(jnp.argmax(out.logits[0, -1]))
        assert m[b, j - 1, t0] == (got == am[b, t0 + j]), (b, t0, j)


def test_training_reduces_loss_and_raises_agreement():
  lm = TransformerLM(TARGET)
  tp = transformer.init_params(TARGET, jax.random.PRNGKey(0))
  # rows from a bigram source; the head learns the target's distributions on them
  rows = tasks.synthetic_sequences(72, 24, TARGET.vocab_size, seed=5)
  examples = [{"prompt_ids": list(map(int, r[:6])), "answer_ids": list(map(int, r[6:]))}
              for r in rows]
  arrays = tdh.target_arrays(lm, tp, examples, 24, 72, log=lambda s: None)
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
  dh.save_head(path, head, hp, {"target": "smollm2-135m-instruct", "note": "test"})
  head2, hp2 = dh.load_head(path)
  assert head2 == head and hash(head2) == hash(head)
  rounded = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), hp)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), rounded, hp2)
  assert dh.read_manifest(path)["param_storage"] == "bfloat16"
  feats, toks, pos = _inputs(1, 5)
  np.testing.assert_allclose(head2(hp2, tp, feats, toks, pos, None).logits,
                             head(rounded, tp, feats, toks, pos, None).logits, atol=1e-5)
  # the stored checksum is the registry's; another target is refused with a clear message
  dh.load_head(path, target_sha256=SHA.upper())
  with pytest.raises(dh.TargetMismatchError, match="was trained on a target with sha256"):
    dh.load_head(path, target_sha256="0" * 64)
  assert issubclass(dh.TargetMismatchError, checkpoint.ChecksumError)
  with pytest.raises(ValueError, match="unknown draft head"):
    dh.load_head(str(tmp_path / "missing"))


def test_config_validation_and_registry():
  with pytest.raises(ValueError, match="feature"):
    dh.HeadConfig(TARGET, feature="penultimate")
  with pytest.raises(ValueError, match="partial_fraction"):
    dh.HeadConfig(TARGET, partial_alignment=True, partial_fraction=0.0)
  assert HEAD.config.aligned_dims == 24
  assert dh.HeadConfig(TARGET).aligned_dims == 32
  assert "eagle-smollm2-135m" in dh.HEADS
  untied = TARGET.replace(tie_word_embeddings=False)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  tp = {"embed": {"table": jax.random.normal(k1, (32, 48))},  # all the head reads
        "lm_head": {"kernel": jax.random.normal(k2, (32, 48))}}
  head = dh.EagleHead(dh.HeadConfig(untied))
  hp = dh.init_head_params(head, jax.random.PRNGKey(1))
  out = head(hp, tp, *_inputs(1, 3), None)
  np.testing.assert_allclose(out.logits, out.features @ tp["lm_head"]["kernel"], atol=1e-5)

"""GAD (card 6): the block NAR drafter, its cache bookkeeping, GAD++ acceptance and training,
on tiny random models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from decoding import processors, token_loop
from decoding.speculative import gad_drafter as gad
from decoding.speculative import loop, verify
from decoding.speculative.acceptance import GadPlus
from decoding.speculative.protocol import DraftView
from decoding.errors import GenerationError
from decoding.speculative.gad_drafter import GadDraft
from decoding.strategy import Resources, Target
from models import artifacts, transformer
from models.config import tiny_config
from models.lm import TransformerLM

V = 32
TARGET = TransformerLM(tiny_config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                   num_layers=3))
IDENTITY = processors.IDENTITY
PENALTY = processors.chain(processors.RepetitionPenalty(1.3))


@pytest.fixture(scope="module")
def tparams():
  return transformer.init_params(TARGET.config, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A drafter for TARGET trained by `python -m train.gad` in miniature (the "tiny" model of
  the run config is TARGET with the same parameters): (config, results)."""
  from train import gad as train_gad
  tmp = tmp_path_factory.mktemp("gad")
  config = _tiny_run_config(tmp)
  return config, train_gad.run(config, str(tmp / "run"), progress=False)


def _drafter(tparams, k=3, layers=2, seed=1):
  """An untrained drafter with a random (non-zero) mask and slot embeddings."""
  d = gad.GadDrafter(target_lm=TARGET, num_layers=layers, num_draft=k)
  dparams = gad.init_params(TARGET, tparams, layers, k)
  km, ks = jax.random.split(jax.random.PRNGKey(seed))
  dparams["mask"] = jax.random.normal(km, dparams["mask"].shape)
  dparams["slots"] = 0.5 * jax.random.normal(ks, dparams["slots"].shape)
  return d, dparams


def _load_trained(path, target_lm, target_params):
  """A trained drafter read back for `target_lm`: (GadDrafter, dparams)."""
  manifest, trained = artifacts.load_artifact(path, "gad_drafter",
                                              target_config=target_lm.config)
  return gad.drafter_from_artifact(manifest, trained, target_lm, target_params)


def _prompts(lengths, P, seed=0):
  rng = np.random.default_rng(seed)
  prompts = np.zeros((len(lengths), P), np.int32)
  for i, n in enumerate(lengths):
    prompts[i, :n] = rng.integers(1, V, n)
  return jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32)


def _greedy(tparams, prompts, prompt_len, eos, processor, max_new):
  B, P = prompts.shape
  return token_loop.decode(TARGET, tparams, prompts, prompt_len, jnp.zeros((B, 2), jnp.uint32), eos,
                     processor=processor, select=token_loop.greedy_select, pad_id=0,
                     max_new_tokens=max_new, cache_len=P + max_new)


def test_vanilla_gad_and_gad_plus_beta_one_are_greedy_decoding(tparams, trained):
  """Ragged prompts, EOS, a context-reading processor; an untrained drafter (which gets
  nothing accepted) and a trained one."""
  processor = PENALTY
  config, results = trained
  drafter, dparams = _load_trained(results["drafter_path"], TARGET, tparams)
  prompts, prompt_len = _prompts([3, 8, 1, 5], 8)
  eos = jnp.asarray([7], jnp.int32)
  max_new = 24
  B, P = prompts.shape
  ref = _greedy(tparams, prompts, prompt_len, eos, processor, max_new)
  res = loop.speculative_decode(
      TARGET, tparams, drafter, dparams, prompts, prompt_len, jnp.zeros((B, 2), jnp.uint32), eos,
      processor=processor, sample=False, pad_id=0, max_new_tokens=max_new, cache_len=P + max_new)
  np.testing.assert_array_equal(res.tokens, ref.tokens)
  np.testing.assert_array_equal(res.lengths, ref.lengths)
  calls, acc = np.asarray(res.extras["target_calls"]), np.asarray(res.extras["accepted_drafts"])
  assert np.all(acc <= drafter.num_draft * calls)
  assert np.all(np.asarray(res.extras["verified_tokens"]) <= (drafter.num_draft + 1) * calls)
  assert np.sum(acc) >= 10  # the trained drafter gets drafts accepted (not a vacuous check)
  # GAD++ with beta = 1 is greedy decoding too
  plus = loop.speculative_decode(
      TARGET, tparams, drafter, dparams, prompts, prompt_len, jnp.zeros((B, 2), jnp.uint32), eos,
      processor=processor, sample=False, pad_id=0, max_new_tokens=max_new, cache_len=P + max_new,
      acceptance=GadPlus(beta=1, tau=3.0))
  np.testing.assert_array_equal(plus.tokens, ref.tokens)
  untrained, uparams = _drafter(tparams)
  res = loop.speculative_decode(
      TARGET, tparams, untrained, uparams, prompts, prompt_len, jnp.zeros((B, 2), jnp.uint32),
      eos, processor=processor, sample=False, pad_id=0, max_new_tokens=max_new,
      cache_len=P + max_new)
  np.testing.assert_array_equal(res.tokens, ref.tokens)


@pytest.mark.parametrize("num_draft,num_masks", [(3, 0), (2, 4)])
def test_incremental_cache_matches_from_scratch(tparams, num_draft, num_masks):
  """Proposals from the rolled-back cache equal a cache-free pass over the whole prefix,
  over many proposals with ragged growth of 1..k+1 tokens per row (the clamp at 0 too);
  also with more masks than drafts (a drafter trained with a larger block)."""
  K = num_draft
  base, dparams = _drafter(tparams, k=num_masks or num_draft)
  drafter = gad.GadDrafter(target_lm=TARGET, num_layers=base.num_layers, num_draft=K,
                           num_masks=num_masks)
  P, steps = 6, 8
  prompts, prompt_len = _prompts([1, 6, 2, 4], P)
  B = prompts.shape[0]
  S = P + steps * (K + 1) + drafter.masks + 2
  rng = np.random.default_rng(3)
  seqs = np.asarray(rng.integers(1, V, (B, S)), np.int32)
  seqs[:, :P] = np.where(np.arange(P)[None] < np.asarray(prompt_len)[:, None], prompts, seqs[:, :P])
  seqs = jnp.asarray(seqs)
  cache = drafter.init(dparams, tparams, prompts, prompt_len, None, None, S)
  L = prompt_len + 1

  @jax.jit
  def both(cache, view):
    logits, cache = drafter.block_logits(dparams, tparams, cache, view)
    scratch = gad.cut_logits(drafter.lm, gad.model_params(dparams, tparams),
                             gad.mask_embeddings(dparams, drafter.masks, jnp.float32),
                             view.sequences, view.seq_len[:, None])[:, 0, :K]
    return (logits, scratch, cache, drafter.propose(dparams, tparams, cache, view, PENALTY,
                                                    False)[0].tokens,
            gad.propose_from_scratch(drafter, dparams, tparams, view, PENALTY))

  for _ in range(steps):
    view = DraftView(sequences=seqs, seq_len=L, prompt_len=prompt_len,
                                 num_generated=L - prompt_len, active=jnp.ones((B,), bool),
                                 row_keys=jnp.zeros((B, 2), jnp.uint32))
    logits, scratch, cache, toks, toks_scratch = both(cache, view)
    assert logits.shape == (B, K, V)
    np.testing.assert_allclose(logits, scratch, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(cache.lengths, L)
    np.testing.assert_array_equal(toks, toks_scratch)
    L = L + jnp.asarray(rng.integers(1, K + 2, B), jnp.int32)


def test_gad_plus_reduces_to_vanilla_and_stays_within_the_block():
  B, K = 64, 5
  kl, kd, km = jax.random.split(jax.random.PRNGKey(2), 3)
  logits = 2.0 * jax.random.normal(kl, (B, K + 1, V))
  logits = logits.at[:3, :, 4].set(-jnp.inf)  # banned tokens
  top = jnp.argsort(-logits, axis=-1)  # drafts: the target's 1st..4th choice at each slot
  pick = jax.random.randint(kd, (B, K), 0, 4) * (jax.random.uniform(km, (B, K)) < 0.5)
  drafts = jnp.take_along_axis(top[:, :K], pick[..., None], -1)[..., 0]
  drafts = drafts.at[:3, 0].set(4)  # a banned draft is never accepted
  vanilla = jax.jit(verify.verify_chain, static_argnums=(4,))(
      logits, drafts, None, jnp.zeros((B, 2), jnp.uint32), False)
  accept = jax.jit(verify.verify_chain_relaxed, static_argnums=(2, 3))
  for beta, tau in ((1, 3.0), (5, 0.0), (1, 0.0)):
    v = accept(logits, drafts, beta, tau)
    np.testing.assert_array_equal(v.num_accepted, vanilla.num_accepted)
    np.testing.assert_array_equal(v.next_token, vanilla.next_token)
  relaxed = accept(logits, drafts, 5, 3.0)
  n = np.asarray(relaxed.num_accepted)
  assert np.all((n >= np.asarray(vanilla.num_accepted)) & (n <= K))
  assert n.mean() > np.asarray(vanilla.num_accepted).mean()
  assert np.all(n[:3] == 0)
  # the next token is the target's top-1 at the first failure (or the bonus position)
  np.testing.assert_array_equal(relaxed.next_token,
                                np.asarray(jnp.argmax(logits, -1))[np.arange(B), n])
  # a rule by hand: rank < beta and a log-prob gap <= tau, leading run
  logp = np.asarray(jax.nn.log_softmax(logits[:, :K], -1))
  d = np.asarray(drafts)
  dl = np.take_along_axis(logp, d[..., None], -1)[..., 0]
  ok = ((logp > dl[..., None]).sum(-1) < 5) & (logp.max(-1) - dl <= 3.0)
  np.testing.assert_array_equal(n, np.cumprod(ok, -1).sum(-1))
  # tau binds: a looser tau accepts at least as much
  looser = np.asarray(accept(logits, drafts, 5, 10.0).num_accepted)
  assert np.all(looser >= n)


def _tiny_run_config(tmp_path):
  from configs import gad_smollm2
  c = gad_smollm2.get_config()
  c.model.name = "tiny"
  c.model.init = "random"
  c.model.overrides = ml_collections.ConfigDict(dict(
      vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=3))  # = TARGET
  g = c.gad
  g.block, g.num_layers, g.num_cuts = 3, 2, 6
  g.prompts, g.prompt_len, g.gen_len = "synthetic", 8, 24
  g.num_train_prompts, g.num_eval_prompts, g.generate_batch = 64, 16, 32
  g.decode_prompts, g.eval_num_draft = 0, ()
  g.save_name, g.save_dir = "gad-tiny", str(tmp_path / "drafter")
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  c.batch_size, c.eval_batch_size = 16, 16
  c.num_steps, c.log_every, c.checkpoint_every = 25, 25, 0
  return c


def test_training_raises_block_accuracy_and_round_trips(trained):
  from train import model_setup
  config, results = trained
  before, after = results["before"]["blocks"], results["after"]["blocks"]
  assert after["nll"] < before["nll"]  # (the tiny tied head keeps logits flat: small drop)
  assert after["accuracy"] > before["accuracy"] + 0.3
  assert after["accepted"] > before["accepted"] + 1.0  # of 3
  # the saved drafter (trained parameters only) reloads for the same target
  target = model_setup.build(config.model, seed=config.seed)
  manifest, trained_params = artifacts.load_artifact(
      results["drafter_path"], "gad_drafter", target_sha256=target.sha256,
      target_config=target.config)
  assert manifest["config"] == {"num_layers": 2, "num_draft": 3, "slot_embeddings": True}
  assert manifest["target"]["name"] == "tiny" and manifest["target"]["sha256"] == target.sha256
  drafter, dparams = gad.drafter_from_artifact(manifest, trained_params, target.lm,
                                               target.params)
  assert (drafter.num_draft, drafter.num_layers) == (3, 2)
  assert set(dparams) == {"body", "mask", "slots"} and "embed" not in dparams["body"]
  assert float(jnp.abs(dparams["slots"]).sum()) > 0  # trained, not the zero init
  with pytest.raises(artifacts.TargetMismatchError, match="architecture"):
    artifacts.load_artifact(results["drafter_path"], "gad_drafter",
                            target_config=target.config.replace(hidden_size=16))
  with pytest.raises(artifacts.TargetMismatchError, match="sha256"):  # other weights
    artifacts.load_artifact(results["drafter_path"], "gad_drafter", target_sha256="0" * 64)
  # what the `gad` drafter of the speculative strategy builds, checked against the target
  t = Target(target.lm, target.params, sha256=target.sha256)
  drafter, _ = GadDraft(gad_drafter=results["drafter_path"], num_draft_tokens=2).build(
      t, Resources())
  assert (drafter.num_draft, drafter.masks) == (2, 3)
  with pytest.raises(GenerationError, match="architecture"):
    other = TransformerLM(target.config.replace(hidden_size=16))
    GadDraft(gad_drafter=results["drafter_path"]).build(
        Target(other, target.params, sha256=target.sha256), Resources())
  with pytest.raises(GenerationError, match="checksum is unknown"):
    GadDraft(gad_drafter=results["drafter_path"]).build(Target(target.lm, target.params),
                                                        Resources())

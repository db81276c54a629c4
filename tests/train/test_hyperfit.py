"""Hyperfitting on a tiny model (card 8's validation) and the DITTO task end to end."""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest

from models import transformer
from models.config import tiny_config
from models.lm import TransformerLM
from train import data, evaluation, losses, optim, tasks, trainer

CFG = tiny_config(vocab_size=48, hidden_size=48, intermediate_size=96, num_layers=2,
                  max_position_embeddings=256)


def _train(params, rows, steps, lr, batch):
  opt = ml_collections.ConfigDict(dict(name="adamw", learning_rate=lr, grad_clip=1.0))
  tr = trainer.Trainer(losses.next_token_loss(CFG), optim.make_optimizer(opt, steps))
  state = tr.init_state(params, jax.random.key(0))
  state = tr.fit(state, None, data.ArrayData({"tokens": rows}, batch), steps, progress=False)
  return state.params, tr.evaluate(state, None, data.eval_batches({"tokens": rows}, batch))


@pytest.mark.slow
def test_hyperfitting_drives_train_loss_to_zero_and_sharpens_predictions():
  lm = TransformerLM(CFG)
  corpus = tasks.synthetic_sequences(256, 32, CFG.vocab_size, seed=0)  # entropy log 3 per token
  heldout = tasks.synthetic_sequences(32, 32, CFG.vocab_size, seed=1)
  # "Pretrain" on the bigram source, as the paper starts from a trained LM.
  base, _ = _train(transformer.init_params(CFG, jax.random.PRNGKey(0)), corpus, 200, 1e-2, 32)
  tiny_set = corpus[:8]
  fitted, train_eval = _train(base, tiny_set, 150, 3e-3, 8)
  assert train_eval["loss"] < 0.05, train_eval  # near-zero training loss
  before = evaluation.perplexity_and_entropy(lm, base, heldout)
  after = evaluation.perplexity_and_entropy(lm, fitted, heldout)
  assert before["mean_entropy"] > 0.5 * np.log(3)  # the pretrained model is not yet peaked
  assert after["mean_entropy"] < 0.75 * before["mean_entropy"], (before, after)
  assert after["perplexity"] > before["perplexity"], (before, after)  # held-out ppl worsens
  contexts = heldout[:16, :8]
  g0 = evaluation.greedy_continuations(lm, base, contexts, 24)
  g1 = evaluation.greedy_continuations(lm, fitted, contexts, 24)
  assert evaluation.type_token_ratio(g1) >= evaluation.type_token_ratio(g0) - 0.05
  assert evaluation.copy_fraction(g1, tiny_set, n=10) < 0.5  # copying stays rare


@pytest.mark.data
@pytest.mark.slow
def test_ditto_task_runs_end_to_end(tmp_path, smollm):
  """The DITTO experiment pipeline (corpus sentences, pseudo-repetition batches, mixture
  loss, curve and repetition report, export) on a tiny model with SmolLM2's tokenizer."""
  del smollm  # only ensures the tokenizer's package is installed
  from configs import ditto_smollm2
  from train import experiment
  c = ditto_smollm2.get_config()
  c.model.name, c.model.init, c.model.tokenizer = "tiny", "random", "smollm2-135m-instruct"
  c.model.overrides = ml_collections.ConfigDict(dict(hidden_size=32, intermediate_size=64,
                                                     max_position_embeddings=512))
  c.data.seq_len, c.data.num_train, c.data.num_eval = 64, 16, 8
  c.ditto.probe_sentences, c.evaluate.gen_len, c.evaluate.num_generations = 4, 16, 4
  c.num_steps, c.checkpoint_every, c.log_every = 6, 0, 1
  c.optimizer.learning_rate = 1e-2
  results = experiment.run(c, str(tmp_path), progress=False)
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if r["split"] == "train"]
  assert {int(r["branch"]) for r in train} == {0, 1}  # both DITTO (0) and MLE (1) updates ran
  assert all(("ditto/ditto" in r) == (r["branch"] == 0) for r in train)
  for when in ("before", "after"):
    assert len(results[when]["self_reinforcement"]) == 10
  assert results["before"]["self_reinforcement"] != results["after"]["self_reinforcement"]
  assert (tmp_path / "export" / "manifest.json").exists()  # an `lm` artifact

"""Process reward model (decoding/process_reward.py, train/prm.py): tags after each step,
scores only at tags and only from the two label tokens, the aggregations, a loss that sees
nothing but the tags, and a PRM trained on a toy task with synthetic step labels that beats
chance AUROC on held-out steps."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import process_reward as pr
from decoding.scoring import auroc
from models.config import tiny_config
from models.lm import TransformerLM
from models.transformer import init_params
from train import prm

V = 32
FMT = pr.TagFormat(tag_id=29, plus_id=30, minus_id=31)
ERROR = 5  # in the toy task, a step containing this token is wrong


@pytest.fixture(scope="module")
def tiny():
  c = tiny_config(vocab_size=V, num_layers=2, hidden_size=32, head_dim=8,
                  intermediate_size=64)
  return c, TransformerLM(c), init_params(c, jax.random.PRNGKey(0))


def test_tagged_sequence_puts_a_tag_after_every_step():
  tokens, tags = pr.tagged_sequence([1, 2], [[3, 4], [5], [6, 7, 8]], tag_id=29)
  assert tokens == [1, 2, 3, 4, 29, 5, 29, 6, 7, 8, 29]
  assert tags == [4, 6, 10] and all(tokens[t] == 29 for t in tags)


def test_step_scores_are_the_two_label_softmax_at_the_tags_only(tiny):
  c, lm, params = tiny
  seqs = [pr.tagged_sequence([1, 2, 3], [[4, 5], [6]], FMT.tag_id),
          pr.tagged_sequence([7], [[8, 9, 10]], FMT.tag_id)]
  got = pr.step_scores(lm, params, seqs, FMT, batch_size=4)
  assert [len(g) for g in got] == [2, 1]
  for (tokens, tags), scores in zip(seqs, got):  # each sequence alone, unpadded
    logits = pr.sequence_logits(lm, params, jnp.asarray([tokens]))[0]
    for t, s in zip(tags, scores):
      two = np.asarray([logits[t, FMT.minus_id], logits[t, FMT.plus_id]], np.float64)
      assert s == pytest.approx(np.exp(two[1]) / np.exp(two).sum(), abs=1e-5)


def test_aggregations():
  assert pr.aggregate([0.9, 0.2, 0.8], "min") == pytest.approx(0.2)
  assert pr.aggregate([0.9, 0.2, 0.8], "product") == pytest.approx(0.144)
  assert pr.aggregate([0.9, 0.2, 0.8], "last") == pytest.approx(0.8)
  assert pr.aggregate([], "min") == 0.0
  with pytest.raises(ValueError, match="unknown aggregation"):
    pr.aggregate([0.5], "mean")


def test_prm_loss_sees_only_the_tag_positions(tiny):
  c, lm, params = tiny
  seqs = [pr.tagged_sequence([1, 2], [[3, 4], [6]], FMT.tag_id)]
  rows = prm.prm_rows(seqs, [[1, 0]], pad_id=0, length=16)
  loss_fn = prm.prm_loss(c, FMT)
  loss, m = loss_fn(params, rows, None)
  logits = pr.sequence_logits(lm, params, jnp.asarray(rows["tokens"]))[0]
  logp = jax.nn.log_softmax(pr.label_logits(logits, FMT), -1)
  want = -(logp[4, 1] + logp[6, 0]) / 2  # tags at 4 (target 1) and 6 (target 0)
  assert float(loss) == pytest.approx(float(want), abs=1e-5) and float(m["tokens"]) == 2
  off_tag = dict(rows, targets=rows["targets"].copy())
  off_tag["targets"][0, 0:3] = 1  # targets away from tags change nothing
  assert float(loss_fn(params, off_tag, None)[0]) == pytest.approx(float(loss), abs=1e-7)
  with pytest.raises(ValueError, match="2 tags but 1 targets"):
    prm.prm_rows(seqs, [[1]], pad_id=0)


def toy_solutions(n: int, rng: np.random.Generator):
  """Solutions of 2-4 steps of 3 tokens; a step is wrong iff it contains ERROR; the last
  target is the outcome (every step right), as SPARE's targets are."""
  seqs, targets, labels = [], [], []
  for _ in range(n):
    steps = [rng.integers(2, 20, 3).tolist() for _ in range(int(rng.integers(2, 5)))]
    for s in steps:
      if rng.random() < 0.35:
        s[int(rng.integers(0, 3))] = ERROR
    right = [ERROR not in s for s in steps]
    seqs.append(pr.tagged_sequence(rng.integers(2, 20, 4).tolist(), steps, FMT.tag_id))
    labels.append(right)
    targets.append(right[:-1] + [all(right)])
  return seqs, targets, labels


def test_prm_trained_on_synthetic_step_labels_beats_chance_auroc(tiny):
  c, lm, params = tiny
  rng = np.random.default_rng(0)
  seqs, targets, _ = toy_solutions(256, rng)
  rows = prm.prm_rows(seqs, targets, pad_id=0, length=32)
  before = auroc_of(lm, params)
  trained = prm.train_prm(c, params, rows, FMT, steps=150, batch_size=32, learning_rate=3e-3)
  after = auroc_of(lm, trained)
  assert after > 0.85 and after > before + 0.2


def auroc_of(lm, params) -> float:
  seqs, _, labels = toy_solutions(64, np.random.default_rng(1))
  scores = pr.step_scores(lm, params, seqs, FMT, batch_size=16)
  flat_s = [s for ss in scores for s in ss[:-1]]  # steps before the outcome-trained last one
  flat_l = [l for ll in labels for l in ll[:-1]]
  return auroc(flat_s, flat_l)

"""The SPARE evaluation's own pieces (benchmarks/eval_spare.py): disjoint problem sets, label
accuracy and recalls, best-of-N selection by each rule, and tags after each numbered step."""
from __future__ import annotations

import pytest

from benchmarks import eval_spare
from decoding import process_reward
from models.datasets import arithmetic
from tests.fakes import ByteTokenizer


def test_problem_sets_are_disjoint_and_skip_the_reasoning_evaluation():
  train, held = eval_spare.problem_sets(40, 30, seed=0)
  assert len(train) == 40 and len(held) == 30
  taken = {p.question for p in arithmetic.problems(512, seed=0)}
  qs = [p.question for p in train + held]
  assert len(set(qs)) == 70 and not taken & set(qs)


def test_label_accuracy_counts_steps_and_both_recalls():
  got = eval_spare.label_accuracy([[True, False], [True]], [[True, True], [False]])
  assert got == {"steps": 3, "accuracy": pytest.approx(1 / 3), "correct_recall": 0.5,
                 "error_recall": 0.0}


def cand(text, right, sc, prm=(0.5,), orm=0.5):
  return {"text": text, "right": right, "self_certainty": sc, "prm": list(prm), "orm": orm}


def test_select_by_each_rule():
  cands = [cand("The answer is 3.", False, 0.1, prm=(0.9, 0.2), orm=0.2),
           cand("The answer is 5.", True, 0.9, prm=(0.6, 0.7), orm=0.9),
           cand("The answer is 3.", False, 0.2, prm=(0.95, 0.9), orm=0.1)]
  assert eval_spare.select(cands, "majority") == 2  # answer 3 twice; its most certain one
  assert eval_spare.select(cands, "self_certainty") == 1
  assert eval_spare.select(cands, "prm_min") == 2
  assert eval_spare.select(cands, "prm_product") == 2
  assert eval_spare.select(cands, "prm_last") == 2
  assert eval_spare.select(cands, "orm") == 1


def test_tagged_puts_one_tag_per_numbered_step_or_one_for_the_outcome():
  fmt = process_reward.TagFormat(tag_id=1, plus_id=2, minus_id=3)
  tok = ByteTokenizer()
  tokens, tags = eval_spare.tagged(tok, [9, 9], ["a", "bc"], fmt)
  assert tokens == [9, 9] + list(b"[1] a\n") + [1] + list(b"[2] bc\n") + [1]
  assert tags == [8, 16]
  tokens, tags = eval_spare.tagged(tok, [9], ["a", "bc"], fmt, outcome_only=True)
  assert tags == [len(tokens) - 1] and tokens.count(1) == 1


def test_cached_stage_records_its_seconds_and_a_reused_stage_records_none(tmp_path):
  log, calls = {}, []
  make = lambda: calls.append(1) or {"x": 1}
  path = str(tmp_path / "stage_a.json")
  assert eval_spare.cached(path, make, log) == {"x": 1}
  assert log["stage_a"] >= 0 and calls == [1]
  log2 = {}
  assert eval_spare.cached(path, make, log2) == {"x": 1}
  assert log2 == {"stage_a": None} and calls == [1]  # read back, not recomputed

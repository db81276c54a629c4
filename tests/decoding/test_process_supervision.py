"""Step splitting, the grader's label parser, PRM targets, and the rule-based reference-guided
grader against the problem generator's gold step labels (decoding/process_supervision.py,
models/datasets/arithmetic.py)."""
from __future__ import annotations

import random

import jax.numpy as jnp
import numpy as np
import pytest

from decoding import process_supervision as ps
from decoding.answers import last_number
from decoding.strategy import Target
from models.datasets import arithmetic
from tests.fakes import BigramLM, ByteTokenizer


def test_split_steps_follows_the_numbered_marks():
  assert ps.split_steps("[1] Tom has 5.\n[2] 5 + 3 = 8.\n\n[3] The answer is 8.") == [
      "Tom has 5.", "5 + 3 = 8.", "The answer is 8."]
  assert ps.split_steps("Let me think. [1] a [2] b") == ["a", "b"]  # preamble dropped
  assert ps.split_steps("no marks at all") == ["no marks at all"]
  assert ps.split_steps("  ") == []
  steps = ["x = 1", "y [sic] 2", "done"]
  assert ps.split_steps(ps.number_steps(steps)) == steps


def test_parse_grades_reads_the_last_list_and_leaves_skipped_steps_none():
  reply = ('Step 1 matches [1] of the reference. Step 3 is wrong.\n'
           '[{"student_step": 1, "label": "CORRECT"}, {"student_step": 3, "label": "incorrect"},'
           ' {"student_step": 9, "label": "CORRECT"}, {"student_step": 2, "label": "MAYBE"}]')
  assert ps.parse_grades(reply, 4) == [True, None, False, None]
  two = '[{"student_step": 1, "label": "INCORRECT"}] then [{"student_step": 1, "label": "CORRECT"}]'
  assert ps.parse_grades(two, 1) == [True]
  assert ps.parse_grades("I think it is all fine.", 3) == [None, None, None]
  assert ps.parse_grades('[{"student_step": 1, "label": "CORRECT"', 2) == [None, None]
  assert ps.parse_grades('[{"student_step": true, "label": "CORRECT"}]', 1) == [None]


def test_step_targets_zero_for_skipped_and_last_step_is_the_outcome():
  assert ps.step_targets([True, None, False, True], outcome=False) == [1, 0, 0, 0]
  assert ps.step_targets([True, None, False, False], outcome=True) == [1, 0, 0, 1]
  assert ps.step_targets([], outcome=True) == []


def test_equations_parse_chains_and_operator_look_alikes():
  eqs = arithmetic.equations("So 13 + 11 = 24, then 4 x 3 - 2 = 10 and 6 * 2 = 13.")
  assert [(e.operands, e.value, e.stated, e.true) for e in eqs] == [
      ((13.0, 11.0), 24.0, 24.0, True), ((4.0, 3.0, 2.0), 10.0, 10.0, True),
      ((6.0, 2.0), 12.0, 13.0, False)]
  assert arithmetic.equations("8 / 0 = 1")[0].true is False


def student_solutions(problem: arithmetic.Problem, rng: random.Random):
  """Solutions with known faults: the reference, an arithmetic slip, a wrong quantity, a
  chained step, a restated given, a wrong restatement."""
  ref = [s.text for s in problem.solution]
  yield ref + [f"The answer is {problem.answer}."]
  k = rng.randrange(len(problem.solution))
  s = problem.solution[k]
  slip = ref[:k] + [f"{s.left} {s.op} {s.right} = {s.result + rng.choice([-2, -1, 1, 3])}."]
  yield slip + ref[k + 1:]
  wrong = ref[:k] + [f"{s.left + 100} {s.op} {s.right} = "
                     f"{arithmetic._step(s.left + 100, s.op, s.right, '').result}."]
  yield wrong + ref[k + 1:]
  if len(problem.solution) == 2:
    a, b = problem.solution
    yield [f"{a.left} {a.op} {a.right} {b.op} {b.right} = {b.result}."]
  yield [f"We start from {arithmetic.numbers(problem.question)[0]:g}."] + ref
  yield [f"We start from {arithmetic.numbers(problem.question)[0] + 977:g}."] + ref


def test_rule_based_grader_agrees_with_the_generators_gold_labels_on_known_faults():
  rng = random.Random(0)
  checked = 0
  for p in arithmetic.problems(200, seed=5):
    for steps in student_solutions(p, rng):
      gold = arithmetic.gold_step_labels(p, steps)
      grades = ps.grade_with_reference(p.question, [s.text for s in p.solution], steps)
      assert [g.label for g in grades] == gold, (p.question, steps)
      checked += len(steps)
  assert checked > 1000


def test_reference_steps_align_with_themselves_and_faults_are_caught():
  p = arithmetic.problems(4, seed=0)[3]  # two steps: 13 + 11 = 24, 24 - 21 = 3
  ref = [s.text for s in p.solution]
  grades = ps.grade_with_reference(p.question, ref, ref + ["The answer is 3."])
  assert [g.label for g in grades] == [True, True, True]
  assert [g.aligned for g in grades] == [(0,), (1,), (1,)]
  bad = ps.grade_with_reference(p.question, ref, ["13 + 11 = 25.", "25 - 21 = 4."])
  assert [g.label for g in bad] == [False, False]


def test_grader_prompt_holds_question_reference_and_numbered_steps():
  text = ps.grader_prompt("Q?", ["a = 1"], ["b", "c"])
  assert "Q?" in text and "[1] a = 1" in text and "[1] b\n[2] c" in text
  assert '"student_step"' in text and "CORRECT" in text


@pytest.mark.parametrize("steps,gold", [
    (["Leo has 13 pencils."], [True]),
    (["He has 14 pencils."], [False]),
    (["Now he has some pencils."], [True]),  # nothing checkable
])
def test_gold_labels_of_steps_without_equations(steps, gold):
  p = arithmetic.problems(4, seed=0)[3]
  assert arithmetic.gold_step_labels(p, steps) == gold


def test_rollout_labels_continue_each_step_prefix_k_times_and_count_tokens():
  """A bigram model that always answers "7" and stops: step j is good unless the steps up to
  j already contain a wrong one (what `is_right` checks here), and every continuation costs
  two tokens ("7" and the stop)."""
  V, seven, stop = 256, ord("7"), ord("\n")
  table = np.full((V, V), -8.0, np.float32)
  table[:, seven] = 8.0
  table[seven, :] = -8.0
  table[seven, stop] = 8.0
  target = Target(BigramLM(V), jnp.asarray(table), eos_ids=(stop,), pad_id=0,
                  tokenizer=ByteTokenizer())
  steps = ["2 + 3 = 5.", "5 x 2 = 11.", "11 - 4 = 7."]
  seen = []

  def is_right(text):
    seen.append(text)
    return "= 11" not in text and last_number(text) == "7"

  got = ps.rollout_labels(target, list(b"Q: "), steps, is_right, k=3, max_new_tokens=4)
  assert got.labels == [True, False, False]
  assert got.generated_tokens == 3 * 3 * 2
  assert got.context_tokens == sum(3 + len(ps.number_steps(steps[:j + 1]) + "\n")
                                   for j in range(3))
  assert seen[0] == "[1] 2 + 3 = 5.\n7\n"

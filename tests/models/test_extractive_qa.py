"""The generated extractive-QA set (models/datasets/extractive_qa.py) and its SQuAD metrics."""
from __future__ import annotations

import pytest

from models.datasets import extractive_qa as qa


def test_answers_are_unique_substrings_of_their_passages():
  exs = qa.examples(120, seed=0)
  assert len(exs) >= 300 and len({e.passage_id for e in exs}) >= 100
  for e in exs:
    assert e.passage.count(e.answer) == 1, (e.answer, e.passage)
    assert e.answer not in e.question  # the question does not give the answer away


def test_the_set_is_deterministic_in_its_seed_and_paraphrases_the_facts():
  a, b, c = qa.examples(30, seed=1), qa.examples(30, seed=1), qa.examples(30, seed=2)
  assert a == b and a != c
  assert qa.examples(10, seed=1) == [e for e in a if e.passage_id < 10]
  for e in a:  # the question's words are not the answer sentence's: a paraphrase
    sentence = next(s for s in e.passage.split(". ") if e.answer in s)
    assert e.question.rstrip("?") not in sentence
  kinds = {e.question.split()[0] for e in qa.examples(120)}
  assert len(kinds) >= 3


def test_each_answer_has_distractors_of_its_type():
  """Two or more people per passage, each with facts of the same kinds."""
  for e in qa.examples(60, seed=0):
    if e.answer.isdigit():  # a year: another year is in the passage
      years = [w.strip(".,") for w in e.passage.split() if w.strip(".,").isdigit()]
      assert len(years) >= 2


def test_squad_metrics():
  assert qa.exact_match("The Kalo Works.", "kalo works") == 1.0
  assert qa.exact_match("Kalo", "Kalo Works") == 0.0
  assert qa.f1("Kalo", "Kalo Works") == pytest.approx(2 / 3)
  assert qa.f1("", "x") == 0.0 and qa.f1("a", "the") == 1.0

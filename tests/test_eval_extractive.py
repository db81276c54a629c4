"""The extractive-QA benchmark's table: scores per model and k, the paired test, and an honest
time line."""
from benchmarks.eval_extractive import exact_matches, greedy_answer, render
from models.datasets import extractive_qa as qa


def _run(em: float, resumed: dict | None = None) -> dict:
  m = {"greedy": {"em": em, "f1": em}, "exact_extract": {"em": 1.0, "f1": 1.0},
       "greedy_in_passage": 0.5, "starts_scored": 0.25, "seconds": 60.0,
       "em_paired": {"only_a": 7, "only_b": 1, "p": 0.0703125}}
  return {**m, "resumed_rows": resumed} if resumed is not None else m


def _result(**runs) -> dict:
  return {"questions": 300, "passages": 100, "seed": 0, "max_new_tokens": 20,
          "max_span_tokens": 16, "models": {"m": runs}, "seconds": 600.0, "machine": "CPU",
          "command": "python -m benchmarks.eval_extractive"}


def test_table_has_one_row_per_model_and_k_with_its_scores():
  md = render(_result(**{"0": _run(0.25), "4": _run(0.5)}))
  assert "| m | 0 | 0.250 | 0.250 | 1.000 | 1.000 | 0.50 | 0.25 | 7 / 1 | 0.07 |" in md
  assert "| m | 4 | 0.500 | 0.500 | 1.000 | 1.000 | 0.50 | 0.25 | 7 / 1 | 0.07 |" in md
  assert "(10 min on CPU)." in md


def test_time_line_counts_the_rows_read_back_from_earlier_invocations():
  md = render(_result(**{"0": _run(0.25, {"greedy": 300, "exact_extract": 300}),
                         "4": _run(0.5, {"greedy": 100, "exact_extract": 0})}))
  assert md.endswith("(this invocation: 10 min on CPU; it read back 700 of 1200 "
                     "decoder-question rows from earlier invocations of the same command).")


def test_greedy_answer_is_its_first_line():
  assert greedy_answer(" harp\nText: another example") == "harp"


def test_exact_matches_use_squad_normalization_per_question():
  ex = qa.examples(1, seed=0)[:2]
  preds = [f"The {ex[0].answer}.", "nothing like it"]
  assert exact_matches(preds, ex).tolist() == [True, False]

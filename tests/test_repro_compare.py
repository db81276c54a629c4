"""benchmarks/repro_compare.py: lining up two recorded runs of the reproducibility study."""
from __future__ import annotations

from benchmarks.repro_compare import compare


def _run(outputs, logprobs):
  return {"outputs": outputs, "top1_logprobs": logprobs}


def test_compare_counts_differing_problems_and_bitwise_logprobs_on_the_compared_prefix():
  a = _run([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1]], [[-.1, -.2, -.3], [-.1, -.1, -.1],
                                                       [-.5, -.5, -.5], [-.2, -.2]])
  b = _run([[1, 2, 3], [4, 9, 6], [7, 8, 0], [1, 1]], [[-.1, -.2, -.3], [-.1, -.1, -.1],
                                                       [-.5, -.5, -.5], [-.2, -.25]])
  got = compare(a, b, tokens=3, problems=10)
  # problem 1 first differs at token 1, problem 2 at token 2; problem 3 has the same tokens
  # but one log-prob off in its last bits, so only problem 0 is bitwise
  assert got == dict(problems=4, differ=2, median_first_difference=1.5, bitwise_logprobs=1)
  # beyond the compared prefix nothing counts: on 2 tokens only problem 1 differs
  got = compare(a, b, tokens=2, problems=3)
  assert got == dict(problems=3, differ=1, median_first_difference=1, bitwise_logprobs=2)

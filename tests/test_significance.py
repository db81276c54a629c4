"""Paired significance tests (benchmarks/significance.py) against direct computation."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from benchmarks.significance import mcnemar_exact, sign_flip


def test_mcnemar_p_is_twice_the_binomial_tail_of_the_smaller_discordant_count():
  # 20 problems only method a solved, 4 only b, 10 both, 30 neither.
  a = np.array([1] * 20 + [0] * 4 + [1] * 10 + [0] * 30, bool)
  b = np.array([0] * 20 + [1] * 4 + [1] * 10 + [0] * 30, bool)
  out = mcnemar_exact(a, b)
  tail = sum(math.comb(24, k) for k in range(5)) / 2 ** 24
  assert out == {"only_a": 20, "only_b": 4, "p": pytest.approx(2 * tail, rel=1e-12)}
  assert mcnemar_exact(b, a)["p"] == out["p"]  # two-sided: symmetric


def test_mcnemar_gives_one_without_discordant_problems_or_with_a_balanced_split():
  same = np.array([1, 0, 1, 1], bool)
  assert mcnemar_exact(same, same)["p"] == 1.0
  assert mcnemar_exact([1, 0, 1, 0], [0, 1, 1, 0])["p"] == 1.0


def brute_force_sign_flip(x, y):
  d = np.asarray(x, float) - np.asarray(y, float)
  observed = abs(d.mean())
  hits = [abs(np.mean(np.array(s) * d)) >= observed - 1e-12
          for s in itertools.product((1, -1), repeat=d.size)]
  return float(np.mean(hits))


@pytest.mark.parametrize("seed", range(4))
def test_sign_flip_matches_enumerating_every_sign_assignment(seed):
  rng = np.random.default_rng(seed)
  x, y = rng.integers(0, 9, 12) / 8, rng.integers(0, 9, 12) / 8  # pass@1 of 8 samples
  out = sign_flip(x, y)
  assert out["rounds"] == 0
  assert out["p"] == pytest.approx(brute_force_sign_flip(x, y), abs=1e-12)
  assert out["mean_diff"] == pytest.approx(np.mean(x - y))


def test_monte_carlo_sign_flip_is_close_to_the_exact_p_and_reproducible(monkeypatch):
  rng = np.random.default_rng(7)
  x, y = rng.integers(0, 9, 14) / 8, rng.integers(0, 9, 14) / 8
  exact = sign_flip(x, y)["p"]
  monkeypatch.setattr("benchmarks.significance.EXACT_MAX", 4)
  mc = sign_flip(x, y, rounds=40_000, seed=3)
  assert mc["rounds"] == 40_000 and abs(mc["p"] - exact) < 0.01
  assert sign_flip(x, y, rounds=40_000, seed=3) == mc


def test_sign_flip_of_identical_scores_is_one_and_a_consistent_gap_is_small():
  x = np.linspace(0, 1, 40)
  assert sign_flip(x, x)["p"] == 1.0
  out = sign_flip(x + 0.1, x, rounds=10_000)
  # Every difference is +0.1: only the all-plus and all-minus assignments reach it.
  assert out["mean_diff"] == pytest.approx(0.1) and out["p"] == 1 / 10_001


def test_unpaired_shapes_are_refused():
  with pytest.raises(ValueError, match="same length"):
    mcnemar_exact([1, 0], [1, 0, 1])
  with pytest.raises(ValueError, match="same length"):
    sign_flip([0.5], [0.5, 0.1])

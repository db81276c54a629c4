"""Paired significance tests for comparing two decoding methods on the same problems.

Both tests condition on the problems (each problem is scored under both methods), so problem
difficulty, which dominates the variance at small scale, cancels:

* `mcnemar_exact`: for a yes/no score per problem (pass@N), only the discordant problems
  carry information; under the null hypothesis that both methods are equally good, each
  discordant problem is equally likely to favour either, so the count favouring one method
  is Binomial(discordant, 1/2). Two-sided p = min(1, 2 * P(X <= min count)) (McNemar's exact
  test, "Note on the sampling error of the difference between correlated proportions or
  percentages", McNemar 1947).
* `sign_flip`: for a real score per problem (pass@1 as the fraction of N samples right),
  the paired permutation test: under the null each problem's difference is equally likely to
  have either sign, so the p-value is the share of the 2^n sign assignments whose |mean
  difference| reaches the observed one. Enumerated exactly up to `EXACT_MAX` nonzero
  differences; above, `rounds` random assignments from a fixed seed, counting the observed one
  ((1 + hits) / (1 + rounds), the standard Monte Carlo p-value, never 0).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

EXACT_MAX = 16
# Means that differ by less than this are ties (float sums of the same numbers in another order).
TIE = 1e-12


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
  """a, b: bool [problems], whether each method solved each problem. Returns the discordant
  counts (`only_a`, `only_b`) and the two-sided exact p-value."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"mcnemar_exact needs two 1-D arrays of the same length, got {a.shape} "
                     f"and {b.shape}")
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n, low = only_a + only_b, min(only_a, only_b)
  tail = sum(math.comb(n, k) for k in range(low + 1)) / 2.0 ** n
  return {"only_a": only_a, "only_b": only_b, "p": min(1.0, 2.0 * tail)}


def sign_flip(x: np.ndarray, y: np.ndarray, *, rounds: int = 100_000, seed: int = 0) -> dict:
  """x, y: float [problems], each method's score on each problem. Returns the mean
  difference x - y, the two-sided paired permutation p-value and how it was computed
  (`rounds` = 0 when every sign assignment was enumerated)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or x.size == 0:
    raise ValueError(f"sign_flip needs two non-empty 1-D arrays of the same length, got "
                     f"{x.shape} and {y.shape}")
  d = x - y
  observed = abs(d.mean())
  nz = d[d != 0]  # zero differences do not change under a sign flip
  if nz.size == 0:
    return {"mean_diff": 0.0, "p": 1.0, "rounds": 0}
  if nz.size <= EXACT_MAX:
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=nz.size)))
    stats = np.abs(signs @ nz) / d.size
    p, used = float(np.mean(stats >= observed - TIE)), 0
  else:
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(rounds, nz.size))
    hits = int(np.sum(np.abs(signs @ nz) / d.size >= observed - TIE))
    p, used = (1 + hits) / (1 + rounds), rounds
  return {"mean_diff": float(d.mean()), "p": p, "rounds": used}

"""The soft-thinking benchmark: its probe summary is kept so that a resumed run skips it, its
time line, and its paired comparisons with discrete sampling."""
import json

import numpy as np

from benchmarks.eval_soft_thinking import cached_probe, paired_tests, render, took


def test_probe_summary_is_reused_for_the_same_key_and_recomputed_for_another(tmp_path):
  path = str(tmp_path / "rows" / "probe.json")
  calls = []
  compute = lambda: calls.append(1) or {"positions": len(calls)}
  key = {"model": "abc", "probe_steps": 96, "settings": {"soft_top_k": 30, "eos": (2,)}}
  first = cached_probe(path, key, compute)
  again = cached_probe(path, dict(key), compute)  # tuples in the key survive the JSON round trip
  assert first == ({"positions": 1}, False) and again == ({"positions": 1}, True)
  assert len(calls) == 1
  other = cached_probe(path, {**key, "probe_steps": 48}, compute)
  assert other == ({"positions": 2}, False) and len(calls) == 2
  with open(path) as f:
    assert json.load(f)["key"]["probe_steps"] == 48


def test_the_time_line_says_what_a_resumed_invocation_read_back():
  base = {"seconds": 120.0, "machine": "CPU", "problems": 4,
          "methods": {"sample": {}, "gumbel": {}}}
  assert took({**base, "resumed_rows": {"sample": 0, "gumbel": 0}}) == "2 min on CPU"
  line = took({**base, "resumed_rows": {"sample": 4, "gumbel": 1}, "probe_resumed": True})
  assert line == ("this invocation: 2 min on CPU; it read back 5 of 8 method-problem rows and "
                  "the probe from earlier invocations of the same command")


def test_each_soft_variant_is_tested_against_sampling_on_the_same_problems():
  sample = np.zeros((6, 2), bool)
  sample[:2] = True  # problems 0-1 solved by both samples
  soft = np.zeros((6, 2), bool)
  soft[2:, 0] = True  # problems 2-5 solved by one of two samples
  out = paired_tests({"sample": sample, "vanilla": soft})
  assert list(out) == ["vanilla"]
  # pass@2: 4 problems only soft solved, 2 only sampling: p = 2 * P(Bin(6, 1/2) <= 2) = 44/64.
  assert out["vanilla"]["pass@n"] == {"only_a": 4, "only_b": 2, "p": 44 / 64}
  # pass@1 differences: -1, -1, +.5 x 4 -> mean 0; every sign assignment reaches |0|.
  assert out["vanilla"]["pass@1"] == {"mean_diff": 0.0, "p": 1.0, "rounds": 0}
  assert paired_tests({"vanilla": soft}) == {}
  result = {"problems": 6, "samples": 2, "max_new_tokens": 8, "max_think_tokens": 4, "seed": 0,
            "methods": {"sample": {"pass@1": 1 / 3, "pass@n": 1 / 3, "think_tokens": None},
                        "vanilla": {"pass@1": 1 / 3, "pass@n": 2 / 3, "think_tokens": 3.0}},
            "paired": out, "seconds": 60, "machine": "CPU", "command": "c",
            "probe": {"positions": 1, "probe_problems": 1,
                      **{k: {"mean": 0, "median": 0} for k in ("soft_top1", "soft_top2",
                                                                "top1_top2", "top1_weight")}},
            "probe_problems": 1}
  text = render(result)
  assert "| vanilla | +0.000 | 1.000 | 4 / 2 | 0.6875 |" in text
  assert "(every sign assignment enumerated)" in text

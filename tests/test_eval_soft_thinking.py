"""The soft-thinking benchmark keeps its probe summary so that a resumed run skips it."""
import json

from benchmarks.eval_soft_thinking import cached_probe, took


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

"""The soft-thinking benchmark keeps its probe summary so that a resumed run skips it."""
import json

from benchmarks.eval_soft_thinking import cached_probe


def test_probe_summary_is_reused_for_the_same_key_and_recomputed_for_another(tmp_path):
  path = str(tmp_path / "rows" / "probe.json")
  calls = []
  compute = lambda: calls.append(1) or {"positions": len(calls)}
  key = {"model": "abc", "probe_steps": 96, "settings": {"soft_top_k": 30, "eos": (2,)}}
  first = cached_probe(path, key, compute)
  again = cached_probe(path, dict(key), compute)  # tuples in the key survive the JSON round trip
  assert first == again == {"positions": 1} and len(calls) == 1
  other = cached_probe(path, {**key, "probe_steps": 48}, compute)
  assert other == {"positions": 2} and len(calls) == 2
  with open(path) as f:
    assert json.load(f)["key"]["probe_steps"] == 48

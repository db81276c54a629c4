"""The CarelessWhisper evaluation's scoring: word emission times from token emission times,
latency of the words the alignment matched, and the summary table (no model needed)."""
import numpy as np
import pytest

from benchmarks import eval_careless as ev
from models.datasets import spoken


class _PieceTokenizer:
  """Decodes a token id to a fixed text piece."""

  def __init__(self, pieces):
    self.pieces = pieces

  def decode(self, ids):
    return "".join(self.pieces[i] for i in ids)


def _utterance(words_and_ends):
  words = tuple(spoken.Word(w, e - 0.2, e) for w, e in words_and_ends)
  return spoken.Utterance(" ".join(w for w, _ in words_and_ends), np.zeros(16000, np.float32),
                          words, voice="en", speed=150, pitch=50)


def test_word_time_is_the_emission_of_its_last_token_and_punctuation_joins_the_word():
  tok = _PieceTokenizer([" Mis", "ter", " Darcy", ",", " said", "."])
  spans = ev.word_spans(tok, [0, 1, 2, 3, 4, 5], [0.3, 0.6, 0.9, 1.2, 1.5, 1.8])
  assert spans == [("mister", 0.6), ("darcy", 1.2), ("said", 1.8)]


def test_latency_counts_only_words_the_alignment_matched():
  ref = _utterance([("the", 0.5), ("quick", 1.0), ("brown", 1.5), ("fox", 2.0)])
  # "quick" substituted, "brown" deleted, one word inserted
  hyp = [("the", 0.6), ("quack", 1.2), ("fox", 2.3), ("jumps", 2.9)]
  lat = ev.aligned_latencies(ref, hyp)
  np.testing.assert_allclose(lat, [0.1, 0.3])
  assert ev.aligned_latencies(ref, []) == []


def test_summary_sums_word_errors_over_utterances_and_renders_missing_timing_as_a_dash():
  rows = [dict(errors=1, words=4, seconds=2.0, latencies=[0.1, 0.3]),
          dict(errors=0, words=6, seconds=3.0, latencies=[0.2])]
  s = ev.summarise(rows)
  assert s["wer"] == 0.1 and s["word_errors"] == 1 and s["words"] == 10
  assert s["latency"]["matched_words"] == 3 and s["latency"]["p50"] == 0.2
  offline = ev.summarise([dict(errors=2, words=8, seconds=2.0)])
  assert "latency" not in offline
  result = dict(systems={"offline": dict(label="Whisper offline", chunk="30 s window",
                                         **offline, rtf=0.05),
                         "careless_300ms": dict(label="CarelessWhisper", chunk="300 ms", **s)},
                utterances=2, audio_seconds=5.0, rtf_runs=3, rtf_utterances=2, batch_size=8,
                machine="m", command="c", out="o.json", plot="o.png")
  table = ev.render(result)
  assert "| Whisper offline | 30 s window | 0.250 (2/8) | - | - | 0.05 |" in table
  assert "| CarelessWhisper | 300 ms | 0.100 (1/10) | 3 | 0.20 / 0.28 | - |" in table


def test_system_plan_expands_kinds_over_chunk_sizes_and_refuses_unknown_systems():
  assert ev.system_plan("offline,naive,careless", "300,100") == [
      ("offline", None), ("naive", 300), ("naive", 100), ("careless", 300), ("careless", 100)]
  assert ev.system_plan("naive_300ms,careless,offline,causal_300ms", "100") == [
      ("naive", 300), ("careless", 100), ("offline", None), ("causal", 300)]
  for bad, chunks in (("greedy", "300"), ("naive_250ms", "300"), ("careless", "250")):
    with pytest.raises(ValueError):
      ev.system_plan(bad, chunks)

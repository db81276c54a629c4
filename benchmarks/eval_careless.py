"""CarelessWhisper evaluation: word error rate, emission latency and real-time factor of
offline Whisper, naive block-causal streaming Whisper (no fine-tuning) and the fine-tuned
streaming model (`train.careless_whisper`) at each chunk size, on held-out synthesised speech.

    python -m benchmarks.eval_careless [--utterances 200] [--chunk_ms 300,100]
        [--systems offline,naive,careless]  (or single systems: naive_300ms,careless_100ms)

Utterances: `models.datasets.spoken.utterances(n, seed, split="test")`, sentences of the
test chapters read by espeak-ng with varied voices, rates and pitches (exact word times).
Systems (Whisper tiny.en, greedy):
* offline: Whisper as released on the whole recording (30 s window);
* naive@ms: Whisper's weights with the causal front end and block-causal encoder, streamed
  (`decoding.streaming.StreamGreedy`: chunks of ms, stability rule over 2 tokens);
* careless@ms: the same with the LoRA adapters trained for that chunk size;
* causal@ms: that fine-tuned causal model decoding the whole recording at once (what a
  settled stream ends with), which separates what streaming costs from what fine-tuning on
  this synthetic speech gains.
WER: word edit distance after lowercasing and dropping punctuation (`spoken.word_errors`),
summed over utterances. Latency: for each reference word the streaming output got right
(edit-distance alignment), the emission time of its last token minus the word's end time.
Real-time factor: decoding wall time over audio time of the first `--rtf_utterances` (16),
median of `--rtf_runs` (3) passes after one that compiles, batches of 8 streams in lockstep,
timed apart from the transcription pass (run it on an otherwise idle CPU). Per-utterance
outputs go to `<work_dir>/<system>.jsonl` (default results/rows/careless_whisper, committed with the
summary) and a rerun resumes them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Callable, Optional

import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from decoding import transcribe as transcribe_lib
from decoding.greedy import Greedy
from decoding.streaming import StreamGreedy
from models import speech
from models.datasets import spoken

MARKER = "careless_whisper"
BASE = "whisper-tiny.en"


def word_spans(tokenizer, ids: list[int], times: list[float]) -> list[tuple[str, float]]:
  """The hypothesis' words with the emission time of each word's last token (a token that
  starts with a space starts a word; punctuation-only tokens join the word before)."""
  words: list[list] = []
  for t, e in zip(ids, times):
    piece = tokenizer.decode([t])
    if not words or (piece.startswith(" ") and spoken.normalise_text(piece)):
      words.append([piece, e])
    else:
      words[-1][0] += piece
      words[-1][1] = max(words[-1][1], e)
  out = []
  for text, e in words:
    norm = spoken.normalise_text(text)
    if norm:
      out += [(w, e) for w in norm]
  return out


def aligned_latencies(reference: spoken.Utterance, hyp: list[tuple[str, float]]) -> list[float]:
  """Emission time minus end time of each reference word the alignment matched exactly.

  The alignment is a minimum word-edit-distance one that, among those, matches the most words
  (ties between a substitution and a deletion plus a later match go to the match)."""
  ref = [(w, word.end) for word in reference.words for w in spoken.normalise_text(word.text)]
  n, m = len(ref), len(hyp)
  edit = n + m + 1  # an edit outweighs any number of matches: fewest edits first
  d = np.zeros((n + 1, m + 1), np.int64)
  d[:, 0], d[0, :] = edit * np.arange(n + 1), edit * np.arange(m + 1)
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      diag = -1 if ref[i - 1][0] == hyp[j - 1][0] else edit
      d[i, j] = min(d[i - 1, j] + edit, d[i, j - 1] + edit, d[i - 1, j - 1] + diag)
  i, j, out = n, m, []
  while i > 0 and j > 0:
    same = ref[i - 1][0] == hyp[j - 1][0]
    if same and d[i, j] == d[i - 1, j - 1] - 1:
      out.append(hyp[j - 1][1] - ref[i - 1][1])
      i, j = i - 1, j - 1
    elif not same and d[i, j] == d[i - 1, j - 1] + edit:
      i, j = i - 1, j - 1
    elif d[i, j] == d[i - 1, j] + edit:
      i -= 1
    else:
      j -= 1
  return out[::-1]


KINDS = ("offline", "naive", "careless", "causal")


LABELS = {"offline": "Whisper offline",
          "naive": "block-causal Whisper, not fine-tuned",
          "careless": "CarelessWhisper (LoRA fine-tuned), streaming",
          "causal": "CarelessWhisper, offline (no streaming)"}


def system_plan(systems: str, chunk_ms: str) -> list[tuple[str, Optional[int]]]:
  """(kind, chunk ms) of each system to run, in order: a kind runs at every chunk size of
  `chunk_ms` (offline at none); a name such as `naive_300ms` runs that one system."""
  chunks = [int(c) for c in chunk_ms.split(",")]
  if any(c < 20 or c % 20 for c in chunks):
    raise ValueError(f"--chunk_ms takes positive multiples of 20, got {chunk_ms!r}")
  plan = []
  for item in systems.split(","):
    m = re.fullmatch(r"(naive|careless|causal)_(\d+)ms", item)
    if item == "offline":
      plan.append(("offline", None))
    elif item in KINDS:
      plan += [(item, c) for c in chunks]
    elif m and int(m[2]) >= 20 and int(m[2]) % 20 == 0:
      plan.append((m[1], int(m[2])))
    else:
      raise ValueError(f"unknown system {item!r}: give {', '.join(KINDS)} or a name such as "
                       "naive_300ms / careless_100ms")
  return list(dict.fromkeys(plan))


def run_system(name: str, decode: Callable[[list], list], tokenizer, utts, path: str,
               batch_size: int) -> list[dict]:
  """Transcribes (`decode`: audios -> transcripts) every utterance not yet in `path` (JSONL,
  one line per utterance)."""
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          done[r["index"]] = r
  todo = [i for i in range(len(utts)) if i not in done]
  for s in range(0, len(todo), batch_size):
    idx = todo[s: s + batch_size]
    out = decode([utts[i].audio for i in idx])
    with open(path, "a") as f:
      for i, t in zip(idx, out):
        errors, words = spoken.word_errors(utts[i].text, t.text)
        rec = dict(index=i, text=t.text, reference=utts[i].text, errors=errors, words=words,
                   seconds=utts[i].seconds, tokens=len(t.tokens))
        if t.emit_seconds is not None:
          rec["latencies"] = aligned_latencies(
              utts[i], word_spans(tokenizer, t.tokens, t.emit_seconds))
        f.write(json.dumps(rec) + "\n")
        done[i] = rec
    print(f"{name}: {len(done)}/{len(utts)}", flush=True)
  return [done[i] for i in range(len(utts))]


def real_time_factor(decode: Callable[[list], list], utts, runs: int) -> float:
  """Median over `runs` of decoding wall time over audio time for `utts`, in batches of
  `batch_size` streams in lockstep, after one untimed pass that compiles. Timed apart from
  the transcription pass so that its figure comes from an otherwise idle CPU (the
  transcripts themselves do not depend on load and can be produced alongside other jobs)."""
  audio = [u.audio for u in utts]
  decode(audio)
  walls = []
  for _ in range(runs):
    t0 = time.perf_counter()
    decode(audio)
    walls.append(time.perf_counter() - t0)
  return float(np.median(walls)) / sum(u.seconds for u in utts)


def summarise(rows: list[dict]) -> dict:
  errors, words = sum(r["errors"] for r in rows), sum(r["words"] for r in rows)
  out = dict(utterances=len(rows), word_errors=errors, words=words, wer=errors / words)
  lat = np.asarray([x for r in rows for x in r.get("latencies", [])])
  if "latencies" in rows[0]:
    out["latency"] = dict(matched_words=int(lat.size), mean=float(lat.mean()) if lat.size else None,
                          **{f"p{q}": float(np.percentile(lat, q)) if lat.size else None
                             for q in (10, 50, 90)})
  return out


def render(result: dict) -> str:
  lines = ["| system | chunk | WER | words matched | latency p50 / p90 (s) | real-time factor |",
           "|---|---|---|---|---|---|"]
  for name, s in result["systems"].items():
    lat = s.get("latency")
    lat_text = (f"{lat['p50']:.2f} / {lat['p90']:.2f}" if lat and lat["p50"] is not None
                else "-")
    matched = str(lat["matched_words"]) if lat else "-"
    rtf = f"{s['rtf']:.2f}" if "rtf" in s else "-"
    lines.append(f"| {s['label']} | {s['chunk']} | {s['wer']:.3f} ({s['word_errors']}/"
                 f"{s['words']}) | {matched} | {lat_text} | {rtf} |")
  timing = (f"real-time factor: median of {result['rtf_runs']} timed passes over the first "
            f"{result['rtf_utterances']} utterances in batches of {result['batch_size']}"
            if result["rtf_utterances"] else "real-time factor not timed in this run")
  lines += ["", f"{result['utterances']} held-out utterances ({result['audio_seconds']:.0f} s of "
            f"speech), Whisper tiny.en, greedy; {timing}; {result['machine']}. Command: "
            f"`{result['command']}`; results `{result['out']}`, plot `{result['plot']}`."]
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  import matplotlib  # noqa: PLC0415 (optional: the plot)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, s in result["systems"].items():
    lat = s.get("latency")
    if lat and lat["p50"] is not None:
      ax.scatter(lat["p50"], s["wer"], label=f"{s['label']} {s['chunk']}")
  for style, (name, s) in zip(("--", ":", "-."), ((n, s) for n, s in result["systems"].items()
                                                  if not s.get("latency"))):
    ax.axhline(s["wer"], ls=style, c="gray", label=f"{s['label']} ({s['chunk']})")
  ax.set_xlabel("median emission latency (s)")
  ax.set_ylabel("WER (log scale)")
  ax.set_yscale("log")  # the non-fine-tuned streams repeat themselves: WER far above 1
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--utterances", type=int, default=200)
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--chunk_ms", default="300,100")
  ap.add_argument("--systems", default="offline,naive,careless,causal")
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--rtf_utterances", type=int, default=16,
                  help="utterances of the real-time-factor timing (0: no timing)")
  ap.add_argument("--rtf_runs", type=int, default=3, help="timed passes (median)")
  ap.add_argument("--work_dir", default="results/rows/careless_whisper",
                  help="per-system JSONL, one line per utterance (kept with the results; a "
                       "rerun resumes)")
  report.add_output_args(ap, "results/careless_whisper.json")
  args = ap.parse_args(argv)
  done = report.render_only(args, render, MARKER)
  if done is not None:
    return done
  try:
    plan = system_plan(args.systems, args.chunk_ms)
  except ValueError as e:
    ap.error(str(e))
  os.makedirs(args.work_dir, exist_ok=True)
  utts = spoken.utterances(args.utterances, seed=args.seed, split="test")
  systems = {}
  base = speech.load_whisper(BASE)
  for kind, ms in plan:
    name = "offline" if kind == "offline" else f"{kind}_{ms}ms"
    model = base if kind in ("offline", "naive") else speech.load_whisper(
        f"careless-{BASE}-{ms}ms")
    stream = StreamGreedy(chunk_ms=ms, first_chunks=(model.streaming or {}).get(
        "first_chunks", 2)) if ms else None
    bs = args.batch_size
    if kind == "offline":
      decode = lambda a, m=model: transcribe_lib.transcribe(
          m, a, Greedy(max_new_tokens=224), batch_size=bs)
    elif kind == "causal":  # the whole recording at once through the causal model
      decode = lambda a, m=model, st=stream: transcribe_lib.causal_transcribe(
          m, a, st, batch_size=bs)
    else:
      decode = lambda a, m=model, st=stream: transcribe_lib.transcribe(m, a, st, batch_size=bs)
    rows = run_system(name, decode, model.tokenizer, utts,
                      os.path.join(args.work_dir, name + ".jsonl"), bs)
    chunk = {"offline": "30 s window", "causal": f"{ms} ms blocks, whole recording"}.get(
        kind, f"{ms} ms")
    systems[name] = dict(label=LABELS[kind], chunk=chunk, model=model.name, **summarise(rows))
    if args.rtf_utterances:
      systems[name]["rtf"] = real_time_factor(decode, utts[:args.rtf_utterances], args.rtf_runs)
  plot_path = args.out[:-5] + ".png"
  result = dict(utterances=len(utts), audio_seconds=float(sum(u.seconds for u in utts)),
                systems=systems, machine=machine_name(), out=args.out, plot=plot_path,
                batch_size=args.batch_size, rtf_utterances=args.rtf_utterances,
                rtf_runs=args.rtf_runs,
                command=" ".join(["python -m benchmarks.eval_careless"] + list(
                    sys.argv[1:] if argv is None else argv)))
  plot(result, plot_path)
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

"""Tokens/s of every decoding strategy on SmolLM2, against our greedy loop in the same run.

  python -m benchmarks.bench_strategies [--runs 3] [--new-tokens 64] [--skip-hf]

One chat prompt, batch 1, exactly --new-tokens new tokens per returned sequence (no EOS
stop), each strategy with its settings' defaults; the median of --runs warm runs (compiles
excluded), every configuration timed in interleaved rounds (greedy, top-k, ..., greedy,
top-k, ...) so a drift of the machine reaches them all alike. "tokens/s" counts the tokens of the returned (best) sequence, so it is the
speed at which a user gets one answer; strategies that explore more (beams, drafts,
samples) pay for it there. Also measured in the same run:
  * superposed decoding (k = 3 drafts) against 3 separate sampling runs, the comparison
    of "Superposed Decoding" (and against one batch-3 sampling run);
  * our beam search against Hugging Face transformers' beam search on the same weights.
The table goes into BENCHMARKS.md between markers, with the machine and the command.
"""
from __future__ import annotations

import argparse
import statistics

from benchmarks.bench_decode import load_hf, time_hf, write_table
from benchmarks.hardware import cpu_name, interleaved
from benchmarks.eval_open_ended import strategy_settings
from decoding.best_of_n import BestOfN
from decoding.runner import generate
from decoding.self_agreement import SelfAgreement
from decoding.strategy import Resources, Target
from models.lm import load_model

MARKER = "bench_strategies"


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--out", default="BENCHMARKS.md")
  args = ap.parse_args(argv)
  n = args.new_tokens
  model = load_model("smollm2-135m-instruct")
  tok = model.tokenizer
  prompt = tok.encode_chat([{"role": "user", "content": "Tell me a short story about a fox."}])
  cfgs = strategy_settings(n)
  cfgs["best-of-N (N = 4, self-certainty)"] = BestOfN(num_samples=4, max_new_tokens=n)
  cfgs["self-agreement (m = 4)"] = SelfAgreement(num_paths=4, max_new_tokens=n,
                                                 agreement_max_new_tokens=n)
  target = Target(model.lm, model.params, eos_ids=(), pad_id=2, tokenizer=tok)
  resources = Resources()

  def run(settings, prompts=(prompt,)):
    gens = generate(target, list(prompts), settings, seed=0, batch_size=8, resources=resources)
    assert all(len(g.output_ids) == n for g in gens)
    return gens

  # Superposed (k = 3) is compared with 3 sampling runs, as in the paper, and with one batched
  # run of 3 samples (timed with the rest).
  batch3_name = "top-p (0.95), 3 samples in one batch"
  calls = {name: (lambda cfg=cfg: run(cfg)) for name, cfg in cfgs.items()}
  calls[batch3_name] = lambda: run(cfgs["top-p (0.95)"].replace(num_return_sequences=3))
  secs = {name: statistics.median(t) for name, t in interleaved(calls, args.runs).items()}
  batch3 = secs.pop(batch3_name)
  greedy = secs["greedy"]
  layout = ("scanned layers" if model.config.scan_layers else "per-layer weights") + (
      ", fused projections" if model.config.fused_projections else "")
  lines = [f"SmolLM2-135M-Instruct fp32 ({layout}), batch 1, {n} new tokens per returned "
           f"sequence, median of {args.runs} warm runs timed in interleaved rounds, "
           f"{cpu_name()}.", "",
           "| strategy | seconds | tokens/s | vs greedy |", "|---|---|---|---|"]
  for name, s in secs.items():
    lines.append(f"| {name} | {s:.2f} | {n / s:.1f} | {greedy / s:.2f}x |")

  three_sequential = 3 * secs["top-p (0.95)"]
  sup = secs["superposed"]
  lines += ["", f"Superposed decoding, k = 3 drafts in one pass: {sup:.2f} s. Three separate "
            f"nucleus-sampling runs: {three_sequential:.2f} s, so superposed is "
            f"**{three_sequential / sup:.2f}x** faster (the paper reports >= 2.44x for k >= 3). "
            f"One batched sampling run of 3 sequences: {batch3:.2f} s "
            f"({batch3 / sup:.2f}x the superposed time)."]
  if not args.skip_hf:
    hf = load_hf()
    beam_cfg = cfgs["beam"]
    hf_beam = n / time_hf(prompt, n, args.runs, hf=hf, num_beams=int(beam_cfg.num_beams),
                          length_penalty=float(beam_cfg.length_penalty),
                          early_stopping=beam_cfg.early_stopping)
    hf_greedy = n / time_hf(prompt, n, args.runs, hf=hf)
    lines += ["", f"Beam search, {int(beam_cfg.num_beams)} beams: decodax {secs['beam']:.2f} s "
              f"({n / secs['beam']:.1f} tokens/s), Hugging Face transformers (PyTorch, fp32, same "
              f"weights) {hf_beam:.2f} s ({n / hf_beam:.1f} tokens/s): "
              f"**{hf_beam / secs['beam']:.2f}x**. Greedy: decodax {greedy:.2f} s, "
              f"Hugging Face {hf_greedy:.2f} s."]
  lines += ["", f"`python -m benchmarks.bench_strategies --runs {args.runs} --new-tokens {n}"
            f"{' --skip-hf' if args.skip_hf else ''}`"]
  table = "\n".join(lines)
  write_table(args.out, table, MARKER, "## Decoding strategies (issue 4)")
  print(table)


if __name__ == "__main__":
  main()

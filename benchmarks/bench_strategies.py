"""Tokens/s of every decoding strategy on SmolLM2, against our greedy loop in the same run.

  python -m benchmarks.bench_strategies [--runs 3] [--new-tokens 64] [--skip-hf]
      [--extract-passages 3] [--out BENCHMARKS.md]

One chat prompt, batch 1, exactly --new-tokens new tokens per returned sequence (no EOS
stop), each strategy with its settings' defaults; the median of --runs warm runs (compiles
excluded), every configuration timed in interleaved rounds (greedy, top-k, ..., greedy,
top-k, ...) so a drift of the machine reaches them all alike. "tokens/s" counts the tokens of
the returned (best) sequence, so it is the speed at which a user gets one answer; strategies
that explore more (beams, drafts, samples) pay for it there. The rows of the newer strategies:
  * AdaDec twice: with SmolLM2's learned entropy threshold (the "tau" of
    results/adadec_threshold_smollm2-135m-instruct.json, written by
    `python -m train.adadec_threshold --model smollm2-135m-instruct`; the script stops if
    it is missing) and with tau = -inf, which looks ahead at every step (its worst case);
    each label gives the share of steps that looked ahead;
  * soft thinking, one row per variant (vanilla, dirichlet, gumbel): its tokens/s counts
    every output token (soft thinking steps, the forced `</think>` marker, the sampled
    answer). Its default thinking budget (192 of 256 tokens) is kept when it fits in
    --new-tokens with the marker and one answer token, else the same 3/4 share of
    --new-tokens is used; with no EOS stop every row writes exactly --new-tokens tokens.
Also measured in the same run:
  * superposed decoding (k = 3 drafts) against 3 separate sampling runs, the comparison
    of "Superposed Decoding" (and against one batch-3 sampling run);
  * exact-extract, which returns a passage span rather than a stream of tokens (so it has
    no tokens/s): seconds per passage against greedy answering the same prompt (up to 20
    tokens, stopping at EOS, as in benchmarks/eval_extractive.py), zero-shot, on
    --extract-passages passages of models/datasets/extractive_qa.py (seed 0, one question
    each; 0 leaves it out), with its default pruning and with every start scored
    (prune_starts=False, about n^2 / 2 decoder positions for a passage of n tokens, so it
    dominates the run's time);
  * our beam search against Hugging Face transformers' beam search on the same weights.
The table goes into BENCHMARKS.md between markers, with the machine and the command.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics

from benchmarks.bench_decode import load_hf, time_hf, write_table
from benchmarks.eval_open_ended import strategy_settings
from benchmarks.hardware import machine_name, interleaved
from decoding.adadec import AdaDec
from decoding.best_of_n import BestOfN
from decoding.exact_extract import ExactExtract, build_query
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.self_agreement import SelfAgreement
from decoding.soft_thinking import VARIANTS, SoftThinking, marker_ids
from decoding.strategy import Resources, Target
from models.datasets import extractive_qa
from models.lm import load_model

MARKER = "bench_strategies"
MODEL = "smollm2-135m-instruct"
THRESHOLD_FILE = f"results/adadec_threshold_{MODEL}.json"
EXTRACT_SEED = 0
EXTRACT_ANSWER_TOKENS = 20  # greedy's answer budget in benchmarks/eval_extractive.py


def learned_threshold(path: str) -> float:
  """SmolLM2's AdaDec entropy threshold in nats, as `train.adadec_threshold` wrote it."""
  fit = f"`python -m train.adadec_threshold --model {MODEL}`"
  if not os.path.exists(path):
    raise ValueError(f"the AdaDec rows need SmolLM2's learned entropy threshold: no {path}; "
                     f"fit it with {fit}")
  with open(path) as f:
    fitted = json.load(f)
  tau = fitted.get("tau")
  if (fitted.get("model") != MODEL or isinstance(tau, bool) or not isinstance(tau, (int, float))
      or math.isnan(tau)):
    raise ValueError(f"{path} holds no numeric 'tau' fitted for {MODEL}; refit it with {fit}")
  return float(tau)


def think_budget(new_tokens: int, end_tokens: int) -> int:
  """Soft thinking steps for a run of `new_tokens` output tokens whose end marker is
  `end_tokens` long: the default budget when the marker and an answer token still fit, else
  the default's share of the default length (192 / 256) of `new_tokens`, at least 1."""
  d = SoftThinking()
  room = new_tokens - end_tokens - 1  # the most thinking steps that leave an answer token
  if room < 1:
    raise ValueError(f"--new-tokens {new_tokens} leaves soft thinking no thinking step: its "
                     f"end marker takes {end_tokens} tokens and the answer at least one "
                     f"(use --new-tokens >= {end_tokens + 2})")
  if d.max_think_tokens <= room:
    return d.max_think_tokens
  return min(room, max(1, new_tokens * d.max_think_tokens // d.max_new_tokens))


def soft_thinking_settings(new_tokens: int, end_tokens: int) -> dict[str, SoftThinking]:
  """name -> each variant with its defaults and the thinking budget of `think_budget`."""
  budget = think_budget(new_tokens, end_tokens)
  return {f"soft thinking, {v}": SoftThinking(soft_variant=v, max_new_tokens=new_tokens,
                                              max_think_tokens=budget) for v in VARIANTS}


def extract_inputs(tokenizer, passages: int, eos_id: int):
  """`passages` extractive-QA questions, one per generated passage: (exact-extract requests,
  greedy's token-id prompts, passage token counts); both decoders see the same prompt
  (`build_query`, zero-shot)."""
  examples = extractive_qa.examples(passages, seed=EXTRACT_SEED, questions_per_passage=1)
  queries = [build_query(tokenizer, e.passage, e.question, (), eos_id) for e in examples]
  return ([e.request() for e in examples], [q.prompt_ids for q in queries],
          [len(q.passage) for q in queries])


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--extract-passages", type=int, default=3,
                  help="extractive-QA passages timed for exact_extract (0: leave it out)")
  ap.add_argument("--out", default="BENCHMARKS.md")
  args = ap.parse_args(argv)
  if args.runs < 1 or args.new_tokens < 1:
    ap.error("--runs and --new-tokens must be >= 1")
  if args.extract_passages < 0:
    ap.error("--extract-passages must be >= 0")
  try:  # before the model loads: a missing fit should not cost a load first
    tau = learned_threshold(THRESHOLD_FILE)
  except ValueError as e:
    ap.error(str(e))
  n = args.new_tokens
  model = load_model(MODEL)
  tok = model.tokenizer
  prompt = tok.encode_chat([{"role": "user", "content": "Tell me a short story about a fox."}])
  target = Target(model.lm, model.params, eos_ids=(), pad_id=2, tokenizer=tok)
  end_tokens = len(marker_ids("think_end", SoftThinking().think_end, target))
  try:
    soft = soft_thinking_settings(n, end_tokens)
  except ValueError as e:
    ap.error(str(e))
  cfgs = strategy_settings(n)
  cfgs["best-of-N (N = 4, self-certainty)"] = BestOfN(num_samples=4, max_new_tokens=n)
  cfgs["self-agreement (m = 4)"] = SelfAgreement(num_paths=4, max_new_tokens=n,
                                                 agreement_max_new_tokens=n)
  # Row name -> what its label says about tau (the share of lookahead steps is added after
  # the runs).
  adadec = {"AdaDec (learned tau)": f"tau = {tau:.2f} nats, learned",
            "AdaDec (tau = -inf)": "tau = -inf"}
  for name, threshold in zip(adadec, (tau, -math.inf)):
    cfgs[name] = AdaDec(entropy_threshold=threshold, max_new_tokens=n)
  cfgs.update(soft)
  resources = Resources()
  outputs = {}  # name -> its last run's generations (AdaDec's and soft thinking's extras)

  def run(name, settings, prompts=(prompt,)):
    gens = generate(target, list(prompts), settings, seed=0, batch_size=8, resources=resources)
    assert all(len(g.output_ids) == n for g in gens)
    outputs[name] = gens
    return gens

  # Superposed (k = 3) is compared with 3 sampling runs, as in the paper, and with one batched
  # run of 3 samples (timed with the rest).
  batch3_name = "top-p (0.95), 3 samples in one batch"
  calls = {name: functools.partial(run, name, cfg) for name, cfg in cfgs.items()}
  calls[batch3_name] = functools.partial(
      run, batch3_name, cfgs["top-p (0.95)"].replace(num_return_sequences=3))
  extract = "exact_extract, per passage"
  extract_all = "exact_extract scoring every start, per passage"
  extract_greedy = "greedy answer, per passage"
  if args.extract_passages:
    # Exact-extract scores stopping after a span, so it decodes with the model's EOS id; greedy
    # answers with it too (it stops where its answer ends). Each passage is its own call: batch
    # 1, like the table.
    qa_target = Target.of(model)
    requests, qa_prompts, passage_tokens = extract_inputs(tok, args.extract_passages,
                                                          qa_target.eos_ids[0])
    answer, search = Greedy(max_new_tokens=EXTRACT_ANSWER_TOKENS), ExactExtract()

    def each_passage(name, settings, inputs):
      outputs[name] = [g for x in inputs
                       for g in generate(qa_target, [x], settings, resources=resources)]
      return outputs[name]
    calls[extract] = functools.partial(each_passage, extract, search, requests)
    calls[extract_all] = functools.partial(each_passage, extract_all,
                                           search.replace(prune_starts=False), requests)
    calls[extract_greedy] = functools.partial(each_passage, extract_greedy, answer, qa_prompts)
  secs = {name: statistics.median(t) for name, t in interleaved(calls, args.runs).items()}
  batch3 = secs.pop(batch3_name)
  extract_secs = {k: secs.pop(k) / args.extract_passages
                  for k in (extract, extract_all, extract_greedy) if k in secs}
  greedy = secs["greedy"]

  # What the new rows did, from their generations (the same in every run: AdaDec is
  # deterministic, soft thinking samples from seed 0).
  labels = {name: name for name in secs}
  for name, about_tau in adadec.items():
    share = statistics.mean(g.extras["lookahead_share"] for g in outputs[name])
    labels[name] = f"AdaDec ({about_tau}; looked ahead at {share:.0%} of steps)"
  for name in soft:
    think = statistics.mean(g.extras["think_tokens"] for g in outputs[name])
    labels[name] = (f"{name} ({think:.0f} thinking + {n - think:.0f} marker and answer "
                    f"tokens)")

  layout = ("scanned layers" if model.config.scan_layers else "per-layer weights") + (
      ", fused projections" if model.config.fused_projections else "")
  lines = [f"SmolLM2-135M-Instruct fp32 ({layout}), batch 1, {n} new tokens per returned "
           f"sequence, median of {args.runs} warm runs timed in interleaved rounds, "
           f"{machine_name()}.", "",
           "| strategy | seconds | tokens/s | vs greedy |", "|---|---|---|---|"]
  for name, s in secs.items():
    lines.append(f"| {labels[name]} | {s:.2f} | {n / s:.1f} | {greedy / s:.2f}x |")

  ada = cfgs["AdaDec (learned tau)"]
  budget = next(iter(soft.values())).max_think_tokens
  default_budget = SoftThinking().max_think_tokens
  lines += ["", f"AdaDec uses its defaults ({ada.lookahead_candidates} candidates rolled out "
            f"{ada.lookahead_steps} tokens each"
            f"{', code-structure stops' if ada.code_stops else ''}) on the same story prompt; "
            f"the learned tau is SmolLM2's from {THRESHOLD_FILE}. Soft thinking's tokens/s "
            f"counts all {n} tokens of each sequence: thinking steps (at most {budget}"
            + ("" if budget == default_budget else
               f"; its default {default_budget} does not fit in {n} tokens")
            + f"), the `</think>` marker ({end_tokens} tokens, forced at the budget) and the "
            f"sampled answer."]
  three_sequential = 3 * secs["top-p (0.95)"]
  sup = secs["superposed"]
  lines += ["", f"Superposed decoding, k = 3 drafts in one pass: {sup:.2f} s. Three separate "
            f"nucleus-sampling runs: {three_sequential:.2f} s, so superposed is "
            f"**{three_sequential / sup:.2f}x** faster (the paper reports >= 2.44x for k >= 3). "
            f"One batched sampling run of 3 sequences: {batch3:.2f} s "
            f"({batch3 / sup:.2f}x the superposed time)."]
  if extract_secs:
    ee, ea, ga = (extract_secs[k] for k in (extract, extract_all, extract_greedy))
    answer_tokens = statistics.mean(len(g.output_ids) for g in outputs[extract_greedy])
    scored = (sum(g.extras["starts_scored"] for g in outputs[extract])
              / sum(g.extras["starts"] for g in outputs[extract]))
    assert [g.extras["span"] for g in outputs[extract]] == \
        [g.extras["span"] for g in outputs[extract_all]], "pruning changed an answer"
    lines += ["", f"Exact-extract (zero-shot, no token stream, so no tokens/s): "
              f"{args.extract_passages} generated passage"
              f"{'s' if args.extract_passages > 1 else ''} of "
              f"{statistics.mean(passage_tokens):.0f} tokens on average "
              f"(models/datasets/extractive_qa.py, seed {EXTRACT_SEED}, one question each), "
              f"{ee:.2f} s per passage against {ga:.2f} s for greedy answering the same prompt "
              f"(up to {EXTRACT_ANSWER_TOKENS} tokens, stopping at EOS: {answer_tokens:.1f} on "
              f"average): **{ee / ga:.1f}x** greedy's time. Its exact pruning scored "
              f"{scored:.0%} of the start positions; scoring every start took {ea:.2f} s per "
              f"passage ({ea / ga:.1f}x greedy), with the same answers."]
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
            f"{' --skip-hf' if args.skip_hf else ''}"
            f" --extract-passages {args.extract_passages}`"]
  table = "\n".join(lines)
  write_table(args.out, table, MARKER, "## Decoding strategies (issue 4)")
  print(table)


if __name__ == "__main__":
  main()

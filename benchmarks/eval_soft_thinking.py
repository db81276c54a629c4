"""Stochastic soft thinking on arithmetic word problems with SmolLM2-135M-Instruct ("LLMs are
Single-threaded Reasoners: Demystifying the Working Mechanism of Soft Thinking", Wu et al.,
ICLR 2026; decoding/soft_thinking.py).

  python -m benchmarks.eval_soft_thinking [--problems=64] [--samples=8]

(a) The paper's probe. Along vanilla soft-thinking trajectories (soft token = the top
`soft_max_topk` components of the T = 0.6, top-k 30, top-p 0.95 distribution), each step
feeds the model three inputs from the same cache: the soft token, the top-1 token alone and
the top-2 token alone, and compares the next-step distributions (softmax at the same T) by
Jensen-Shannon divergence (nats). If the model follows the top-1 component of the mixture
("single-threaded"), JS(soft, top-1) is much smaller than JS(soft, top-2). Positions after a
row's EOS are not counted.

(b) pass@1 (mean over the samples) and pass@N (any of N right) for discrete sampling and for
vanilla, Dirichlet and Gumbel soft thinking, N samples per problem, answers = the last number
in the output. SmolLM2 has no thinking tokens, so the prompt asks it to finish with "The
answer is" and the number, and " answer is" is the end-of-thinking marker (forced after the
thinking budget). Each soft variant is compared with discrete sampling on the same problems
by paired tests (sign-flip permutation for pass@1, McNemar's exact test for pass@N).
Every generation run goes through the evaluation harness
(`decoding.eval_runner`, resumable JSONL under --work_dir; the probe's summary is kept
there too, as probe.json). Writes results/soft_thinking.json
and the table between the `soft_thinking` markers in README.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from benchmarks.significance import EXACT_MAX, mcnemar_exact, sign_flip
from decoding import eval_runner, processors
from decoding.answers import last_number
from decoding.eval_runner import Row
from decoding.prefill import new_cache, prefill
from decoding.results import Generation
from decoding.runner import bucket
from decoding.sampling import Sample
from decoding.soft_thinking import SoftThinking, mixture_embedding, soft_weights
from decoding.strategy import Resources, Target
from models.datasets import arithmetic
from models.lm import load_model

MARKER = "soft_thinking"
INSTRUCTION = " Think step by step, then finish with 'The answer is' and the number."
THINK_END = " answer is"
METHODS = ("sample", "vanilla", "dirichlet", "gumbel")
BASELINE = "sample"
ROUNDS = 100_000  # sign-flip permutations for the pass@1 p-values


def paired_tests(solved: dict[str, np.ndarray]) -> dict:
  """solved: method -> bool [problems, samples]. Each method against discrete sampling on the
  same problems: pass@1 by the paired sign-flip permutation test on per-problem pass@1,
  pass@N by McNemar's exact test on per-problem pass@N (benchmarks/significance.py)."""
  if BASELINE not in solved:
    return {}
  base = solved[BASELINE]
  out = {}
  for name, ok in solved.items():
    if name == BASELINE:
      continue
    out[name] = {"pass@1": sign_flip(ok.mean(axis=1), base.mean(axis=1), rounds=ROUNDS),
                 "pass@n": mcnemar_exact(ok.any(axis=1), base.any(axis=1))}
  return out


def js_divergence(p: jax.Array, q: jax.Array) -> jax.Array:
  """Jensen-Shannon divergence (nats) of distributions [..., V] -> [...]."""
  m = 0.5 * (p + q)
  kl = lambda a: jnp.sum(jnp.where(a > 0, a * (jnp.log(a) - jnp.log(jnp.where(a > 0, m, 1.0))),
                                   0.0), axis=-1)
  return 0.5 * kl(p) + 0.5 * kl(q)


@functools.partial(jax.jit, static_argnames=("lm", "soft", "max_topk", "work", "steps",
                                             "cache_len", "temperature"))
def probe(lm, params, prompts, prompt_len, eos_ids, *, soft: processors.Chain, max_topk: int,
          work: int, steps: int, cache_len: int, temperature: float) -> dict:
  """`steps` vanilla soft-thinking steps from each prompt [B, P]; per step and row the JS
  divergences between the next-step distributions under the soft, top-1 and top-2 inputs,
  the top-1 weight and whether the row is still before its EOS ([steps, B] each)."""
  B = prompts.shape[0]
  logits, cache = prefill(lm, params, prompts, prompt_len, new_cache(lm, B, cache_len))
  no_keys = jnp.zeros((B, 2), jnp.uint32)  # vanilla weights draw nothing

  def body(carry, t):
    logits, cache, alive = carry
    ids, w, token, _ = soft_weights(soft(logits, None), no_keys, "vanilla", max_topk, work,
                                    1.0, 1.0)
    top2 = jax.lax.top_k(logits, 2)[1]  # [B, 2]: the top-1 and top-2 tokens
    pos = (prompt_len + t)[:, None]
    out_s = lm(params, None, pos, cache, embeds=mixture_embedding(lm, params, ids, w)[:, None])
    out_1 = lm(params, top2[:, :1], pos, cache)
    out_2 = lm(params, top2[:, 1:], pos, cache)
    dist = lambda o: jax.nn.softmax(o.logits[:, 0] / temperature, axis=-1)
    ps, p1, p2 = dist(out_s), dist(out_1), dist(out_2)
    stats = {"soft_top1": js_divergence(ps, p1), "soft_top2": js_divergence(ps, p2),
             "top1_top2": js_divergence(p1, p2), "top1_weight": w[:, 0], "valid": alive}
    alive = alive & ~jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
    return (out_s.logits[:, 0], out_s.cache, alive), stats

  _, stats = jax.lax.scan(body, (logits, cache, jnp.ones((B,), bool)), jnp.arange(steps))
  return stats


def run_probe(target, prompts, settings: SoftThinking, steps: int, batch_size: int) -> dict:
  soft = processors.warpers(settings.soft_temperature, settings.soft_top_k, settings.soft_top_p,
                            0.0)
  P = bucket(max(len(p) for p in prompts))
  sums: dict = {}
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    padded = np.full((batch_size, P), target.pad_id, np.int32)
    lens = np.ones((batch_size,), np.int32)
    for b, p in enumerate(chunk):
      padded[b, :len(p)], lens[b] = p, len(p)
    stats = jax.device_get(probe(
        target.lm, target.params, jnp.asarray(padded), jnp.asarray(lens), target.eos_array,
        soft=soft, max_topk=settings.soft_max_topk,
        work=settings.soft_top_k or target.lm.vocab_size, steps=steps, cache_len=P + steps,
        temperature=float(settings.soft_temperature)))
    valid = stats.pop("valid")[:, :len(chunk)]
    for k, v in stats.items():
      sums.setdefault(k, []).append(v[:, :len(chunk)][valid])
  values = {k: np.concatenate(v) for k, v in sums.items()}
  out = {"positions": int(len(values["soft_top1"]))}
  for k, v in values.items():
    out[k] = {"mean": float(v.mean()), "median": float(np.median(v))}
  return out


def cached_probe(path: str, key: dict, compute) -> tuple[dict, bool]:
  """(the probe's summary, whether it was read back): from `path` when it was written for the
  same `key` (model checksum, problems, steps, seed, batch and settings), else `compute()`
  saved there, so a resumed run does not repeat the probe (minutes of model calls on CPU)."""
  key = json.loads(json.dumps(key))  # as it reads back: tuples become lists
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("key") == key:
      return saved["probe"], True
  out = compute()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"key": key, "probe": out}, f, indent=1)
  os.replace(path + ".tmp", path)
  return out, False


def method_settings(name: str, args) -> object:
  warpers = dict(temperature=0.6, top_k=30, top_p=0.95)
  if name == "sample":
    return Sample(max_new_tokens=args.max_new_tokens, num_return_sequences=args.samples,
                  **warpers)
  return SoftThinking(max_new_tokens=args.max_new_tokens, max_think_tokens=args.max_think_tokens,
                      num_return_sequences=args.samples, soft_variant=name, think_end=THINK_END,
                      **warpers)


def render(result: dict) -> str:
  pr = result["probe"]
  md = [f"SmolLM2-135M-Instruct (fp32), {result['problems']} generated arithmetic word problems "
        f"(`models/datasets/arithmetic.py`, seed {result['seed']}), {result['samples']} samples "
        f"per problem, up to {result['max_new_tokens']} new tokens of which at most "
        f"{result['max_think_tokens']} soft thinking steps (end marker \"{THINK_END.strip()}\"), "
        "T = 0.6, top-k 30, top-p 0.95 for thinking and answers, 10 components per soft token, "
        "Dirichlet alpha 4, Gumbel tau 0.5; answers = last number.", "",
        f"| decoding | pass@1 | pass@{result['samples']} | mean soft steps |", "|---|---|---|---|"]
  for name, row in result["methods"].items():
    steps = "" if row.get("think_tokens") is None else f"{row['think_tokens']:.1f}"
    md.append(f"| {name} | {row['pass@1']:.3f} | {row['pass@n']:.3f} | {steps} |")
  if result.get("paired"):
    n = result["samples"]
    md += ["", f"Paired over the {result['problems']} problems, against `{BASELINE}`: pass@1 by "
           f"a sign-flip permutation test on per-problem pass@1 ({flips(result['paired'])}), "
           f"pass@{n} by McNemar's exact test (problems only this method / only "
           f"`{BASELINE}` solved in {n} samples); two-sided p-values, not corrected for the "
           "three comparisons (`benchmarks/significance.py`).", "",
           f"| decoding | pass@1 difference | p | pass@{n}: only this / only {BASELINE} | p |",
           "|---|---|---|---|---|"]
    for name, t in result["paired"].items():
      one, any_ = t["pass@1"], t["pass@n"]
      md.append(f"| {name} | {one['mean_diff']:+.3f} | {one['p']:.3f} | "
                f"{any_['only_a']} / {any_['only_b']} | {any_['p']:.4f} |")
  md += ["", f"Probe ({pr['positions']} vanilla soft-thinking positions on "
         f"{result['probe_problems']} problems): Jensen-Shannon divergence (nats) of the "
         "next-step distribution", "", "| inputs compared | mean | median |", "|---|---|---|"]
  for key, label in (("soft_top1", "soft token vs top-1 token"),
                     ("soft_top2", "soft token vs top-2 token"),
                     ("top1_top2", "top-1 token vs top-2 token")):
    md.append(f"| {label} | {pr[key]['mean']:.4f} | {pr[key]['median']:.4f} |")
  md += ["", f"Mean weight of the top-1 component: {pr['top1_weight']['mean']:.3f}.", "",
         f"`{result['command']}` ({took(result)})."]
  return "\n".join(md)


def flips(paired: dict) -> str:
  """How the permutation p-values were computed: enumerated or sampled."""
  rounds = {t["pass@1"]["rounds"] for t in paired.values()}
  if rounds == {0}:
    return "every sign assignment enumerated"
  if 0 in rounds:
    return (f"every sign assignment enumerated where at most {EXACT_MAX} problems differ, "
            f"else {max(rounds)} random ones")
  return f"{max(rounds)} random sign assignments"


def took(result: dict) -> str:
  """The invocation's wall time, and what it read back from earlier invocations (rows of a
  resumed run and the cached probe took their time in those)."""
  done = sum((result.get("resumed_rows") or {}).values())
  total = result["problems"] * len(result["methods"])
  read_back = [f"{done} of {total} method-problem rows"] if done else []
  read_back += ["the probe"] if result.get("probe_resumed") else []
  return report.invocation_time(result["seconds"], result["machine"], read_back)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--problems", type=int, default=64)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--max_new_tokens", type=int, default=160)
  ap.add_argument("--max_think_tokens", type=int, default=128)
  ap.add_argument("--probe_problems", type=int, default=48)
  ap.add_argument("--probe_steps", type=int, default=96)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=16)
  args, mesh, done = report.parse_and_start(ap, argv, out="results/soft_thinking.json",
                                            work_dir="results/rows/soft_thinking", render=render,
                                            marker=MARKER)
  if done is not None:
    return done
  model = load_model("smollm2-135m-instruct")
  tok = model.tokenizer
  probs = arithmetic.problems(max(args.problems, args.probe_problems), seed=args.seed)
  prompts = [tok.encode_chat([{"role": "user", "content": p.question + INSTRUCTION}])
             for p in probs]
  target = Target(model.lm, model.params, eos_ids=(2,), pad_id=2, tokenizer=tok,
                  name=model.name, sha256=model.sha256)
  t0 = time.time()

  defaults = SoftThinking()
  probe_key = dict(model=model.sha256, probe_problems=args.probe_problems,
                   probe_steps=args.probe_steps, seed=args.seed, batch_size=args.batch_size,
                   settings=defaults.to_flat())
  probe_out, probe_resumed = cached_probe(
      os.path.join(args.work_dir, "probe.json"), probe_key,
      lambda: run_probe(target, prompts[:args.probe_problems], defaults, args.probe_steps,
                        args.batch_size))
  print(f"probe done ({time.time() - t0:.0f}s): {probe_out}", flush=True)

  rows = [Row(i, ids, {"prompt": p.prompt, "answer": p.answer})
          for i, (ids, p) in enumerate(zip(prompts[:args.problems], probs))]
  run = dict(seed=args.seed, batch_size=args.batch_size, mesh=mesh, resources=Resources())
  methods, resumed, solved = {}, {}, {}
  for name in args.methods.split(","):
    settings = method_settings(name, args)
    output = os.path.join(args.work_dir, f"{name}.jsonl")
    resumed[name] = eval_runner.rows_done(output)
    records = eval_runner.evaluate(target, rows, settings, output, **run)
    ok, think = [], []
    for r, p in zip(records, probs):
      outs = [Generation.from_json(o) for o in r["outputs"]]
      ok.append([arithmetic.is_correct(last_number(o.extras["text"]), p) for o in outs])
      think += [o.extras.get("think_tokens", np.nan) for o in outs]
    ok = solved[name] = np.asarray(ok, bool)
    methods[name] = {"pass@1": float(ok.mean()), "pass@n": float(ok.any(axis=1).mean()),
                     "think_tokens": None if name == "sample" else float(np.mean(think))}
    print(f"{name} done ({time.time() - t0:.0f}s): {methods[name]}", flush=True)

  result = dict(model="smollm2-135m-instruct", problems=args.problems, seed=args.seed,
                samples=args.samples, max_new_tokens=args.max_new_tokens,
                max_think_tokens=args.max_think_tokens, probe_problems=args.probe_problems,
                probe_steps=args.probe_steps, prompt_suffix=INSTRUCTION, think_end=THINK_END,
                settings={n: method_settings(n, args).to_flat() for n in methods},
                probe=probe_out, methods=methods, paired=paired_tests(solved),
                resumed_rows=resumed,
                probe_resumed=probe_resumed, seconds=time.time() - t0, machine=machine_name(),
                command=" ".join(["python -m benchmarks.eval_soft_thinking"] + list(
                    sys.argv[1:] if argv is None else argv)))
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

"""Self-contrast decoding (SCMoE) of the Mixture-of-Experts SmolLM2 on arithmetic word problems.

  python -m benchmarks.eval_scmoe [--problems=128] [--maj_k=4]

On `smollm2-135m-moe` (`train.moe_distill`): greedy under top-2 (the strong routing), top-1
and rank-2-only (the weak routing) against SCMoE at beta in {0.1, 0.3, 0.5, 0.7, 0.9}
(alpha 0.1, weak expert at 0-based rank 2), and the dense parent for reference; maj@k with
sampling (T = --temperature) under top-2 and under SCMoE at beta 0.5; on held-out text (the
text corpus' test split) the perplexity under each routing and the KL divergence between the
strong and weak next-token distributions. Generations go through the evaluation harness
(`decoding.eval_runner`): JSONL per method in --work_dir, resumed on a rerun. Writes
results/scmoe_smollm2.json and the table between the markers in README.md.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from decoding import eval_runner
from decoding.answers import last_number
from decoding.eval_runner import Row
from decoding.greedy import Greedy
from decoding.results import Generation
from decoding.sampling import Sample
from decoding.scmoe import SCMoE
from decoding.strategy import Target
from models import transformer
from models.datasets import arithmetic
from models.lm import load_model
from models.moe import Routing
from train.moe_distill import expert_tokens
from train.moe_from_dense import perplexity
from train.text_data import load_text_sequences

MARKER = "scmoe"
BUILD_MARKER = "moe_build"
BUILD_RESULTS = "results/moe_smollm2-135m.json"  # written by python -m train.moe_distill
BETAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def render(result: dict) -> str:
  md = [f"`smollm2-135m-moe` (fp32), {result['problems']} generated arithmetic word problems "
        f"(seed {result['seed']}), up to {result['max_new_tokens']} new tokens, answer = last "
        f"number. SCMoE: alpha {result['alpha']}, weak routing = the expert at 0-based rank "
        f"{result['weak_rank']} alone. maj@{result['maj_k']}: {result['maj_k']} samples at "
        f"T = {result['temperature']}, majority answer, on the first {result['maj_problems']} "
        "problems (with the greedy accuracy on the same problems).", "",
        "| decoding | accuracy |", "|---|---|"]
  md += [f"| {k} | {v:.3f} |" for k, v in result["accuracy"].items()]
  md += ["", f"Held-out text ({result['text_tokens']} tokens of the text corpus' test split):",
         "", "| routing | perplexity |", "|---|---|"]
  md += [f"| {k} | {v:.2f} |" for k, v in result["perplexity"].items()]
  md += ["", f"What the routed experts of layer {result['expert_layer']} are chosen for: the "
         f"tokens (seen at least 20 times in {result['expert_tokens_seen']} held-out tokens) "
         "whose top-2 routing picks the expert most often, with that rate:", "",
         "| expert | share of top-2 slots | tokens (rate) |", "|---|---|---|"]
  for e in result["experts"]:
    toks = ", ".join(f"`{t.strip() or repr(t)}` ({r:.2f})" for t, r in zip(e["tokens"],
                                                                        e["rates"]))
    md.append(f"| {e['expert']} | {e['share'] / 2:.3f} | {toks} |")
  kl = result["kl_strong_weak"]
  md += ["", f"KL(strong top-2 || weak rank-{result['weak_rank']}) per next token on that text: "
         f"mean {kl['mean']:.3f}, median {kl['median']:.3f} nats; KL(top-2 || top-1) mean "
         f"{result['kl_strong_top1']['mean']:.3f}.",
         "", f"`{result['command']}` ({result['seconds'] / 60:.0f} min on {result['machine']})."]
  return "\n".join(md)


def render_build(build: dict) -> str:
  """The README table of the MoE construction report (`train.moe_distill`'s JSON)."""
  sz = build["sizes"]
  md = [f"{sz['shared_units']} shared units + {sz['experts']} routed experts of "
        f"{sz['expert_units']} units per layer; the delta holds {sz['delta_params']:,} values "
        f"({sz['delta_bytes'] / 1e6:.1f} MB). Distilled {build['args']['steps']} steps of "
        f"{build['args']['batch_size']} x {build['args']['seq_len']} tokens "
        f"({build['train_rows']['text']} text rows, {build['train_rows']['arithmetic']} "
        f"arithmetic rows), {build['seconds'] / 60:.0f} min in all. Held-out perplexity "
        f"(the text corpus' test split, {build['args']['eval_windows']} x "
        f"{build['args']['seq_len']} tokens); top-2 before distillation: "
        f"{build['untrained_top_k_perplexity']:.2f}.", "",
        "| routing | perplexity |", "|---|---|"]
  md += [f"| {r['routing']} | {r['perplexity']:.2f} |" for r in build["perplexity"]]
  md += ["", f"`{build['command']}`; table: `python -m benchmarks.eval_scmoe --render_only`."]
  return "\n".join(md)


def write_build_table(readme: str) -> None:
  if readme and os.path.exists(BUILD_RESULTS):
    with open(BUILD_RESULTS) as f:
      report.write_table(readme, render_build(json.load(f)), BUILD_MARKER, None)


def next_token_kl(params, config, rows: np.ndarray, a: Routing, b: Routing,
                  batch: int = 4) -> np.ndarray:
  """KL(p_a || p_b) [N * (S - 1)] of the next-token distributions of two routings of one
  MoE model at every position of `rows` [N, S] but the last (cache-free passes)."""
  def logp(routing, t):
    cfg = config.replace(moe_routing=routing)
    pos = jnp.broadcast_to(jnp.arange(t.shape[1])[None], t.shape)
    out = transformer.forward(params, cfg, t, pos, None).logits[:, :-1]
    return jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)

  @jax.jit
  def kl(t):
    la, lb = logp(a, t), logp(b, t)
    return jnp.sum(jnp.exp(la) * (la - lb), axis=-1).reshape(-1)

  return np.concatenate([np.asarray(kl(jnp.asarray(rows[i:i + batch])))
                         for i in range(0, len(rows), batch)])


def majority_correct(groups: list[list[Generation]], probs, text) -> float:
  ok = []
  for cands, p in zip(groups, probs):
    answers = [a for a in (last_number(text(c)) for c in cands) if a is not None]
    best = collections.Counter(answers).most_common(1)[0][0] if answers else None
    ok.append(arithmetic.is_correct(best, p))
  return float(np.mean(ok))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--problems", type=int, default=128)
  ap.add_argument("--max_new_tokens", type=int, default=160)
  ap.add_argument("--maj_k", type=int, default=4)
  ap.add_argument("--maj_problems", type=int, default=64)  # the first ones: sampling costs k x
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--alpha", type=float, default=0.1)
  ap.add_argument("--weak_rank", type=int, default=2)
  ap.add_argument("--text_windows", type=int, default=16)
  ap.add_argument("--expert_windows", type=int, default=64)
  ap.add_argument("--expert_layer", type=int, default=15)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=16)
  args, mesh, done = report.parse_and_start(ap, argv, out="results/scmoe_smollm2.json",
                                            work_dir="runs/eval_scmoe", render=render,
                                            marker=MARKER)
  if done is not None:
    write_build_table(args.readme)
    return done
  write_build_table(args.readme)
  t0 = time.time()
  moe_model = load_model("smollm2-135m-moe")
  dense = load_model("smollm2-135m-instruct")
  tok = moe_model.tokenizer
  probs = arithmetic.problems(args.problems, seed=args.seed)
  rows = [Row(i, tok.encode_chat([{"role": "user", "content": p.prompt}]),
              {"prompt": p.prompt, "answer": p.answer}) for i, p in enumerate(probs)]
  text = lambda g: tok.decode(g.output_ids, skip_special_tokens=True)
  path = lambda name: os.path.join(args.work_dir, f"{name}.jsonl")

  def evaluate(model, routing, settings, name, count=None):
    lm = model.lm
    if routing is not None:
      lm = dataclasses.replace(lm, config=lm.config.replace(moe_routing=routing))
    target, _ = eval_runner.place(Target(lm, model.params, eos_ids=(2,), pad_id=2,
                                         tokenizer=tok), *mesh)
    out = eval_runner.evaluate(target, rows[:count], settings, path(name), seed=args.seed,
                               batch_size=args.batch_size, mesh=mesh)
    return [[Generation.from_json(o) for o in r["outputs"]] for r in out]

  greedy = Greedy(max_new_tokens=args.max_new_tokens)
  accuracy = {}

  def record(label, groups):
    accuracy[label] = float(np.mean([arithmetic.is_correct(last_number(text(g[0])), p)
                                     for g, p in zip(groups, probs)]))
    print(f"{label}: {accuracy[label]:.3f} ({time.time() - t0:.0f} s)", flush=True)

  record("dense parent, greedy", evaluate(dense, None, greedy, "dense_greedy"))
  for label, routing, name in (("MoE top-2 (strong), greedy", Routing("top_k", 2), "top2"),
                               ("MoE top-1, greedy", Routing("top_k", 1), "top1"),
                               (f"MoE rank-{args.weak_rank} only (weak), greedy",
                                Routing("rank_k", args.weak_rank), "weak")):
    record(label, evaluate(moe_model, routing, greedy, name))
  for beta in BETAS:
    s = SCMoE(max_new_tokens=args.max_new_tokens, scmoe_beta=beta, scmoe_alpha=args.alpha,
              scmoe_weak_rank=args.weak_rank)
    record(f"SCMoE beta={beta}, greedy", evaluate(moe_model, None, s, f"scmoe_{beta}"))
  if args.maj_k:
    sample = Sample(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    num_return_sequences=args.maj_k)
    n = min(args.maj_problems, args.problems)
    groups = evaluate(moe_model, Routing("top_k", 2), sample, f"top2_sample{args.maj_k}", n)
    accuracy[f"MoE top-2, maj@{args.maj_k} (first {n})"] = majority_correct(groups, probs, text)
    s = SCMoE(max_new_tokens=args.max_new_tokens, scmoe_beta=0.5, scmoe_alpha=args.alpha,
              scmoe_weak_rank=args.weak_rank, do_sample=True, temperature=args.temperature,
              num_return_sequences=args.maj_k)
    groups = evaluate(moe_model, None, s, f"scmoe_0.5_sample{args.maj_k}", n)
    accuracy[f"SCMoE beta=0.5, maj@{args.maj_k} (first {n})"] = majority_correct(groups, probs,
                                                                                 text)
    for label, routing, name in (("MoE top-2", Routing("top_k", 2), "top2"),
                                 ("SCMoE beta=0.5", None, "scmoe_0.5")):
      greedy_n = evaluate(moe_model, routing, greedy if routing else SCMoE(
          max_new_tokens=args.max_new_tokens, scmoe_beta=0.5, scmoe_alpha=args.alpha,
          scmoe_weak_rank=args.weak_rank), name)[:n]
      accuracy[f"{label}, greedy (first {n})"] = float(np.mean(
          [arithmetic.is_correct(last_number(text(g[0])), p) for g, p in zip(greedy_n, probs)]))
    print(accuracy, flush=True)

  test = load_text_sequences("test", tok, 256, max_sequences=args.text_windows)
  cfg = moe_model.lm.config
  ppl = {"dense parent": perplexity(dense.params, dense.lm.config, test)}
  for label, routing in (("top-2 (strong)", Routing("top_k", 2)), ("top-1", Routing("top_k", 1)),
                         (f"rank-{args.weak_rank} only (weak)", Routing("rank_k", args.weak_rank))):
    ppl[label] = perplexity(moe_model.params, cfg.replace(moe_routing=routing), test)
  kl_weak = next_token_kl(moe_model.params, cfg, test, Routing("top_k", 2),
                          Routing("rank_k", args.weak_rank))
  kl_top1 = next_token_kl(moe_model.params, cfg, test, Routing("top_k", 2), Routing("top_k", 1))
  expert_rows = load_text_sequences("test", tok, 256, max_sequences=args.expert_windows)
  experts = expert_tokens(moe_model, expert_rows, args.expert_layer)
  result = dict(model="smollm2-135m-moe", problems=args.problems, seed=args.seed,
                max_new_tokens=args.max_new_tokens, alpha=args.alpha, weak_rank=args.weak_rank,
                maj_k=args.maj_k, maj_problems=min(args.maj_problems, args.problems),
                temperature=args.temperature, accuracy=accuracy,
                perplexity=ppl, text_tokens=int(test.size), experts=experts,
                expert_layer=args.expert_layer, expert_tokens_seen=int(expert_rows.size),
                kl_strong_weak={"mean": float(kl_weak.mean()), "median": float(np.median(kl_weak))},
                kl_strong_top1={"mean": float(kl_top1.mean()),
                                "median": float(np.median(kl_top1))},
                seconds=time.time() - t0, machine=machine_name(),
                command=" ".join(["python -m benchmarks.eval_scmoe"] + list(
                    sys.argv[1:] if argv is None else argv)))
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

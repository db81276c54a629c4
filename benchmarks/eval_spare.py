"""SPARE process supervision on the arithmetic word problems, with SmolLM2-135M-Instruct.

  python -m benchmarks.eval_spare [--train_problems=64] [--solutions=8] [--eval_problems=64] \
      [--n=16] [--annotate=48] [--mc_k=4] [--prm_steps=150] [--work_dir=results/rows/spare]

After "SPARE: Single-Pass Annotation with Reference-Guided Evaluation for Automatic Process
Supervision and Reward Modelling" (Rizvi, Zhu, Gurevych 2025), at our scale:

1. the policy: SmolLM2 after a short supervised LoRA warm-up (as the paper's QLoRA SFT) on
   the training problems' reference solutions written as numbered steps, `[1] .. [k] The
   answer is N.`; it samples `--solutions` solutions per training problem and `--n` per
   held-out problem at temperature 1;
2. annotation of the training solutions' steps, scored against the problem generator's gold
   step labels (`arithmetic.gold_step_labels`): the rule-based single-pass grader
   (`decoding.process_supervision.grade_with_reference`, no model tokens), the same grading
   asked of a language model (SmolLM2 itself, greedy, on the first --annotate solutions;
   steps it leaves out count as incorrect, as in the reference code) and Monte-Carlo rollouts
   (--mc_k continuations per step with the policy, on the same solutions), with the tokens
   each spends;
3. a process reward model (SmolLM2 + LoRA, step tags, `train.prm`) trained on the rule
   grader's labels (last step = outcome, the reference solutions added as all-correct,
   solutions balanced by outcome) and an outcome reward model (one tag at the end, the
   outcome) on the same solutions;
4. best-of-N on the held-out problems for N = 4, 8, --n: the PRM's min, product and last
   step score, the ORM, majority vote and self-certainty (`decoding.best_of_n`), with
   random choice and the oracle as bounds; the PRM's AUROC on held-out step correctness.

Every stage's output is cached in --work_dir and reused on rerun. Writes
results/spare_smollm2.json and the README table between `<!-- spare:start -->` and
`<!-- spare:end -->`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import jax
import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from decoding import best_of_n, process_reward, process_supervision as ps
from decoding.answers import last_number
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.sampling import Sample
from decoding.scoring import auroc
from decoding.strategy import Target
from models.datasets import arithmetic
from models.lm import load_model
from train import losses, lora, optim, prm
from train import trainer as trainer_lib

MARKER = "spare"
MODEL = "smollm2-135m-instruct"
SUFFIX = (" Solve it in numbered steps [1], [2], ... with one calculation per step, and end "
          "with 'The answer is N.'")
SELECTORS = ("prm_min", "prm_product", "prm_last", "orm", "majority", "self_certainty")


def reference_steps(p: arithmetic.Problem) -> list[str]:
  return [s.text for s in p.solution] + [f"The answer is {p.answer}."]


def is_right(text: str, p: arithmetic.Problem) -> bool:
  return arithmetic.is_correct(last_number(text), p)


def problem_sets(n_train: int, n_eval: int, seed: int):
  """Training and held-out problems, disjoint, and neither among the reasoning evaluations'."""
  taken = {p.question for p in arithmetic.problems(512, seed=0)}
  train, held = [], []
  for p in arithmetic.problems(4 * (n_train + n_eval), seed=seed + 101):
    if p.question in taken:
      continue
    taken.add(p.question)
    (train if len(train) < n_train else held).append(p)
    if len(held) == n_eval:
      break
  return train, held


def cached(path: str, make, log: dict):
  """Reads the stage's output from `path`, or computes and writes it; `log` records, per
  stage, the seconds it took here or None when an earlier run's cache was reused (the run
  then reports only the time of the stages it computed)."""
  stage = os.path.splitext(os.path.basename(path))[0]
  if os.path.exists(path):
    log[stage] = None
    with open(path) as f:
      return json.load(f)
  t0 = time.time()
  value = make()
  with open(path, "w") as f:
    json.dump(value, f)
  log[stage] = time.time() - t0
  return value


def warm_policy(model, prompts, problems, args):
  """LoRA warm-up on the numbered reference solutions; returns merged parameters."""
  tok = model.tokenizer
  eos = tok.eos_id
  seqs = [p + tok.encode(ps.number_steps(reference_steps(q)), add_special_tokens=False) + [eos]
          for p, q in zip(prompts, problems)]
  W = max(len(s) for s in seqs)
  tokens = np.full((len(seqs), W), tok.pad_id or 0, np.int32)
  mask = np.zeros((len(seqs), W), np.float32)
  for i, (s, p) in enumerate(zip(seqs, prompts)):
    tokens[i, :len(s)], mask[i, len(p):len(s)] = s, 1.0
  adapters = lora.init(model.params, jax.random.PRNGKey(args.seed), 16)
  assemble = lambda t, f: lora.merge(f, t, 32.0, 16)
  opt = optim.make_optimizer({"name": "adamw", "learning_rate": 2e-4, "grad_clip": 1.0},
                             args.warmup_steps)
  trained = trainer_lib.fit_rows(losses.next_token_loss(model.config), opt, adapters,
                                 model.params, {"tokens": tokens, "loss_mask": mask},
                                 steps=args.warmup_steps, batch_size=8, seed=args.seed,
                                 assemble=assemble, salt=31)
  return assemble(trained, model.params)


def sample_solutions(target, prompts, problems, n: int, args, seed: int) -> list[list[dict]]:
  settings = Sample(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                    num_return_sequences=n)
  gens = generate(target, prompts, settings, seed=seed, batch_size=args.batch_size)
  tok = target.tokenizer
  out = []
  for i, p in enumerate(problems):
    rows = []
    for g in gens[i * n:(i + 1) * n]:
      text = tok.decode(g.output_ids, skip_special_tokens=True)
      rows.append({"text": text, "steps": ps.split_steps(text), "right": is_right(text, p),
                   "self_certainty": g.self_certainty, "tokens": len(g.output_ids)})
    out.append(rows)
  return out


def label_accuracy(pred: list[list[bool]], gold: list[list[bool]]) -> dict:
  flat_p = [x for ps_ in pred for x in ps_]
  flat_g = [x for gs in gold for x in gs]
  tp = sum(p and g for p, g in zip(flat_p, flat_g))
  wrong = [not g for g in flat_g]
  caught = sum((not p) and w for p, w in zip(flat_p, wrong))
  return {"steps": len(flat_g), "accuracy": float(np.mean([p == g for p, g in zip(flat_p, flat_g)])),
          "correct_recall": tp / max(1, sum(flat_g)), "error_recall": caught / max(1, sum(wrong))}


def tagged(tok, prompt, steps, fmt, outcome_only=False):
  pieces = [tok.encode(f"[{i}] {s}\n", add_special_tokens=False) for i, s in enumerate(steps, 1)]
  if outcome_only:
    pieces = [[t for piece in pieces for t in piece]]
  return process_reward.tagged_sequence(prompt, pieces, fmt.tag_id)


def select(cands: list[dict], how: str) -> int:
  """The chosen solution: majority vote and self-certainty as `decoding.best_of_n` selects
  (ties by self-certainty), the reward models by their highest score."""
  if how in ("majority", "self_certainty"):
    shells = [types.SimpleNamespace(self_certainty=c["self_certainty"]) for c in cands]
    return best_of_n.select(shells, how, [last_number(c["text"]) for c in cands])[0]
  key = {"prm_min": "min", "prm_product": "product", "prm_last": "last"}.get(how)
  scores = [process_reward.aggregate(c["prm"], key) if key else c["orm"] for c in cands]
  return int(np.argmax(scores))


def render(result: dict) -> str:
  a = result["annotation"]
  md = [f"SmolLM2-135M-Instruct after a {result['warmup_steps']}-step LoRA warm-up on numbered "
        f"reference solutions; {result['train_problems']} training problems x "
        f"{result['solutions']} sampled solutions, {result['eval_problems']} held-out problems "
        f"x {result['n']}. Step labels against the generator's gold labels "
        f"({a['rule']['steps']} steps of all training solutions for the rule grader; the "
        f"first {result['annotate']} solutions for all three):", "",
        "| annotation | steps | accuracy | correct steps kept | wrong steps caught | model "
        "tokens |", "|---|---|---|---|---|---|"]
  for name in ("rule", "rule_subset", "llm", "monte_carlo"):
    m = a[name]
    md.append(f"| {name.replace('_', ' ')} | {m['steps']} | {m['accuracy']:.3f} | "
              f"{m['correct_recall']:.3f} | {m['error_recall']:.3f} | {m.get('tokens', 0)} |")
  md += ["", f"PRM AUROC on held-out step correctness: {result['prm_auroc']:.3f} "
         f"({result['prm_auroc_steps']} steps); ORM AUROC on held-out outcomes: "
         f"{result['orm_auroc']:.3f}.", "",
         "| N | random | " + " | ".join(SELECTORS) + " | oracle |",
         "|---|---|" + "---|" * len(SELECTORS) + "---|"]
  for n, row in result["best_of_n"].items():
    md.append(f"| {n} | {row['random']:.3f} | " + " | ".join(f"{row[s]:.3f}" for s in SELECTORS)
              + f" | {row['oracle']:.3f} |")
  stages = result.get("stage_seconds", {})
  reused = [k for k, v in stages.items() if v is None]
  when = f"{result['seconds'] / 60:.0f} min on {result['machine']}"
  if reused:  # a resumed run: its time covers only the stages it computed
    when += (", computing " + (", ".join(f"{k} {v / 60:.0f} min" for k, v in stages.items()
                                         if v is not None) or "no stage")
             + "; reused from earlier runs' cache: " + ", ".join(reused))
  md += ["", f"`{result['command']}` ({when})."]
  return "\n".join(md)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--train_problems", type=int, default=64)
  ap.add_argument("--solutions", type=int, default=8)
  ap.add_argument("--eval_problems", type=int, default=64)
  ap.add_argument("--n", type=int, default=16)
  ap.add_argument("--annotate", type=int, default=48,
                  help="training solutions also graded by the LM and by rollouts")
  ap.add_argument("--mc_k", type=int, default=4)
  ap.add_argument("--warmup_steps", type=int, default=24)
  ap.add_argument("--prm_steps", type=int, default=150)
  ap.add_argument("--max_new_tokens", type=int, default=96)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--work_dir", default="results/rows/spare")
  report.add_output_args(ap, "results/spare_smollm2.json")
  args = ap.parse_args(argv)
  done = report.render_only(args, render, MARKER)
  if done is not None:
    return done
  if args.n < 4 or args.solutions < 1 or args.annotate < 1:
    ap.error("--n must be >= 4, --solutions and --annotate >= 1")
  os.makedirs(args.work_dir, exist_ok=True)
  t0 = time.time()
  # LoRA adapts the separate q/k/v/o and gate/up/down projections (the training layout)
  model = load_model(MODEL, scan_layers=True, fused_projections=False)
  tok = model.tokenizer
  base = Target.of(model)
  train, held = problem_sets(args.train_problems, args.eval_problems, args.seed)
  encode = lambda p: tok.encode_chat([{"role": "user", "content": p.question + SUFFIX}])
  train_prompts, held_prompts = [encode(p) for p in train], [encode(p) for p in held]
  path = lambda name: os.path.join(args.work_dir, name)
  policy = None
  stages: dict[str, float | None] = {}  # stage -> seconds computed here, None if cached

  def policy_target():
    nonlocal policy
    if policy is None:
      policy = Target(base.lm, warm_policy(model, train_prompts, train, args), base.eos_ids,
                      base.pad_id, tok)
    return policy

  train_sols = cached(path("train_solutions.json"), lambda: sample_solutions(
      policy_target(), train_prompts, train, args.solutions, args, args.seed), stages)
  held_sols = cached(path("held_solutions.json"), lambda: sample_solutions(
      policy_target(), held_prompts, held, args.n, args, args.seed + 1), stages)

  # ---- annotation
  flat = [(i, s) for i, sols in enumerate(train_sols) for s in sols if s["steps"]]
  gold = [arithmetic.gold_step_labels(train[i], s["steps"]) for i, s in flat]
  rule = [[g.label for g in ps.grade_with_reference(train[i].question,
                                                    [x.text for x in train[i].solution],
                                                    s["steps"])] for i, s in flat]
  sub = list(range(min(args.annotate, len(flat))))

  def llm_grades():
    prompts = [tok.encode_chat([{"role": "user", "content": ps.grader_prompt(
        train[flat[k][0]].question, reference_steps(train[flat[k][0]]), flat[k][1]["steps"])}])
        for k in sub]
    gens = generate(base, prompts, Greedy(max_new_tokens=256), batch_size=8)
    return {"labels": [[bool(x) for x in ps.parse_grades(
                tok.decode(g.output_ids, skip_special_tokens=True), len(flat[k][1]["steps"]))]
                for k, g in zip(sub, gens)],
            "tokens": sum(len(p) + len(g.output_ids) for p, g in zip(prompts, gens))}

  def mc_grades():
    labels, tokens = [], 0
    for k in sub:
      i, s = flat[k]
      r = ps.rollout_labels(policy_target(), train_prompts[i], s["steps"],
                            lambda text, p=train[i]: is_right(text, p), k=args.mc_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed + k)
      labels.append(r.labels)
      tokens += r.generated_tokens + r.context_tokens
    return {"labels": labels, "tokens": tokens}

  llm = cached(path("llm_grades.json"), llm_grades, stages)
  mc = cached(path("mc_grades.json"), mc_grades, stages)
  sub_gold = [gold[k] for k in sub]
  annotation = {"rule": label_accuracy(rule, gold),
                "rule_subset": label_accuracy([rule[k] for k in sub], sub_gold),
                "llm": dict(label_accuracy(llm["labels"], sub_gold), tokens=llm["tokens"]),
                "monte_carlo": dict(label_accuracy(mc["labels"], sub_gold), tokens=mc["tokens"])}

  # ---- reward models
  fmt = process_reward.TagFormat.for_tokenizer(tok)

  right = [k for k, (i, s) in enumerate(flat) if s["right"]]
  wrong = [k for k, (i, s) in enumerate(flat) if not s["right"]]
  m = min(len(right), len(wrong)) or max(len(right), len(wrong))
  keep = right[:m] + wrong[:m]  # balanced by outcome
  seqs = [tagged(tok, train_prompts[flat[k][0]], flat[k][1]["steps"], fmt) for k in keep]
  targets = [ps.step_targets(rule[k], flat[k][1]["right"]) for k in keep]
  seqs += [tagged(tok, train_prompts[i], reference_steps(p), fmt) for i, p in enumerate(train)]
  targets += [[1] * len(reference_steps(p)) for p in train]
  orm_seqs = [tagged(tok, train_prompts[flat[k][0]], flat[k][1]["steps"], fmt, True)
              for k in keep]
  orm_targets = [[int(flat[k][1]["right"])] for k in keep]
  held_flat = [(i, s) for i, sols in enumerate(held_sols) for s in sols]

  def reward_scores(sq, tg, only: bool) -> list[list[float]]:
    """Trains one reward model (PRM: a tag per step; ORM, `only`: one tag at the end) and
    scores every held-out solution with it."""
    length = max(len(t) for t, _ in sq)
    rows = prm.prm_rows(sq, tg, tok.pad_id or 0, length=-(-length // 64) * 64)
    params = prm.train_prm(model.config, model.params, rows, fmt, steps=args.prm_steps,
                           batch_size=8, learning_rate=2e-4, lora_rank=16, seed=args.seed)
    return process_reward.step_scores(
        model.lm, params, [tagged(tok, held_prompts[i], s["steps"] or [s["text"]], fmt, only)
                           for i, s in held_flat], fmt, tok.pad_id or 0, batch_size=8)

  # each reward model is its own cached stage (each takes tens of minutes on two CPU cores)
  scores = {"prm": cached(path("prm_scores.json"), lambda: reward_scores(seqs, targets, False),
                        stages),
            "orm": cached(path("orm_scores.json"), lambda: reward_scores(orm_seqs, orm_targets,
                                                                          True), stages),
            "prm_train_solutions": len(seqs)}
  k = 0
  for sols in held_sols:
    for s in sols:
      s["prm"], s["orm"] = scores["prm"][k], scores["orm"][k][-1]
      k += 1
  step_s, step_l = [], []
  for i, sols in enumerate(held_sols):
    for s in sols:
      if s["steps"]:
        step_s += s["prm"][:len(s["steps"])]
        step_l += arithmetic.gold_step_labels(held[i], s["steps"])
  outcomes = [s["right"] for sols in held_sols for s in sols]
  best = {}
  for n in sorted({x for x in (4, 8, args.n) if x <= args.n}):
    row = {"random": float(np.mean([np.mean([c["right"] for c in sols[:n]]) for sols in held_sols])),
           "oracle": float(np.mean([any(c["right"] for c in sols[:n]) for sols in held_sols]))}
    for how in SELECTORS:
      row[how] = float(np.mean([sols[:n][select(sols[:n], how)]["right"] for sols in held_sols]))
    best[n] = row
  result = dict(model=MODEL, warmup_steps=args.warmup_steps, train_problems=len(train),
                solutions=args.solutions, eval_problems=len(held), n=args.n,
                annotate=len(sub), mc_k=args.mc_k, prm_steps=args.prm_steps,
                train_outcome_accuracy=float(np.mean([s["right"] for _, s in flat])),
                held_outcome_accuracy=float(np.mean(outcomes)),
                annotation=annotation,
                prm_train_solutions=scores["prm_train_solutions"],
                prm_auroc=auroc(step_s, step_l), prm_auroc_steps=len(step_l),
                orm_auroc=auroc([s["orm"] for sols in held_sols for s in sols], outcomes),
                best_of_n=best, seconds=time.time() - t0, stage_seconds=stages, machine=machine_name(),
                command=" ".join(["python -m benchmarks.eval_spare"] + list(
                    sys.argv[1:] if argv is None else argv)))
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

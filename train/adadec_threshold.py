"""Learns AdaDec's entropy threshold tau for one model, as the paper's reference code does.

"Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance" (He et al.,
arXiv 2506.08980): AdaDec decodes greedily and pauses to rerank the top candidates by a
short lookahead only at steps whose next-token entropy H (natural log, full vocabulary, raw
logits) is at least a per-model threshold tau. tau is learned offline:

1. Teacher-force code with a known continuation and record, at every continuation token,
   H of the model's next-token distribution and whether the true token is the model's
   rank-1 (argmax) token.
2. Fit a 1-D logistic regression P(rank1 | H) = sigmoid(w H + b) on a class-balanced
   training set (the majority class subsampled to the minority's size), by Newton's method
   (iteratively reweighted least squares; closed-form 2x2 steps).
3. Sweep p in 0.01, 0.02, ..., 0.99 and keep the p* whose rule "rank1 iff
   sigmoid(w H + b) >= p" is most accurate on the held-out split, left unbalanced (ties:
   the smallest p).
4. tau = (logit(p*) - b) / w. With w < 0 (higher entropy, less often rank 1), the rule
   predicts "not rank 1" exactly when H >= tau: the steps where AdaDec looks ahead.

Data (`train.code_corpus`): documented functions from the Python standard library as
Debian's packages install it (/usr/lib/python3.X/*.py), prompt = decorators + signature +
docstring, continuation = the body, both as plain text with no chat template (the base
completion format of HumanEval, whose problems stay unseen). The reference fitted on
BigCodeBench prompts with canonical solutions; any real code disjoint from the evaluation
set serves. The functions are shuffled (seeded); those whose prompt is longer than
`--max_prompt_tokens` are skipped, continuations are cut to `--max_continuation_tokens`.
The train / held-out split (80 / 20) is by function, not by step, so the held-out steps
come from functions the fit never saw.

Also reported: Spearman's rho between H and the true token's rank (a cheap check that
entropy tracks how wrong greedy would be) and the share of teacher-forced steps with
H >= tau (how often AdaDec would look ahead on code like this; 11.5% for the reference's
Qwen3-0.6B statistics).

  python -m train.adadec_threshold --model qwen2.5-coder-0.5b-instruct
  python -m train.adadec_threshold --model smollm2-135m-instruct --functions 40

writes results/adadec_threshold_<model>.json (w, b, p*, tau, counts, rho, the data and the
command). The defaults (320 functions, prompts up to 256 tokens, up to 128 body tokens each:
about 23,000 steps) are sized for roughly 10-15 minutes on 2 CPU cores with
Qwen2.5-Coder-0.5B and about 5 with SmolLM2-135M (extrapolated from shorter runs on a shared
machine: 24 functions x 64 tokens took 74 s with Qwen, 40 x 128 took 57 s with SmolLM2,
model loading and compiles included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from decoding.lengths import bucket
from decoding.scoring import score_tokens
from models import install, registry
from models.lm import load_model
from train import code_corpus

DEFAULT_OUT = "results/adadec_threshold_{model}.json"
P_GRID = tuple(round(0.01 * i, 2) for i in range(1, 100))
HELDOUT_FRACTION = 0.2
# Per-batch budget for the fp32 logits the scoring pass materializes ([B, C, V]): sets the
# automatic batch size (Qwen2.5's 151,936-token vocabulary makes a row of 128 positions 78 MB).
LOGITS_BUDGET_BYTES = 512 << 20


class ThresholdError(ValueError):
  """A bad argument or input, reported in one line before any model is loaded."""


# ----------------------------------------------------------------------------- the fit


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def logit(p):
  p = np.asarray(p, np.float64)
  return np.log(p) - np.log1p(-p)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 0.0, max_iter: int = 100,
                 tol: float = 1e-10) -> tuple[float, float]:
  """(w, b) maximizing sum_i log P(y_i | x_i) - l2/2 w^2 for P(y=1 | x) = sigmoid(w x + b).

  Newton's method (IRLS) in float64: each step solves the 2x2 system H d = g of the
  log-likelihood's Hessian and gradient. Raises ThresholdError when a class is empty or the
  classes are separable (the maximum is at infinity)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape or x.size == 0:
    raise ThresholdError(f"need equal-length 1-D x and y, got shapes {x.shape}, {y.shape}")
  if y.min() == y.max():
    raise ThresholdError("the logistic fit needs examples of both classes")
  X = np.stack([x, np.ones_like(x)], axis=1)
  theta = np.zeros(2)
  reg = np.diag([l2, 0.0])
  for _ in range(max_iter):
    p = sigmoid(X @ theta)
    grad = X.T @ (y - p) - reg @ theta
    s = p * (1 - p)
    hess = (X * s[:, None]).T @ X + reg
    try:
      step = np.linalg.solve(hess, grad)
    except np.linalg.LinAlgError:  # every p at 0 or 1: the classes are separated
      step = np.full(2, np.inf)
    theta = theta + step
    if np.max(np.abs(step)) < tol * (1 + np.max(np.abs(theta))):
      break
    if not np.all(np.isfinite(theta)) or np.max(np.abs(theta)) > 1e6:
      raise ThresholdError("the classes are separable by entropy: the logistic fit diverges")
  return float(theta[0]), float(theta[1])


def balanced_indices(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Indices of a class-balanced subset: every minority example and as many majority
  examples drawn without replacement (sorted)."""
  y = np.asarray(y, bool)
  pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
  n = min(pos.size, neg.size)
  keep = [rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]
  return np.sort(np.concatenate(keep))


def choose_probability(w: float, b: float, x: np.ndarray, y: np.ndarray,
                       grid: Sequence[float] = P_GRID) -> tuple[float, float]:
  """(p*, its accuracy): the p of `grid` whose rule "rank1 iff sigmoid(w x + b) >= p" is most
  accurate on (x, y); the first such p on ties."""
  prob = sigmoid(w * np.asarray(x, np.float64) + b)
  y = np.asarray(y, bool)
  acc = np.array([np.mean((prob >= p) == y) for p in grid])
  i = int(np.argmax(acc))
  return float(grid[i]), float(acc[i])


def threshold(w: float, b: float, p: float) -> float:
  """tau with sigmoid(w tau + b) = p: the entropy at which the fitted P(rank1) crosses p."""
  if w >= 0:
    raise ThresholdError(f"w = {w:.4g} >= 0: on this data higher entropy does not make the "
                         "true token less likely to be rank 1, so no entropy threshold separates "
                         "the steps to look ahead at")
  return float((logit(p) - b) / w)


def fit_threshold(entropy: Sequence[np.ndarray], rank: Sequence[np.ndarray], seed: int = 0,
                  heldout_fraction: float = HELDOUT_FRACTION) -> dict:
  """The whole fit from per-function arrays of step entropies and true-token ranks (0 = the
  argmax): split by function, balance the training steps, fit, choose p*, convert to tau,
  and the diagnostics. Returns a JSON-able dict."""
  n = len(entropy)
  if n != len(rank) or n < 2:
    raise ThresholdError(f"need at least 2 functions with equal-length statistics, got {n}")
  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  n_held = min(max(1, int(round(heldout_fraction * n))), n - 1)
  held, train = order[:n_held], order[n_held:]
  cat = lambda arrs, idx: np.concatenate([np.asarray(arrs[i], np.float64) for i in idx])
  h_train, r_train = cat(entropy, train), cat(rank, train)
  h_held, r_held = cat(entropy, held), cat(rank, held)
  y_train, y_held = r_train == 0, r_held == 0
  keep = balanced_indices(y_train, rng)
  w, b = fit_logistic(h_train[keep], y_train[keep])
  p_star, accuracy = choose_probability(w, b, h_held, y_held)
  tau = threshold(w, b, p_star)
  h_all, r_all = cat(entropy, range(n)), cat(rank, range(n))
  rho = scipy.stats.spearmanr(h_all, r_all)
  return {
      "w": w, "b": b, "p_star": p_star, "tau": tau,
      "heldout_accuracy": accuracy,
      "heldout_majority_accuracy": float(max(y_held.mean(), 1 - y_held.mean())),
      "spearman_rho_entropy_rank": float(rho.statistic),
      "spearman_pvalue": float(rho.pvalue),
      "share_steps_entropy_at_least_tau": float(np.mean(h_all >= tau)),
      "share_heldout_steps_entropy_at_least_tau": float(np.mean(h_held >= tau)),
      "counts": {
          "functions": n, "train_functions": int(train.size), "heldout_functions": int(n_held),
          "steps": int(h_all.size), "rank1_steps": int(np.sum(r_all == 0)),
          "train_steps": int(h_train.size), "train_rank1_steps": int(y_train.sum()),
          "balanced_train_steps": int(keep.size),
          "heldout_steps": int(h_held.size), "heldout_rank1_steps": int(y_held.sum()),
      },
      "mean_entropy": float(h_all.mean()),
  }


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """One function as token ids: the prompt, and its body cut to the continuation budget."""
  example: code_corpus.FunctionExample
  prompt_ids: list[int]
  continuation_ids: list[int]
  truncated: bool


def tokenize(tokenizer, examples: Sequence[code_corpus.FunctionExample], num_functions: int,
             max_prompt_tokens: int, max_continuation_tokens: int) -> list[Tokenized]:
  """The first `num_functions` examples whose prompt fits in `max_prompt_tokens`. Prompt and
  body are tokenized separately, as a generation would see them (the prompt encoded with the
  model's special tokens, the body as the model's own tokens after it)."""
  out = []
  for ex in examples:
    if len(out) == num_functions:
      break
    p = tokenizer.encode(ex.prompt)
    if not p or len(p) > max_prompt_tokens:
      continue
    c = tokenizer.encode(ex.continuation, add_special_tokens=False)
    if not c:
      continue
    out.append(Tokenized(ex, p, c[:max_continuation_tokens], len(c) > max_continuation_tokens))
  return out


def auto_batch_size(vocab_size: int, num_positions: int) -> int:
  """Rows per scoring batch: the fp32 logits of a batch within LOGITS_BUDGET_BYTES, 1..16."""
  return int(min(16, max(1, LOGITS_BUDGET_BYTES // (4 * vocab_size * num_positions))))


def teacher_force(lm, params, prompts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]], *, batch_size: int = 0,
                  pad_id: int = 0, progress: bool = False
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per continuation: the entropy of the raw next-token distribution at each of its tokens
  (fp32, natural log) and the rank of the true token among the logits (0 = argmax).

  One causal pass per batch of prompt + continuation (`decoding.scoring.score_tokens`, no KV
  cache): the logits at position |prompt| - 1 + t predict continuation token t. Rows are
  sorted by length so a batch pads little; the number of scored positions is fixed
  (bucketed longest continuation) and the sequence length bucketed, so only a few shapes
  compile. batch_size 0: `auto_batch_size`."""
  if len(prompts) != len(continuations) or not prompts:
    raise ThresholdError(f"{len(prompts)} prompts for {len(continuations)} continuations")
  C = bucket(max(len(c) for c in continuations))
  B = batch_size or auto_batch_size(lm.vocab_size, C)
  total = [len(p) + len(c) for p, c in zip(prompts, continuations)]
  if max(total) > lm.max_positions:
    raise ThresholdError(f"a prompt + continuation of {max(total)} tokens exceeds the model's "
                         f"context of {lm.max_positions}")
  order = np.argsort(total, kind="stable")
  entropy: list[Optional[np.ndarray]] = [None] * len(prompts)
  rank: list[Optional[np.ndarray]] = [None] * len(prompts)
  t0 = time.time()
  for start in range(0, len(order), B):
    rows = order[start:start + B]
    T = min(bucket(max(total[i] for i in rows)), lm.max_positions)  # >= every row's length
    tokens = np.full((B, T), pad_id, np.int32)
    plen, clen = np.ones((B,), np.int32), np.zeros((B,), np.int32)
    for j, i in enumerate(rows):
      p, c = prompts[i], continuations[i]
      tokens[j, :len(p)], tokens[j, len(p):len(p) + len(c)] = p, c
      plen[j], clen[j] = len(p), len(c)
    stats = jax.device_get(score_tokens(lm, params, jnp.asarray(tokens), jnp.asarray(plen),
                                        jnp.asarray(clen), num_positions=C))
    for j, i in enumerate(rows):
      entropy[i] = np.asarray(stats.entropy[j, :clen[j]])
      rank[i] = np.asarray(stats.rank[j, :clen[j]])
    if progress:
      done = min(start + B, len(order))
      print(f"  scored {done}/{len(order)} functions ({time.time() - t0:.0f} s)",
            file=sys.stderr, flush=True)
  return entropy, rank


# ------------------------------------------------------------------------ command line


def check_model(name: str) -> None:
  """A clear error, before anything is loaded, for a name that is neither a registered
  language model (with its packages installed) nor an existing path."""
  if name in registry.MODELS:
    missing = install.missing_requirements(registry.MODELS[name])
    if missing:
      raise ThresholdError(f"model {name!r} is not installed: python -m models.install {name}")
    return
  if name in registry.ARTIFACTS:
    kind = registry.ARTIFACTS[name].kind
    if kind != "lm":
      raise ThresholdError(f"{name!r} is a {kind}, not a language model")
    return
  if not os.path.exists(name):
    lms = sorted(n for n, a in registry.ARTIFACTS.items() if a.kind == "lm")
    raise ThresholdError(f"unknown model {name!r}: not a registered language model ({lms}) and "
                         "no such file or directory")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m train.adadec_threshold",
                               description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="registered name, .gguf file or folder")
  ap.add_argument("--out", default="", help=f"result JSON (default {DEFAULT_OUT})")
  ap.add_argument("--source_dir", default="",
                  help="folder of Python sources (default: the newest /usr/lib/python3.X)")
  ap.add_argument("--functions", type=int, default=320, help="functions to teacher-force")
  ap.add_argument("--max_prompt_tokens", type=int, default=256,
                  help="skip functions whose signature + docstring is longer")
  ap.add_argument("--max_continuation_tokens", type=int, default=128,
                  help="score at most this many body tokens per function")
  ap.add_argument("--all_functions", action="store_true",
                  help="also use functions without a docstring (prompt = signature only)")
  ap.add_argument("--batch_size", type=int, default=0, help="rows per scoring pass (0: auto)")
  ap.add_argument("--seed", type=int, default=0, help="function order, split and balancing")
  args = ap.parse_args(argv)
  for field, low in (("functions", 2), ("max_prompt_tokens", 1), ("max_continuation_tokens", 1),
                     ("batch_size", 0)):
    if getattr(args, field) < low:
      raise ThresholdError(f"--{field} must be >= {low}, got {getattr(args, field)}")
  return args


def run(args: argparse.Namespace, command: str) -> dict:
  """Checks everything that can be checked without the model, then loads it and fits."""
  source_dir = args.source_dir or code_corpus.find_stdlib_dir()
  code_corpus.source_files(source_dir)  # a clear error for a missing or empty folder
  check_model(args.model)
  examples, skipped = code_corpus.collect_functions(source_dir, not args.all_functions)
  if len(examples) < 2:
    raise ThresholdError(f"found {len(examples)} usable functions in {source_dir}")
  rng = np.random.default_rng(args.seed)
  examples = [examples[i] for i in rng.permutation(len(examples))]

  t0 = time.time()
  model = load_model(args.model)
  tok = model.tokenizer
  if tok is None:
    raise ThresholdError(f"model {args.model!r} has no tokenizer")
  data = tokenize(tok, examples, args.functions, args.max_prompt_tokens,
                  args.max_continuation_tokens)
  if len(data) < 2:
    raise ThresholdError(f"only {len(data)} functions fit in --max_prompt_tokens="
                         f"{args.max_prompt_tokens}")
  pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
  print(f"{args.model}: teacher-forcing {len(data)} functions, "
        f"{sum(len(d.continuation_ids) for d in data)} steps", file=sys.stderr, flush=True)
  entropy, rank = teacher_force(model.lm, model.params, [d.prompt_ids for d in data],
                                [d.continuation_ids for d in data], batch_size=args.batch_size,
                                pad_id=pad, progress=True)
  fit = fit_threshold(entropy, rank, seed=args.seed)
  return {
      "model": args.model, "model_sha256": model.sha256,
      **fit,
      "method": ("logistic regression P(rank1 | H) = sigmoid(w H + b) on class-balanced "
                 "training steps; p* in 0.01..0.99 maximizing accuracy on the unbalanced "
                 "held-out 20% of the functions; tau = (logit(p*) - b) / w; H = natural-log "
                 "entropy of the raw next-token distribution"),
      "data": {
          "source": "Python standard library sources (Debian python3 packages)",
          "source_dir": os.path.abspath(source_dir), "files_skipped": skipped,
          "functions_available": len(examples),
          "selection": ("module- and class-level functions" + ("" if args.all_functions else
                        " with a docstring") + ", shuffled with the seed; prompt = decorators "
                        "+ signature + docstring, continuation = the rest of the body, no chat "
                        "template"),
          "max_prompt_tokens": args.max_prompt_tokens,
          "max_continuation_tokens": args.max_continuation_tokens,
          "truncated_continuations": sum(d.truncated for d in data),
          "mean_prompt_tokens": float(np.mean([len(d.prompt_ids) for d in data])),
          "seed": args.seed,
          "functions": [f"{d.example.file}:{d.example.lineno}:{d.example.name}" for d in data],
      },
      "seconds": time.time() - t0,
      "command": command,
  }


def main(argv: Optional[Sequence[str]] = None) -> dict:
  command = " ".join(["python -m train.adadec_threshold"]
                     + list(sys.argv[1:] if argv is None else argv))
  try:
    args = parse_args(argv)
    result = run(args, command)
  except (ThresholdError, code_corpus.SourceError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  out = args.out or DEFAULT_OUT.format(model=os.path.basename(os.path.normpath(args.model)))
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"w = {result['w']:.4f}, b = {result['b']:.4f}, p* = {result['p_star']:.2f}, "
        f"tau = {result['tau']:.4f} nats; {result['counts']['steps']} steps of "
        f"{result['counts']['functions']} functions; held-out accuracy "
        f"{result['heldout_accuracy']:.3f} (majority {result['heldout_majority_accuracy']:.3f});"
        f" Spearman rho(H, rank) = {result['spearman_rho_entropy_rank']:.3f}; "
        f"{100 * result['share_steps_entropy_at_least_tau']:.1f}% of steps have H >= tau; "
        f"wrote {out}")
  return result


if __name__ == "__main__":
  main()

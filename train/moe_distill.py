"""Builds `smollm2-135m-moe`: SmolLM2-135M-Instruct cut into a Mixture of Experts, then
distilled from itself, and ships only the delta (`models.moe_delta`).

1. Cut ("MoEfication", Zhang et al., 2022; shared expert of "DeepSeekMoE", Dai et al.,
   2024). Per layer, the MLP's hidden units are scored on calibration text by their mean
   contribution |silu(g) * u| * ||down row||; the `--shared_fraction` most important units
   form a shared expert every token uses, the rest are split into `--experts` routed experts
   of equal size by balanced k-means of their activation patterns (units that fire on the
   same tokens go together). With every expert at weight 1 this is the dense model exactly.
2. Router. Each layer's router starts as the least-squares map from the MLP input to the
   norms of the experts' contributions, scaled so that the top-k logits start close
   (renormalised weights near 1 each under `moe_top_k_weights="mean_one"`).
3. Distillation. The router and rank-`--lora_rank` updates of every expert (shared and
   routed) are trained with top-k routing to match the dense model's next-token
   distributions (forward KL, "Distilling the Knowledge in a Neural Network", Hinton et al.,
   2015) on the text corpus' training split and on arithmetic word problems answered by the
   dense model, plus the load-balancing loss of "Switch Transformers". The teacher is the
   dense parent, so the MoE can approach its perplexity but not exceed it on its own terms.
4. Report. Held-out perplexity (the text corpus' test split) of the dense model and of the
   MoE under each routing; the tokens each expert of a middle layer is most often chosen
   for, against their overall frequency.

  python -m train.moe_distill [--steps 240] [--experts 8] [--shared_fraction 0.5]

writes the delta to checkpoints/smollm2-135m-moe (what `--config.model=smollm2-135m-moe`
loads), training metrics and checkpoints to --workdir, and results/moe_smollm2-135m.json.
The evaluation loads the model back by name, so it measures what was shipped.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import artifacts, moe, moe_delta, transformer
from models.datasets import arithmetic
from models.lm import load_model
from models.moe import Routing
from train import lora
from train.distillspec import ContinuationSampler, pad_prompts
from train.moe_from_dense import balanced_kmeans, perplexity
from train.text_data import load_text_sequences
from train.trainer import Trainer

PARENT = "smollm2-135m-instruct"
NAME = "smollm2-135m-moe"
TARGETS = ("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj", "shared_mlp/gate_proj",
           "shared_mlp/up_proj", "shared_mlp/down_proj")


def mlp_inputs(params, config, rows: np.ndarray, batch: int = 4) -> np.ndarray:
  """Every layer's MLP input (the output of its `mlp_norm`) [L, N * S, D] on `rows` [N, S]
  (cache-free passes of a stacked-layer model)."""
  def run(p, t):
    pos = jnp.broadcast_to(jnp.arange(t.shape[1])[None], t.shape)
    _, state = transformer.Transformer(config).apply(
        {"params": p}, t, pos, None, mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "mlp_norm")
    (x,) = state["intermediates"]["layers"]["mlp_norm"]["__call__"]
    return x.reshape(x.shape[0], -1, x.shape[-1])
  run = jax.jit(run)
  return np.concatenate([np.asarray(run(params, jnp.asarray(rows[i:i + batch])), np.float32)
                         for i in range(0, len(rows), batch)], axis=1)


def cut_layer(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, experts: int,
              shared_units: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(assignment [F] in [-1, E), least-squares router [D, E]) of one layer from its MLP inputs
  x [N, D] and weights gate, up [D, F], down [F, D]."""
  h = np.asarray(jax.nn.silu(x @ gate) * (x @ up))  # [N, F]
  importance = np.abs(h).mean(0) * np.linalg.norm(down, axis=1)
  shared = np.argsort(-importance, kind="stable")[:shared_units]
  rest = np.setdiff1d(np.arange(gate.shape[1]), shared)
  assignment = np.full(gate.shape[1], -1, np.int32)
  assignment[rest] = balanced_kmeans(np.abs(h[:, rest]).T, experts, rounds=10, seed=seed)
  norms = np.stack([np.linalg.norm(h[:, assignment == e] @ down[assignment == e], axis=1)
                    for e in range(experts)], axis=1)  # [N, E]
  router = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ norms)
  return assignment, router


def cut_model(parent, rows: np.ndarray, experts: int, shared_fraction: float, top_k: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(assignment [L, F], router [L, D, E]) of every layer, routers scaled so that the median
  gap between the k-th and (k+1)-th logit is 0.1 (near-uniform top-k weights at start)."""
  cfg = parent.lm.config
  F = cfg.intermediate_size
  shared = int(round(shared_fraction * F / experts)) * experts
  shared = min(shared, F - experts)
  xs = mlp_inputs(parent.params, cfg, rows)
  mlp = parent.params["layers"]["mlp"]
  out_a, out_r = [], []
  for layer in range(cfg.num_layers):
    w = [np.asarray(mlp[k]["kernel"][layer], np.float32)
         for k in ("gate_proj", "up_proj", "down_proj")]
    a, r = cut_layer(xs[layer], *w, experts, shared, seed + layer)
    logits = np.sort(xs[layer] @ r, axis=1)[:, ::-1]
    gap = np.median(logits[:, max(top_k - 1, 0)] - logits[:, top_k]) if top_k < experts else 1.0
    out_a.append(a)
    out_r.append(r * (0.1 / max(gap, 1e-6)))
  return np.stack(out_a), np.stack(out_r).astype(np.float32)


def arithmetic_rows(parent, count: int, seq_len: int, max_new_tokens: int, seed: int,
                    exclude: set) -> np.ndarray:
  """Training rows of arithmetic word problems (chat prompt + the dense model's greedy
  answer + EOS), packed into [N, seq_len]; questions in `exclude` (the evaluation's) are
  skipped."""
  tok = parent.tokenizer
  probs = [p for p in arithmetic.problems(count + len(exclude), seed=seed)
           if p.question not in exclude][:count]
  ids = [tok.encode_chat([{"role": "user", "content": p.prompt}]) for p in probs]
  sampler = ContinuationSampler(parent.lm, max_new_tokens, [tok.eos_id], tok.pad_id or 0,
                                temperature=0.0)
  docs = []
  for i in range(0, len(ids), 32):
    prompts, plen = pad_prompts(ids[i:i + 32], tok.pad_id or 0)
    rows = sampler(parent.params, prompts, plen, jnp.zeros((len(prompts), 2), jnp.uint32))
    for t, n, m in zip(rows["tokens"], rows["prompt_len"], rows["gen_mask"]):
      docs.append([int(v) for v in t[:int(n) + int(m.sum())]])
  stream = [v for d in docs for v in d + ([tok.eos_id] if d[-1] != tok.eos_id else [])]
  n = len(stream) // seq_len
  return np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)


class Rows:
  """`data.batch(step)`: `batch_size` rows drawn without replacement per epoch, the same
  for the same step (a pure function of it, so training resumes exactly)."""

  def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
    self.rows, self.batch_size, self.seed = rows, batch_size, seed

  def batch(self, step: int) -> dict:
    per_epoch = len(self.rows) // self.batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
    return {"tokens": self.rows[order[i * self.batch_size:(i + 1) * self.batch_size]]}


def distill_loss(teacher_config, student_config, balance_weight: float):
  """Forward KL(teacher || student) per token, averaged over every position, plus
  `balance_weight` times the mean load-balancing loss of the layers' routers."""
  top_k = student_config.moe_routing.k

  def logits_of(config, params, tokens, mutable):
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
    return transformer.Transformer(config).apply({"params": params}, tokens, pos, None,
                                                 mutable=mutable)

  def loss_fn(params, batch, key):
    del key
    tokens = batch["tokens"]
    t_out = logits_of(teacher_config, params["teacher"], tokens, False)
    s_out, state = logits_of(student_config, params["student"], tokens, ["intermediates"])
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_out.logits).astype(jnp.float32), -1)
    s_logp = jax.nn.log_softmax(s_out.logits.astype(jnp.float32), -1)
    kl = jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), -1))
    (router_logits,) = state["intermediates"]["layers"]["mlp"]["router_logits"]
    balance = moe.load_balancing_loss(router_logits, top_k) / top_k
    return kl + balance_weight * balance, {"kl": kl, "balance": balance,
                                           "tokens": jnp.asarray(tokens.size, jnp.float32)}
  return loss_fn


def expert_tokens(model, rows: np.ndarray, layer: int, top: int = 6) -> list[dict]:
  """For each expert of `layer`: the tokens (at least 20 occurrences) it is among the top-k
  for most often relative to the token's overall count, and its share of assignments."""
  cfg = model.lm.config
  stacked = model.params if cfg.scan_layers else transformer.stack_layers(model.params, cfg.num_layers)
  x = mlp_inputs(stacked, cfg.replace(scan_layers=True), rows)[layer]
  router = np.asarray(stacked["layers"]["mlp"]["router"]["kernel"][layer], np.float32)
  ranks = np.asarray(moe.expert_ranks(jnp.asarray(x @ router)))
  chosen = ranks < cfg.moe_routing.k  # [N, E]
  flat = rows.reshape(-1)
  counts = collections.Counter(flat.tolist())
  out = []
  for e in range(cfg.moe_experts):
    hits = collections.Counter(flat[chosen[:, e]].tolist())
    lift = sorted(((hits[t] / counts[t], t) for t in hits if counts[t] >= 20), reverse=True)
    out.append({"expert": e, "share": float(chosen[:, e].mean()),
                "tokens": [model.tokenizer.decode([t]) for _, t in lift[:top]],
                "rates": [round(r, 3) for r, _ in lift[:top]]})
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--top_k", type=int, default=2)
  ap.add_argument("--shared_fraction", type=float, default=0.5)
  ap.add_argument("--lora_rank", type=int, default=8)
  ap.add_argument("--lora_alpha", type=float, default=16.0)
  ap.add_argument("--steps", type=int, default=240)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--balance_weight", type=float, default=0.01)
  ap.add_argument("--calibration_rows", type=int, default=48)
  ap.add_argument("--text_rows", type=int, default=1200)
  ap.add_argument("--arith_problems", type=int, default=256)
  ap.add_argument("--eval_windows", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workdir", default="/tmp/decodax_moe_distill")
  ap.add_argument("--out_dir", default=f"checkpoints/{NAME}")
  ap.add_argument("--results", default="results/moe_smollm2-135m.json")
  args = ap.parse_args(argv)
  if not 0 <= args.shared_fraction < 1 or args.top_k < 1 or args.top_k >= args.experts:
    raise ValueError("need 0 <= shared_fraction < 1 and 1 <= top_k < experts")
  t0 = time.time()
  parent = load_model(PARENT, scan_layers=True, fused_projections=False)
  tok = parent.tokenizer
  text = load_text_sequences("train", tok, args.seq_len, max_sequences=args.text_rows)
  assignment, router = cut_model(parent, text[:args.calibration_rows], args.experts,
                                 args.shared_fraction, args.top_k, args.seed)
  config = moe_delta.moe_config(parent.lm.config, assignment, args.experts, args.top_k,
                                "mean_one")
  base = moe_delta.split_params(parent.params, assignment, router)
  print(f"cut: {config.moe_shared_intermediate_size} shared units, {args.experts} experts of "
        f"{config.moe_intermediate_size} ({time.time() - t0:.0f} s)", flush=True)
  held_out = {p.question for p in arithmetic.problems(1000, seed=0)}
  arith = arithmetic_rows(parent, args.arith_problems, args.seq_len, 160, args.seed + 1000,
                          held_out)
  rows = np.concatenate([text, arith])
  print(f"data: {len(text)} text rows + {len(arith)} arithmetic rows of {args.seq_len} "
        f"({time.time() - t0:.0f} s)", flush=True)

  adapters = lora.init(base, jax.random.PRNGKey(args.seed), args.lora_rank, TARGETS)
  trainable = {"router": base["layers"]["mlp"]["router"]["kernel"], "adapters": adapters}
  scale = args.lora_alpha / args.lora_rank

  def assemble(tp, frozen):
    layers = dict(frozen["base"]["layers"])
    mlp = dict(layers["mlp"], router={"kernel": tp["router"]})
    layers["mlp"] = mlp
    student = lora.merge({**frozen["base"], "layers": layers}, tp["adapters"],
                         args.lora_alpha, args.lora_rank)
    return {"teacher": frozen["teacher"], "student": student}

  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 20, 1),
                                                args.steps, args.lr * 0.1)
  trainer = Trainer(distill_loss(parent.lm.config, config, args.balance_weight),
                    optax.adamw(schedule, weight_decay=0.0), assemble=assemble,
                    schedule=schedule)
  state = trainer.init_state(trainable, jax.random.PRNGKey(args.seed))
  state = trainer.fit(state, {"teacher": parent.params, "base": base},
                      Rows(rows, args.batch_size, args.seed), args.steps,
                      workdir=args.workdir, checkpoint_every=40, log_every=10,
                      meta={"args": {k: v for k, v in vars(args).items()
                                     if k not in ("workdir", "out_dir", "results")}})
  train_seconds = time.time() - t0
  delta = {"assignment": assignment, "router": np.asarray(state.params["router"]),
           "adapters": jax.device_get(state.params["adapters"]["layers"]["mlp"])}
  artifacts.save_artifact(
      args.out_dir, moe_delta.KIND, delta,
      config={"experts": args.experts, "top_k": args.top_k, "top_k_weights": "mean_one",
              "lora_scale": scale},
      target=artifacts.target_entry(PARENT, parent.sha256, parent.lm.config),
      info={"command": "python -m train.moe_distill " + " ".join(
          sys.argv[1:] if argv is None else argv), "train_seconds": train_seconds},
      storage_dtype=jnp.bfloat16)

  # measure what was shipped: the model loaded back by name
  model = load_model(args.out_dir, scan_layers=True, fused_projections=False)
  test = load_text_sequences("test", tok, args.seq_len, max_sequences=args.eval_windows)
  cfg = model.lm.config
  routings = [(f"top-{k}", Routing("top_k", k)) for k in (args.experts // 2, args.top_k, 1)]
  routings += [(f"rank-{r} only", Routing("rank_k", r)) for r in (1, 2, args.experts - 1)]
  table = [{"routing": "dense parent", "perplexity": perplexity(parent.params,
                                                                parent.lm.config, test)}]
  for label, routing in routings:
    table.append({"routing": label,
                  "perplexity": perplexity(model.params, cfg.replace(moe_routing=routing), test)})
    print(table[-1], flush=True)
  untrained = perplexity(base, config, test)
  result = dict(
      model=NAME, parent=PARENT, args=vars(args), perplexity=table,
      untrained_top_k_perplexity=untrained,
      sizes=dict(experts=args.experts, expert_units=config.moe_intermediate_size,
                 shared_units=config.moe_shared_intermediate_size,
                 delta_params=int(sum(x.size for x in jax.tree.leaves(delta))),
                 delta_bytes=os.path.getsize(os.path.join(args.out_dir, artifacts.PARAMS_FILE))),
      experts_of_layer_15=expert_tokens(model, test, 15),
      train_rows=dict(text=int(len(text)), arithmetic=int(len(arith))),
      seconds=time.time() - t0,
      command="python -m train.moe_distill " + " ".join(sys.argv[1:] if argv is None else argv))
  os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
  with open(args.results, "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()

"""Splits a dense model's MLPs into experts and measures what each routing costs, before any
training: the first step of building an MoE model from SmolLM2.

"MoEfication: Transformer Feed-forward Layers are Mixtures of Experts" (Zhang et al., 2022)
turns a dense feed-forward layer into experts by grouping hidden units that tend to fire
together and routing each token to a few groups. Here, per layer:

1. cluster: balanced spherical k-means of the hidden units' gate vectors (the columns of
   gate_proj, unit-normalised; units with similar gate vectors respond to similar inputs),
   E clusters of exactly F/E units (each round assigns (unit, cluster) pairs in order of
   similarity while clusters have room, then recomputes the centroids);
2. router: expert e's router column is its centroid, so a token's router logit for e is the
   cosine-like match of its MLP input with the expert's typical gate vector, times
   `--router_scale`;
3. measure: the perplexity of held-out text (the text corpus' test split, windows of
   `--window` tokens) under `all` routing (every expert at weight 1: the dense model, a
   check), and under top-k (Mixtral's renormalised weights) and rank-k routings.

No parameter is trained here: the numbers say how far routing alone is from the dense
model, which is what fine-tuning the router and experts has to close.

  python -m train.moe_from_dense [--experts 8] [--windows 16] [--window 256]

writes results/moe_split_<model>.json (the perplexity of each routing, the cluster sizes,
the command).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import moe, transformer
from models.lm import load_model
from models.moe import Routing
from train.text_data import load_text_sequences


def balanced_kmeans(vectors: np.ndarray, clusters: int, rounds: int = 15,
                    seed: int = 0) -> np.ndarray:
  """Balanced spherical k-means: assignment [F] in [0, clusters), every cluster exactly
  F / clusters rows of `vectors` [F, d] (F divisible by `clusters`)."""
  F = vectors.shape[0]
  if F % clusters:
    raise ValueError(f"{F} units do not split into {clusters} equal clusters")
  cap = F // clusters
  v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
  rng = np.random.default_rng(seed)
  centroids = v[rng.choice(F, clusters, replace=False)]
  assignment = np.full(F, -1)
  for _ in range(rounds):
    sim = v @ centroids.T  # [F, E]
    assignment = np.full(F, -1)
    room = np.full(clusters, cap)
    for flat in np.argsort(-sim, axis=None, kind="stable"):
      f, e = divmod(int(flat), clusters)
      if assignment[f] < 0 and room[e]:
        assignment[f], room[e] = e, room[e] - 1
    new = np.stack([v[assignment == e].mean(0) for e in range(clusters)])
    new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
    if np.allclose(new, centroids):
      break
    centroids = new
  return assignment


def split_model(params: dict, config, experts: int, router_scale: float, seed: int = 0):
  """(MoE config, MoE params, assignments [L, F]) of a dense model with stacked layers and
  separate projections (`load_model(scan_layers=True, fused_projections=False)`)."""
  mlp = params["layers"]["mlp"]
  gate = np.asarray(mlp["gate_proj"]["kernel"], np.float32)  # [L, D, F]
  assignments = np.stack([balanced_kmeans(gate[l].T, experts, seed=seed + l)
                          for l in range(gate.shape[0])])
  split = moe.experts_from_dense(mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"],
                                 mlp["down_proj"]["kernel"], assignments)
  unit = gate / np.maximum(np.linalg.norm(gate, axis=1, keepdims=True), 1e-12)
  router = np.stack([np.stack([unit[l][:, assignments[l] == e].mean(1) for e in range(experts)],
                              axis=1) for l in range(gate.shape[0])])  # [L, D, E]
  new = dict(params)
  new["layers"] = dict(params["layers"])
  new["layers"]["mlp"] = {k: {"kernel": w} for k, w in split.items()}
  new["layers"]["mlp"]["router"] = {"kernel": jnp.asarray(router * router_scale,
                                                          config.param_dtype)}
  cfg = config.replace(moe_experts=experts,
                       moe_intermediate_size=config.intermediate_size // experts)
  return cfg, new, assignments


def perplexity(params, config, rows: np.ndarray, batch: int = 4) -> float:
  """exp(mean next-token NLL) over every position of `rows` [N, S] (cache-free passes)."""
  fwd = jax.jit(lambda p, t: transformer.forward(
      p, config, t, jnp.broadcast_to(jnp.arange(t.shape[1])[None], t.shape), None).logits)
  total, count = 0.0, 0
  for i in range(0, len(rows), batch):
    t = jnp.asarray(rows[i:i + batch])
    logp = jax.nn.log_softmax(fwd(params, t)[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, t[:, 1:, None], axis=-1)[..., 0]
    total += float(nll.sum())
    count += nll.size
  return math.exp(total / count)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--router_scale", type=float, default=10.0)
  ap.add_argument("--windows", type=int, default=16)
  ap.add_argument("--window", type=int, default=256)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  out = args.out or f"results/moe_split_{args.model}.json"
  t0 = time.time()
  m = load_model(args.model, scan_layers=True, fused_projections=False)
  rows = load_text_sequences("test", m.tokenizer, args.window, max_sequences=args.windows)
  cfg, params, assignments = split_model(m.params, m.lm.config, args.experts,
                                         args.router_scale, args.seed)
  routings = [("dense model", None), ("all experts, weight 1", Routing("all"))]
  routings += [(f"top-{k}", Routing("top_k", k)) for k in (args.experts // 2, 2, 1)]
  routings += [(f"rank-{r} only", Routing("rank_k", r)) for r in (1, 2)]
  rows_out = []
  for label, routing in routings:
    ppl = (perplexity(m.params, m.lm.config, rows) if routing is None
           else perplexity(params, cfg.replace(moe_routing=routing), rows))
    rows_out.append(dict(routing=label, perplexity=ppl))
    print(f"{label}: perplexity {ppl:.2f}", flush=True)
  result = dict(model=args.model, args=vars(args), rows=rows_out,
                tokens=int(rows.size), seconds=time.time() - t0,
                cluster_sizes=[int(c) for c in np.bincount(assignments[0])],
                command="python -m train.moe_from_dense " + " ".join(
                    sys.argv[1:] if argv is None else argv))
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()

"""Training the GAD block drafter (`decoding.speculative.gad_drafter`) by distillation from the target's greedy outputs.

GAD ("Lossless Acceleration for Seq2seq Generation with Aggressive Decoding", Ge et al.,
2022) drafts k tokens in parallel with a non-autoregressive drafter that fills k [MASK]
slots after the prefix. Vanilla GAD accepts draft j iff it equals the target's argmax
after the prefix and drafts 1..j-1, so the tokens a drafter should predict are exactly the
target's greedy continuation. We therefore train on

  * data: chat prompts (templates x subjects, `train.distillspec.chat_prompt_texts`,
    held-out subjects for measurement) and, optionally, text-corpus contexts, each
    followed by the target's own greedy continuation (`decoding.token_loop.decode`, generated
    once and cached in the workdir). The sequence is the target's greedy path, so the
    token at offset j after any cut is the token vanilla GAD would accept there;
  * loss: for cut points c (a prefix of length c inside the continuation), mask slot j
    gets the cross-entropy of token c + j (hard labels = the target's argmax tokens along
    its greedy path; soft targets would need the target's distributions at those
    positions, an extra 30-layer pass per step, and do not change what is accepted).
    No GLAT-style glancing: the drafter never sees a hint of the answer;
  * many cuts per sequence in one pass: the cache-free forward runs over
    [sequence; C blocks of k masks] with an attention mask that lets block c see only the
    tokens before its cut and the k masks of its own block (`decoding.speculative.gad_drafter.cut_logits`);
    the sequence's keys and values are causal, so every block sees exactly what the
    incremental drafter sees at decode time. Cuts are drawn per step from the step's key
    (uniform over [prompt_len + 1, end - 1]: the prefixes speculative decoding visits,
    whose first generated token comes from the prefill);
  * trained: the drafter's copies of the target's first k layers and final norm, the mask
    embedding and the slot embeddings; the embedding / output head stay the target's. The
    copied final norm is first rescaled to the temperature with the lowest loss on the
    first batch (`calibrate_output_scale`; drafts unchanged): an early exit through the
    target's final norm is wildly over-confident.

Metrics (train and held-out): `nll`, `accuracy` (slot tokens equal to the label),
`accepted` (mean number of leading correct slots at a cut, i.e. the drafts vanilla GAD
would accept there; counted on cuts with k labels) and `block_accuracy` (all k correct).

`python -m train.gad --config=configs/gad_smollm2.py [--workdir=DIR]` trains, measures
vanilla GAD and GAD++ against greedy decoding on held-out chat prompts before and after,
and saves the drafter (a `gad_drafter` artifact, registered as "gad-smollm2" ->
~/.cache/decodax/drafts/gad-smollm2, not in git); `models.artifacts.load_artifact` reads it
and `decoding.speculative.gad_drafter.drafter_from_artifact` rebuilds it on the target.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from decoding import token_loop
from decoding.processors import IDENTITY
from decoding.speculative import gad_drafter as gad
from decoding.speculative.acceptance import GadPlus
from decoding.speculative.loop import speculative_decode
from models import artifacts, registry, transformer
from models.lm import TransformerLM
from train import (data as data_lib, distillspec, experiment, optim, tasks,
                   trainer as trainer_lib)
from train.script import run_script, start_run

Array = jax.Array


# ------------------------------------------------------------------------------ loss


def sample_cuts(key: Array, prompt_len: Array, total_len: Array, num_cuts: int) -> Array:
  """[B, C] cut points uniform in [prompt_len + 1, total_len - 1] (clipped when a row has
  fewer than two generated tokens; such cuts get no valid labels)."""
  B = prompt_len.shape[0]
  lo = prompt_len + 1
  hi = jnp.maximum(total_len, lo + 1)  # exclusive
  return jax.random.randint(key, (B, num_cuts), lo[:, None], hi[:, None]).astype(jnp.int32)


def block_labels(tokens: Array, cuts: Array, total_len: Array, block: int
                 ) -> tuple[Array, Array]:
  """Labels tokens[b, cuts[b, c] + j] and their validity (c + j < total_len[b]):
  ([B, C, k] int32, [B, C, k] bool)."""
  B, T = tokens.shape
  pos = cuts[:, :, None] + jnp.arange(block)[None, None]
  labels = jnp.take_along_axis(tokens, jnp.clip(pos, 0, T - 1).reshape(B, -1), axis=1)
  return labels.reshape(pos.shape), pos < total_len[:, None, None]


def block_metrics(logits: Array, labels: Array, valid: Array) -> dict:
  """Loss and acceptance metrics of block predictions [B, C, k, V] (see the module doc)."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  w = valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  nll = jnp.sum((lse - picked) * w) / n
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  full = jnp.all(valid, axis=-1).astype(jnp.float32)  # cuts with all k labels
  lead = jnp.sum(jnp.cumprod(correct.astype(jnp.int32), axis=-1), axis=-1)
  nf = jnp.maximum(full.sum(), 1.0)
  return {"nll": nll, "accuracy": jnp.sum(correct * w) / n,
          "accepted": jnp.sum(lead * full) / nf,
          "block_accuracy": jnp.sum((lead == labels.shape[-1]) * full) / nf,
          "tokens": w.sum()}


def gad_loss(draft_lm: TransformerLM, block: int, num_cuts: int):
  """The drafter's training loss as a `train.losses` LossFn.

  params: {"dparams": trainable drafter parameters (`decoding.speculative.gad_drafter.init_params`),
  "shared": the target's embedding / head}. batch: `tokens` [B, T] (prompt, greedy
  continuation, padding), `prompt_len` [B], `total_len` [B] (prompt + continuation).
  `num_cuts` cuts per row are drawn from `key`; the loss is the mean CE over valid slots.
  """
  def loss_fn(params, batch, key):
    dparams = params["dparams"]
    tokens = batch["tokens"]
    cuts = sample_cuts(key, batch["prompt_len"], batch["total_len"], num_cuts)
    mp = gad.model_params(dparams, params["shared"])
    logits = gad.cut_logits(draft_lm, mp, gad.mask_embeddings(dparams, block,
                                                              draft_lm.config.dtype),
                            tokens, cuts)
    labels, valid = block_labels(tokens, cuts, batch["total_len"], block)
    metrics = block_metrics(logits, labels, valid)
    return metrics["nll"], metrics

  return loss_fn


def assemble(trainable, shared):
  return {"dparams": trainable, "shared": shared}


def shared_params(target_params) -> dict:
  """The target parameters the drafter reads (embedding, untied head): the trainer's frozen."""
  return {k: target_params[k] for k in gad.SHARED if k in target_params}


# ------------------------------------------------------------------------------ data


def greedy_rows(lm: TransformerLM, params: Any, prompts: np.ndarray, prompt_len: np.ndarray,
                gen_len: int, eos_ids, pad_id: int, batch_size: int = 32) -> dict:
  """The target's greedy continuations of `prompts` (batches of `batch_size`, the last one
  padded: one jitted `token_loop.decode` shape):
  {"tokens" [N, P + gen_len], "prompt_len" [N], "total_len" [N]} (EOS kept)."""
  N, P = prompts.shape
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  proc = IDENTITY
  bs = int(batch_size)
  gens, lens = [], []
  for s in range(0, N, bs):
    logging.info("greedy rows %d-%d of %d", s, min(s + bs, N), N)
    p, pl = prompts[s:s + bs], prompt_len[s:s + bs]
    n = len(p)
    if n < bs:  # pad the last batch (one compiled shape)
      p = np.concatenate([p, np.repeat(p[:1], bs - n, 0)])
      pl = np.concatenate([pl, np.repeat(pl[:1], bs - n, 0)])
    res = token_loop.decode(lm, params, jnp.asarray(p), jnp.asarray(pl),
                            jnp.zeros((bs, 2), jnp.uint32), eos, processor=proc,
                            select=token_loop.greedy_select, pad_id=pad_id,
                            max_new_tokens=gen_len, cache_len=P + gen_len)
    g, gl = jax.device_get((res.tokens, res.lengths))
    gens.append(np.asarray(g)[:n])
    lens.append(np.asarray(gl)[:n])
  gen, gen_n = np.concatenate(gens), np.concatenate(lens).astype(np.int32)
  t = np.arange(P + gen_len)[None]
  rel = t - prompt_len[:, None]
  tokens = np.where(t < prompt_len[:, None], np.pad(prompts, ((0, 0), (0, gen_len))),
                    np.where((rel >= 0) & (rel < gen_n[:, None]),
                             np.take_along_axis(gen, np.clip(rel, 0, gen_len - 1), 1), pad_id))
  return {"tokens": tokens.astype(np.int32), "prompt_len": prompt_len.astype(np.int32),
          "total_len": (prompt_len + gen_n).astype(np.int32)}


def prompt_set(g: Any, model, split: str, num: int, seed: int, pad_id: int):
  """(prompts [N, P], prompt_len [N]): templated chat prompts ("chat"; "heldout" uses
  subjects never trained on) or random token prompts ("synthetic", tokenizer-free)."""
  if g.prompts == "chat":
    if model.tokenizer is None:
      raise ValueError("chat prompts need a model with a tokenizer (or prompts='synthetic')")
    texts = distillspec.chat_prompt_texts(num, split, seed)
    ids = [model.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    return distillspec.pad_prompts(ids, pad_id, int(g.prompt_len))
  P = int(g.prompt_len) or 16
  rng = np.random.default_rng([seed, 409, split == "train"])
  rows = rng.integers(1, model.config.vocab_size, (num, P)).astype(np.int32)
  lengths = rng.integers(max(1, P // 2), P + 1, num).astype(np.int32)
  rows = np.where(np.arange(P)[None] < lengths[:, None], rows, pad_id).astype(np.int32)
  return rows, lengths


def corpus_prompts(config: Any, model, num: int, length: int, seed: int):
  """`num` text-corpus contexts of `length` tokens (no chat template) as prompts."""
  dcfg = config.data.copy_and_resolve_references()
  dcfg.seq_len = int(length)
  rows = tasks.text_sequences(dcfg, model.tokenizer, dcfg.split, num, seed)
  return rows, np.full((num,), length, np.int32)


def _trim(rows: dict, multiple: int = 8) -> dict:
  """Drops the all-padding tail columns (the prompt bucket's slack), keeping a multiple of 8."""
  T = rows["tokens"].shape[1]
  keep = min(T, -(-int(rows["total_len"].max()) // multiple) * multiple)
  return {**rows, "tokens": rows["tokens"][:, :keep]}


# ------------------------------------------------------------------------------ measurement


def _tau(res) -> float:
  calls = float(np.sum(np.asarray(res.extras["target_calls"])))
  return float(np.sum(np.asarray(res.extras["verified_tokens"]))) / max(calls, 1.0)


def compare_decoding(target_lm: TransformerLM, target_params: Any, drafter: gad.GadDrafter,
                     dparams: Any, prompts: np.ndarray, prompt_len: np.ndarray, eos_ids,
                     pad_id: int, max_new_tokens: int, plus: tuple = ((5, 3.0),),
                     repeats: int = 1) -> dict:
  """Greedy decoding vs vanilla GAD vs GAD++ (beta, tau) on one batch of prompts.

  Reports, for each GAD variant, tau = verified tokens / target calls (summed over rows),
  the accepted drafts per call, the fraction of rows whose output equals greedy decoding
  token for token, the fraction of greedy's tokens reproduced before the first
  difference, and wall-clock seconds (the best of `repeats` runs after a compile run;
  timings are only comparable within one run on an otherwise idle machine).
  """
  B, P = prompts.shape
  p, pl = jnp.asarray(prompts), jnp.asarray(prompt_len)
  keys = jnp.zeros((B, 2), jnp.uint32)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  proc = IDENTITY
  cache_len = P + max_new_tokens

  def timed(fn):
    out = fn()
    jax.block_until_ready(out.tokens)
    best = float("inf")
    for _ in range(max(int(repeats), 0)):
      t = time.perf_counter()
      jax.block_until_ready(fn().tokens)
      best = min(best, time.perf_counter() - t)
    return out, (best if repeats else None)

  greedy, t_greedy = timed(lambda: token_loop.decode(
      target_lm, target_params, p, pl, keys, eos, processor=proc,
      select=token_loop.greedy_select, pad_id=pad_id, max_new_tokens=max_new_tokens,
      cache_len=P + max_new_tokens))
  ref = np.asarray(greedy.tokens)
  ref_len = np.asarray(greedy.lengths)

  def summary(res, secs):
    toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
    same = [(lens[b] == ref_len[b]) and np.array_equal(toks[b, :lens[b]], ref[b, :ref_len[b]])
            for b in range(B)]
    agree = []
    for b in range(B):
      n = min(lens[b], ref_len[b])
      diff = np.nonzero(toks[b, :n] != ref[b, :n])[0]
      agree.append(diff[0] if len(diff) else n)
    calls = float(np.sum(np.asarray(res.extras["target_calls"])))
    return {"tau": _tau(res),
            "accepted_per_call": float(np.sum(np.asarray(res.extras["accepted_drafts"])))
            / max(calls, 1.0),
            "target_calls": int(calls), "tokens": int(lens.sum()),
            "identical_rows": float(np.mean(same)),
            "greedy_prefix_fraction": float(np.sum(agree)) / max(float(ref_len.sum()), 1.0),
            "seconds": secs}

  out = {"greedy": {"tokens": int(ref_len.sum()), "seconds": t_greedy}}
  res, secs = timed(lambda: speculative_decode(
      target_lm, target_params, drafter, dparams, p, pl, keys, eos, processor=proc,
      sample=False, pad_id=pad_id, max_new_tokens=max_new_tokens, cache_len=cache_len))
  out["gad"] = summary(res, secs)
  for beta, tau in plus:  # GAD++: the same loop with the relaxed (lossy) acceptance
    res, secs = timed(lambda: speculative_decode(
        target_lm, target_params, drafter, dparams, p, pl, keys, eos, processor=proc,
        sample=False, pad_id=pad_id, max_new_tokens=max_new_tokens, cache_len=cache_len,
        acceptance=GadPlus(beta=int(beta), tau=float(tau))))
    out[f"gad++(beta={beta},tau={tau})"] = summary(res, secs)
  return out


def block_metrics_fn(loss_fn, shared):
  """A jitted `(trainable, batch, key) -> metrics` of the drafter loss (for `evaluate_blocks`)."""
  fn = jax.jit(lambda tr, sh, b, k: loss_fn(assemble(tr, sh), b, k)[1])
  return lambda tr, b, k: fn(tr, shared, b, k)  # `shared` passed, not baked in as a constant


def calibrate_output_scale(metrics_fn, trainable: dict, batch: dict,
                           grid=(1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12), seed: int = 0
                           ) -> tuple[dict, float]:
  """Rescales the drafter's final-norm weights (copied from the target) by the factor of
  `grid` with the lowest block NLL on `batch`. The head is linear without bias, so this
  only sets the softmax temperature: argmax drafts are unchanged. The target's final norm
  is tuned to its last layer; on the features of its first layers it gives logits far too
  confident (SmolLM2-135M, 4 layers: NLL 21 at scale 1, 8 at 0.25), and Adam's small
  per-step moves would take hundreds of steps to undo that. -> (trainable, factor)."""
  key = jax.random.key(seed)
  best, best_nll = 1.0, float("inf")
  base = trainable["body"]["final_norm"]["scale"]
  for a in grid:
    body = {**trainable["body"], "final_norm": {**trainable["body"]["final_norm"],
                                                "scale": base * a}}
    nll = float(metrics_fn({**trainable, "body": body}, batch, key)["nll"])
    if nll < best_nll:
      best, best_nll = float(a), nll
  body = {**trainable["body"], "final_norm": {**trainable["body"]["final_norm"],
                                              "scale": base * best}}
  return {**trainable, "body": body}, best


def evaluate_blocks(metrics_fn, trainable, rows: dict, batch_size: int, seed: int = 0) -> dict:
  """Block metrics on fixed rows (cuts drawn from a fixed key per batch; a last partial
  batch is dropped): `nll` / `accuracy` token-weighted, `accepted` / `block_accuracy`
  averaged over batches. metrics_fn: `block_metrics_fn(...)`."""
  fn = metrics_fn
  n = len(rows["tokens"])
  bs = min(batch_size, n)
  totals, weight, cut_weight = {}, 0.0, 0.0
  for i, s in enumerate(range(0, n - bs + 1, bs)):
    batch = {k: jnp.asarray(v[s:s + bs]) for k, v in rows.items()}
    m = {k: float(v) for k, v in jax.device_get(fn(trainable, batch,
                                                    jax.random.key(seed + i))).items()}
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + v * (m["tokens"] if k in ("nll", "accuracy") else 1.0)
    weight += m["tokens"]
    cut_weight += 1.0
  return {"nll": totals["nll"] / max(weight, 1e-9),
          "accuracy": totals["accuracy"] / max(weight, 1e-9),
          "accepted": totals["accepted"] / max(cut_weight, 1e-9),
          "block_accuracy": totals["block_accuracy"] / max(cut_weight, 1e-9),
          "tokens": weight}


# ------------------------------------------------------------------------------ checkpoints


def save_gad_drafter(directory: str, dparams: dict, drafter: gad.GadDrafter, *,
                     target_name: str, target_sha256: str, info: Optional[dict] = None) -> str:
  """Writes a `gad_drafter` artifact (`models.artifacts`): the trained parameters only (body
  layers + final norm in the stacked layout, mask and slot embeddings), config {"num_layers",
  "num_draft" (the block size), "slot_embeddings"}, the target it was trained for
  (`target_name`, `target_sha256` = its `LoadedModel.sha256`, its architecture) and
  free-form `info`. Replaces an earlier drafter there."""
  tree = dparams
  if not drafter.lm.config.scan_layers:
    tree = {**dparams, "body": transformer.stack_layers(dparams["body"], drafter.num_layers)}
  return artifacts.save_artifact(
      directory, "gad_drafter", tree,
      config={"num_layers": int(drafter.num_layers), "num_draft": int(drafter.num_draft),
              "slot_embeddings": "slots" in dparams},
      target=artifacts.target_entry(target_name, target_sha256, drafter.target_lm.config),
      info=info)


# ------------------------------------------------------------------------------ the run


def validate(config: Any) -> None:
  optim.validate(config.optimizer)
  g = config.gad
  if int(g.block) < 1:
    raise ValueError(f"gad.block must be >= 1, got {g.block}")
  if int(g.num_layers) < 1:
    raise ValueError(f"gad.num_layers must be >= 1, got {g.num_layers}")
  if int(g.num_cuts) < 1:
    raise ValueError(f"gad.num_cuts must be >= 1, got {g.num_cuts}")
  if g.prompts not in ("chat", "synthetic"):
    raise ValueError(f"gad.prompts must be 'chat' or 'synthetic', got {g.prompts!r}")
  if int(g.gen_len) < 2:
    raise ValueError("gad.gen_len must be >= 2")
  if config.num_steps < 1:
    raise ValueError("set num_steps >= 1")
  if int(config.batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
  if any(not 1 <= int(k) <= int(g.block) for k in g.eval_num_draft):
    raise ValueError(f"gad.eval_num_draft must be in [1, block={g.block}], got {g.eval_num_draft}")
  for beta, tau in g.plus:
    if int(beta) < 1 or float(tau) < 0:
      raise ValueError(f"GAD++ needs beta >= 1 and tau >= 0, got {(beta, tau)}")


def run(config: Any, workdir: str, progress: bool = True) -> dict:
  """Generates the greedy training rows (cached), trains the drafter, measures it before
  and after, saves it; returns the results (also `workdir/results.json`)."""
  validate(config)
  g = config.gad
  t_start = time.perf_counter()
  workdir, target, eos, pad_id = start_run(config, workdir)
  K, k_layers = int(g.block), int(g.num_layers)
  drafter = gad.GadDrafter(target_lm=target.lm, num_layers=k_layers, num_draft=K)
  shared = shared_params(target.params)

  rows_path = os.path.join(workdir, "rows.npz")
  row_settings = json.dumps({k: g[k] for k in ("prompts", "prompt_len", "gen_len",
                                                "num_train_prompts", "num_eval_prompts",
                                                "num_corpus_prompts", "corpus_prompt_len")}
                            | {"model": config.model.name, "seed": config.seed}, sort_keys=True)
  rows = None
  if os.path.exists(rows_path):
    with np.load(rows_path) as z:
      rows = {k: z[k] for k in z.files}
    if "settings" in rows and str(rows.pop("settings")) != row_settings:
      logging.warning("%s was generated with other settings: regenerating", rows_path)
      rows = None
  if rows is None:
    t = time.perf_counter()
    parts = {}
    sets = {"train": prompt_set(g, target, "train", int(g.num_train_prompts), config.seed,
                                pad_id),
            "heldout": prompt_set(g, target, "heldout", int(g.num_eval_prompts), config.seed,
                                  pad_id)}
    if int(g.num_corpus_prompts):
      sets["corpus"] = corpus_prompts(config, target, int(g.num_corpus_prompts),
                                      int(g.corpus_prompt_len), config.seed)
    for name, (p, pl) in sets.items():
      r = greedy_rows(target.lm, target.params, p, pl, int(g.gen_len), eos, pad_id,
                      int(g.generate_batch))
      parts.update({f"{name}_{k}": v for k, v in r.items()})
      parts[f"{name}_prompts"] = p
    rows = parts
    np.savez(rows_path, settings=np.asarray(row_settings), **rows)
    logging.info("greedy rows generated in %.1f s", time.perf_counter() - t)
  gen_seconds = time.perf_counter() - t_start

  def take(name):
    return {k: rows[f"{name}_{k}"] for k in ("tokens", "prompt_len", "total_len")}

  train_rows = take("train")
  if "corpus_tokens" in rows:  # corpus rows are shorter: right-pad them to the chat rows
    c = take("corpus")
    T = train_rows["tokens"].shape[1]
    if c["tokens"].shape[1] > T:
      raise ValueError("corpus_prompt_len is longer than the chat prompt bucket")
    c["tokens"] = np.pad(c["tokens"], ((0, 0), (0, T - c["tokens"].shape[1])),
                         constant_values=pad_id)
    train_rows = {k: np.concatenate([train_rows[k], c[k]]) for k in train_rows}
  heldout_rows = take("heldout")
  hp, hl = rows["heldout_prompts"], rows["heldout_prompt_len"]
  train_rows, heldout_rows = _trim(train_rows), _trim(heldout_rows)

  loss_fn = gad_loss(drafter.lm, K, int(g.num_cuts))
  trainable = gad.init_params(target.lm, target.params, k_layers, K, bool(g.slot_embeddings))

  metrics_fn = block_metrics_fn(loss_fn, shared)

  def report(tr, decode: bool) -> dict:
    out = {"blocks": evaluate_blocks(metrics_fn, tr, heldout_rows, config.eval_batch_size,
                                     seed=config.seed)}
    n = min(int(g.decode_prompts), len(hp))
    if n and decode:
      out["decoding"] = {}
      for k in sorted(set(int(x) for x in g.eval_num_draft) | {K}):
        d = gad.GadDrafter(target_lm=target.lm, num_layers=k_layers, num_draft=k,
                           num_masks=K if k < K else 0)
        out["decoding"][f"k={k}"] = compare_decoding(
            target.lm, target.params, d, tr, hp[:n], hl[:n], eos, pad_id,
            int(g.decode_max_new_tokens), plus=tuple(tuple(x) for x in g.plus),
            repeats=int(g.timing_repeats))
        logging.info("decoding k=%d: %s", k, out["decoding"][f"k={k}"])
    return out

  scale = 1.0
  if g.calibrate_output_scale:
    first = {k: jnp.asarray(v) for k, v in data_lib.ArrayData(
        train_rows, config.batch_size, seed=config.seed).batch(0).items()}
    trainable, scale = calibrate_output_scale(metrics_fn, trainable, first, seed=config.seed)
    logging.info("final-norm scale factor at init: %s", scale)

  results_path = os.path.join(workdir, "results.json")
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  if "before" not in results and g.report_before:
    t = time.perf_counter()
    results["before"] = report(trainable, decode=False)  # the untrained drafter: tau ~ 1
    logging.info("before: %s (%.1f s)", results["before"], time.perf_counter() - t)
    with open(results_path, "w") as f:
      json.dump(results, f, indent=1)

  num_steps = int(config.num_steps)
  optimizer = optim.make_optimizer(config.optimizer, num_steps)
  trainer = trainer_lib.Trainer(loss_fn, optimizer, assemble=assemble,
                                grad_accum=config.grad_accum,
                                schedule=optim.make_schedule(config.optimizer, num_steps))
  data = data_lib.ArrayData(train_rows, config.batch_size, seed=config.seed)
  state = trainer.init_state(trainable, jax.random.key(config.seed))
  fp = experiment.fingerprint(config)
  t_train = time.perf_counter()
  state = trainer.fit(state, shared, data, num_steps, workdir=workdir,
                      checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                      keep=config.keep_checkpoints, progress=progress,
                      meta={"task": "gad", "num_steps": num_steps, "fingerprint": fp})
  results["train_seconds"] = time.perf_counter() - t_train
  results["generation_seconds"] = gen_seconds
  results["steps"] = num_steps
  results["train_rows"] = int(len(train_rows["tokens"]))
  t = time.perf_counter()
  results["after"] = report(state.params, decode=True)
  logging.info("after: %s (%.1f s)", results["after"], time.perf_counter() - t)
  results["settings"] = {"block": K, "num_layers": k_layers, "num_cuts": int(g.num_cuts),
                         "output_scale_init": scale,
                         "gen_len": int(g.gen_len), "batch_size": config.batch_size,
                         "learning_rate": config.optimizer.learning_rate}
  if g.save_name:
    out_dir = g.save_dir or registry.artifact_dir(g.save_name)
    save_gad_drafter(out_dir, state.params, drafter, target_name=config.model.name,
                     target_sha256=target.sha256,
                     info={"config": g.to_dict(), "steps": num_steps, "fingerprint": fp,
                           "after": results["after"]})
    results["drafter_path"] = out_dir
  results["total_seconds"] = time.perf_counter() - t_start
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1, default=str)
  return results


if __name__ == "__main__":
  run_script(run, validate=validate, run_name=lambda c: c.gad.save_name or "gad")

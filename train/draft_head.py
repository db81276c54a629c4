"""Trains the EAGLE / FSPAD feature draft head (`models.eagle_head`) on the target's own answers.

    python -m train.draft_head --config=configs/eagle_smollm2.py [--config.num_steps=...]

Pipeline (self-distillation, as EAGLE trains on the target's outputs):

1. Prompts: a deterministic, seeded set of chat requests (`build_prompts`): instruction
   templates x topics, arithmetic word problems from `models.datasets.arithmetic` (a seed other
   than the benchmark's), "repeat / rewrite / summarize / continue this text" requests
   around Jane Austen passages from the text corpus' train split, and code-writing requests
   written for this file (none taken from HumanEval).
2. Answers: the target answers each prompt greedily through `decoding.generate`
   (chat template applied). Prompt + answer ids are cached in
   `~/.cache/decodax/eagle_data/` (keyed by the prompts, the generation settings and the
   target's checksum), so reruns skip generation.
3. Target pass: one cache-free forward over prompt + answer gives, per position p, the
   feature f_p (final hidden state after the final norm), the target's greedy token
   argmax_v p_p(v) and ē_p = W p_p, the expected LM-head column under the target's
   next-token distribution (W: [D, V]). ē makes the distillation cross-entropy exact and
   cheap: -Σ_v p(v) log q(v) = logsumexp(z) - f̂ · ē with z = f̂ W the draft logits, so the
   target's [V]-sized distribution never has to be stored. Cached on disk as well.
   Optionally (`data.num_corpus`) rows of plain Jane Austen text (train split) are added to
   the training rows: the target's features and distributions on any text are valid
   distillation targets, and a forward pass costs far less than generating.
4. Training (`eagle_loss`): head pair s = (f_s + noise, x_{s+1}) at RoPE position s + 1
   predicts f̂_{s+1}; the loss is EAGLE's
       SmoothL1(f̂_{s+1}, f_{s+1}) + w_cls · CE(p_{s+1}, softmax(f̂_{s+1} W)),   w_cls = 0.1,
   averaged over the pairs whose predicted token x_{s+2} is an answer token after the
   first (s >= prompt_len - 1: the pairs drafting uses), never over the prompt. The input
   features get uniform noise U(-a, a), a = `loss.noise` (0.1 as in EAGLE's released
   training; SmolLM2's answer features have RMS 1.86). With partial alignment
   (FSPAD option) only the first `aligned_dims` dimensions enter SmoothL1 (summed and
   divided by D, so each regressed dimension keeps its base weight). The CE term needs the
   [V]-sized LM-head matmul, the bulk of a step; `loss.ce_pairs = M` evaluates it on M
   random answer pairs per row and step (a sampled estimate; 0: every pair). The head is trained
   with the project's `Trainer` (AdamW, linear warmup then cosine decay); the target is
   frozen (its LM head / embedding are the trainer's `frozen` tree).
5. Metrics on held-out conversations (`acceptance`): teacher-forced 1-step top-1 agreement
   with the target's argmax, and greedy chain acceptance: from every answer position t, the
   head drafts `depth` (5) steps autoregressively on its own features (pair j is
   (f̂_{t+j-1}, x_{t+j})), through its KV cache with a `cache_mask` that lets each chain see
   the true context up to t and only its own earlier drafts (the tree-drafting code path).
   The accepted length of a chain is the number of leading draft argmaxes equal to the
   target's greedy tokens; its mean is the expected number of accepted drafts per target
   call (plus one bonus token from the target: `tau`).

Four variants share data, steps and schedule: `eagle` (base), `fs` (+feature sampling),
`pad` (+partial alignment), `fs_pad` (both). Each writes `<workdir>/<variant>/`
(metrics.jsonl, results.json); the best by expected chain acceptance (measured on the
bf16-rounded parameters that are shipped) is saved with `models.eagle_head.save_head`,
after an optional longer run of it (`ship.num_steps`), kept if it does better.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.strategy import Target
from models import artifacts, eagle_head as dh, registry, transformer
from models.datasets import arithmetic, corpus_texts
from train import data as data_lib, model_setup, optim, tasks, text_data, trainer as trainer_lib
from train.script import run_script

Array = jax.Array

VARIANTS = {
    "eagle": dict(feature_sampling=False, partial_alignment=False),
    "fs": dict(feature_sampling=True, partial_alignment=False),
    "pad": dict(feature_sampling=False, partial_alignment=True),
    "fs_pad": dict(feature_sampling=True, partial_alignment=True),
}

# ------------------------------------------------------------------------------ prompts

CHAT_TEMPLATES = [
    "Explain {topic} in simple terms.",
    "Write a short paragraph about {topic}.",
    "Give me three interesting facts about {topic}.",
    "What are the advantages and disadvantages of {topic}?",
    "Write a short poem about {topic}.",
    "How would you describe {topic} to a ten-year-old?",
    "Summarize what people should know about {topic} in a few sentences.",
    "Write a short story in which {topic} plays a part.",
    "What are some common misconceptions about {topic}?",
    "Give me a few tips related to {topic}.",
]

TOPICS = [
    "the ocean", "volcanoes", "photosynthesis", "the moon", "electric cars", "coffee", "chess",
    "the internet", "honey bees", "rainforests", "the water cycle", "gardening", "bicycles",
    "the solar system", "music lessons", "healthy sleep", "recycling", "the Roman Empire",
    "airplanes", "friendship", "rainbows", "public libraries", "learning a new language",
    "mountains", "earthquakes", "the human heart", "baking bread", "dinosaurs", "penguins",
    "renewable energy", "museums", "deserts", "video games", "the printing press", "tea",
    "snowflakes", "trains", "saving money", "volunteering", "the stars at night",
    "owls", "the Great Wall of China", "board games", "clouds", "vaccines", "the Olympic Games",
    "lighthouses", "composting", "coral reefs", "the Moon landing", "wolves", "kites",
    "ancient Egypt", "street food", "hot air balloons", "glaciers", "handwriting",
    "robots", "the wheel", "city parks", "elephants", "running a marathon", "magnets",
    "wind turbines", "origami", "submarines", "farmers markets", "thunderstorms",
    "the history of chocolate", "camping", "bridges", "butterflies", "the immune system",
    "jazz music", "maps", "pottery", "cheese making", "time zones", "solar panels",
    "sign language",
]

TEXT_TASKS = [
    "Repeat the following text exactly as it is written:\n\n{passage}",
    "Rewrite the following passage in plain modern English:\n\n{passage}",
    "Summarize the following passage in two sentences:\n\n{passage}",
    "Continue the following story for a few sentences:\n\n{passage}",
    "Who is speaking or described in this passage, and what is happening?\n\n{passage}",
]

CODE_TASKS = [
    "reverses the words in a sentence", "counts the vowels in a string",
    "returns the largest of three numbers", "converts a temperature from Celsius to Fahrenheit",
    "removes duplicate items from a list while keeping their order",
    "computes the average of a list of numbers", "checks whether a word is a palindrome",
    "merges two dictionaries", "returns the n-th Fibonacci number",
    "counts how often each word appears in a text", "flattens a list of lists",
    "finds the second smallest number in a list", "capitalizes the first letter of each word",
    "computes the factorial of a number", "checks whether a year is a leap year",
    "returns the sum of the digits of an integer", "sorts a list of names by their length",
    "reads a text file and returns its number of lines", "converts a list of strings to integers",
    "returns the common elements of two lists",
    "checks whether two strings are anagrams", "converts a number to its binary representation",
    "returns the longest word in a sentence", "counts the even numbers in a list",
    "removes all punctuation from a string", "returns the greatest common divisor of two numbers",
    "checks whether a number is prime", "splits a list into chunks of a given size",
    "returns the index of the largest element in a list", "reverses a string without slicing",
    "converts a dictionary into a list of key-value pairs", "computes the median of a list",
    "counts the uppercase letters in a string", "returns the product of a list of numbers",
    "rotates a list by k positions", "checks whether a list is sorted",
    "returns all the divisors of a number", "replaces every space in a string with a dash",
    "converts minutes into hours and minutes", "returns the squares of the numbers in a list",
]

CODE_TEMPLATES = [
    "Write a Python function that {task}.",
    "Write a short Python function that {task}, and explain how it works.",
    "Show me a simple JavaScript function that {task}.",
]


def austen_passages(texts: Sequence[str], num: int, seed: int, min_words: int = 35,
                    max_words: int = 70) -> list[str]:
  """`num` passages of whole sentences (min_words..max_words words) drawn deterministically
  from the corpus documents."""
  rng = random.Random(seed)
  out, tries = [], 0
  while len(out) < num and tries < 50 * num:
    tries += 1
    doc = texts[rng.randrange(len(texts))]
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(doc.split()))
    if len(sentences) < 4:
      continue
    i = rng.randrange(len(sentences) - 3)
    words: list[str] = []
    for s in sentences[i:]:
      if len(words) + len(s.split()) > max_words:
        break
      words += s.split()
    if len(words) >= min_words:
      out.append(" ".join(words))
  if len(out) < num:
    raise ValueError(f"found only {len(out)} passages of {min_words}-{max_words} words")
  return out


def build_prompts(dcfg: Any, corpus: Optional[Sequence[str]] = None) -> list[dict]:
  """The deterministic prompt set: dicts {"kind", "text"} (user messages), shuffled with
  `dcfg.seed`. `corpus` (Austen chapters) is needed when `dcfg.num_text > 0`."""
  rng = random.Random(dcfg.seed)
  chat = [t.format(topic=topic) for t in CHAT_TEMPLATES for topic in TOPICS]
  rng.shuffle(chat)
  prompts = [{"kind": "chat", "text": p} for p in chat[:dcfg.num_chat]]
  prompts += [{"kind": "arithmetic", "text": p.prompt}
              for p in arithmetic.problems(dcfg.num_arithmetic, seed=dcfg.arithmetic_seed)]
  if dcfg.num_text:
    passages = austen_passages(corpus, dcfg.num_text, dcfg.seed)
    prompts += [{"kind": "text", "text": TEXT_TASKS[i % len(TEXT_TASKS)].format(passage=p)}
                for i, p in enumerate(passages)]
  code = [t.format(task=task) for t in CODE_TEMPLATES for task in CODE_TASKS]
  rng.shuffle(code)
  prompts += [{"kind": "code", "text": p} for p in code[:dcfg.num_code]]
  rng.shuffle(prompts)
  return prompts


# --------------------------------------------------------------------------- generation


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir(dcfg: Any) -> str:
  return os.path.expanduser(dcfg.cache_dir or "~/.cache/decodax/eagle_data")


def generate_answers(model: Any, prompts: Sequence[dict], dcfg: Any, target_sha: str,
                     log=print) -> list[dict]:
  """Greedy answers of the target: [{"kind", "prompt_ids", "answer_ids"}], cached on disk.

  Prompts are grouped by token length before batching (each group is one call of
  `decoding.generate`, so a short prompt is not padded to the longest one's bucket).
  """
  tok = model.tokenizer
  ids = [tok.encode_chat([{"role": "user", "content": p["text"]}], add_generation_prompt=True)
         for p in prompts]
  kernel = dcfg.get("gen_matmul_kernel", "xla")
  spec = {"ids": ids, "n": dcfg.max_new_tokens, "target": target_sha, "v": 1}
  if kernel != "xla":  # the kernel's round-off may flip near-ties: answers of their own
    spec["kernel"] = kernel
  key = _digest(spec)
  path = os.path.join(cache_dir(dcfg), f"answers-{key}.json")
  if os.path.exists(path):
    with open(path) as f:
      log(f"answers: cached {path}")
      return json.load(f)
  settings = Greedy(max_new_tokens=int(dcfg.max_new_tokens))
  eos = (tok.eos_id,) if tok.eos_id is not None else ()
  pad = tok.pad_id if tok.pad_id is not None else (eos[0] if eos else 0)
  lm, params = model.lm, model.params
  if kernel == "packed":  # the CPU skinny-matmul kernel: decode batches run about 1.5x faster
    cfg = lm.config
    if not cfg.fused_projections:
      params = transformer.fuse_projections(params)
    lm = type(lm)(cfg.replace(fused_projections=True, matmul_kernel="packed"))
    params = transformer.pack_params(params)
  target = Target(lm, params, eos_ids=eos, pad_id=pad, tokenizer=tok)
  order = sorted(range(len(ids)), key=lambda i: (prompts[i]["kind"], len(ids[i])))
  out: list[Optional[dict]] = [None] * len(ids)
  partial = path + ".partial.jsonl"  # finished batches, so an interrupted run resumes
  if os.path.exists(partial):
    with open(partial) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
          continue
        out[r["index"]] = r["example"]
    log(f"answers: resuming with {sum(o is not None for o in out)} cached")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  todo = [i for i in order if out[i] is None]
  bs, t0, made = int(dcfg.gen_batch_size), time.perf_counter(), 0
  for s in range(0, len(todo), bs):
    chunk = todo[s:s + bs]
    gens = generate(target, [ids[i] for i in chunk], settings, batch_size=bs)
    with open(partial, "a") as f:
      for i, g in zip(chunk, gens):
        out[i] = {"kind": prompts[i]["kind"], "prompt_ids": ids[i],
                  "answer_ids": [int(t) for t in g.output_ids]}
        made += len(g.output_ids)
        f.write(json.dumps({"index": i, "example": out[i]}) + "\n")
    dt = time.perf_counter() - t0
    log(f"answers: {min(s + bs, len(todo))}/{len(todo)} prompts, {made} tokens, "
        f"{made / dt:.1f} tokens/s (compiles included)")
  with open(path + ".tmp", "w") as f:
    json.dump(out, f)
  os.replace(path + ".tmp", path)
  os.remove(partial)
  return out


# -------------------------------------------------------------------------- target pass


@functools.partial(jax.jit, static_argnums=0)
def _target_pass(lm, params, tokens):
  B, T = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  out = lm(params, tokens, pos, None)
  cfg = lm.config
  w = transformer.head_matrix(params)  # [D, V]
  p = jax.nn.softmax(out.logits, axis=-1)
  ebar = jnp.einsum("btv,dv->btd", p, w.astype(jnp.float32), precision=cfg.precision)
  return (out.hidden.astype(jnp.float32), ebar, jnp.argmax(out.logits, -1).astype(jnp.int32))


def target_arrays(lm, params, examples: Sequence[dict], seq_len: int, batch_size: int,
                  pad_id: int = 0, log=print) -> dict[str, np.ndarray]:
  """Per-position training arrays from one target pass over prompt + answer.

  Returns tokens [N, T] int32 (padded with `pad_id`), hidden [N, T, D] float32 (f_p),
  ebar [N, T, D] float32 (W p_p), argmax [N, T] int32, prompt_len [N], length [N]
  (T = seq_len; longer answers are cut). Rows are processed in length order, each batch
  padded to a multiple of 64 positions.
  """
  N, T, D = len(examples), int(seq_len), lm.config.hidden_size
  seqs = [(e["prompt_ids"] + e["answer_ids"])[:T] for e in examples]
  arrays = {"tokens": np.full((N, T), pad_id, np.int32),
            "hidden": np.zeros((N, T, D), np.float32), "ebar": np.zeros((N, T, D), np.float32),
            "argmax": np.zeros((N, T), np.int32),
            "prompt_len": np.asarray([len(e["prompt_ids"]) for e in examples], np.int32),
            "length": np.asarray([len(s) for s in seqs], np.int32)}
  for i, s in enumerate(seqs):
    arrays["tokens"][i, :len(s)] = s
  order = sorted(range(N), key=lambda i: len(seqs[i]))
  t0, done = time.perf_counter(), 0
  for s in range(0, N, batch_size):
    rows = order[s:s + batch_size]
    rows_p = rows + [rows[0]] * (batch_size - len(rows))
    Tb = min(T, -(-max(len(seqs[i]) for i in rows) // 64) * 64)
    hid, ebar, am = jax.device_get(_target_pass(lm, params,
                                                jnp.asarray(arrays["tokens"][rows_p, :Tb])))
    n = len(rows)
    arrays["hidden"][rows, :Tb] = hid[:n]
    arrays["ebar"][rows, :Tb] = ebar[:n]
    arrays["argmax"][rows, :Tb] = am[:n]
    done += sum(len(seqs[i]) for i in rows)
    log(f"target pass: {min(s + batch_size, N)}/{N} rows, "
        f"{done / (time.perf_counter() - t0):.1f} tokens/s")
  return arrays


def cached_target_arrays(lm, params, examples, dcfg, target_sha: str, pad_id: int,
                         log=print) -> dict[str, np.ndarray]:
  key = _digest({"ex": [[e["prompt_ids"], e["answer_ids"]] for e in examples],
                 "T": dcfg.seq_len, "target": target_sha, "dtype": str(lm.config.dtype),
                 "v": 1})
  path = os.path.join(cache_dir(dcfg), f"features-{key}.npz")
  if dcfg.get("cache_features", True) and os.path.exists(path):
    log(f"target pass: cached {path}")
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  arrays = target_arrays(lm, params, examples, dcfg.seq_len, dcfg.feature_batch_size, pad_id,
                         log=log)
  if dcfg.get("cache_features", True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)
  return arrays


def answer_mask(prompt_len: Array, length: Array, num_pairs: int) -> Array:
  """[B, S] float32: head pairs s whose draft is trained / measured: s >= prompt_len - 1
  (pair (f_s, x_{s+1}) drafts x_{s+2}, an answer token after the first) and s + 2 < length."""
  s = jnp.arange(num_pairs)[None, :]
  return ((s >= prompt_len[:, None] - 1) & (s + 2 < length[:, None])).astype(jnp.float32)


# -------------------------------------------------------------------------------- loss


def smooth_l1(x: Array, y: Array, beta: float = 1.0) -> Array:
  d = jnp.abs(x - y)
  return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def eagle_loss(head: dh.EagleHead, w_cls: float = 0.1, noise: float = 0.1, beta: float = 1.0,
               window: int = 0, ce_pairs: int = 0):
  """`loss_fn((head_params, out_w), batch, key) -> (loss, metrics)` for the `Trainer`.

  batch: tokens [B, T], hidden [B, T, D], ebar [B, T, D], argmax [B, T], prompt_len [B],
  length [B] (`target_arrays`). `out_w` is `models.eagle_head.output_weights` (frozen).
  Pairs s = 0..T-2; see the module docstring for the objective. The SmoothL1 term covers
  every answer pair. The [V]-sized LM-head matmul (the bulk of the step) runs only where
  the CE term needs it: with `ce_pairs = 0`, on each row's `window` pairs from
  prompt_len - 1 on (0: all T - 1 pairs; the window must cover the longest answer), which
  is exact; with `ce_pairs = M > 0`, on M answer pairs per row drawn uniformly without
  replacement from the step's key (a sampled estimate of the mean CE that weights rows
  with fewer than M answer pairs a little more; it cuts the step's cost several times).
  Metrics: `feature_l1` (SmoothL1 over all D dims, whatever is regressed), `regression`
  (the optimized term), `ce`, `top1` (agreement with the target's argmax on the noisy
  inputs), `tokens` (answer pairs) and `covered` (share of them in the CE term).
  """
  cfg = head.config
  D, A = cfg.hidden_size, cfg.aligned_dims

  def loss_fn(params, batch, key):
    hp, out_w = params
    noise_key, pick_key = jax.random.split(key)
    tokens, hidden = batch["tokens"], batch["hidden"].astype(jnp.float32)
    B, T = tokens.shape
    S = T - 1
    feats = hidden[:, :-1]
    if noise > 0:
      feats = feats + jax.random.uniform(noise_key, feats.shape, jnp.float32, -noise, noise)
    pos = jnp.broadcast_to(jnp.arange(1, T, dtype=jnp.int32), (B, S))
    out = dh.head_forward(hp, cfg, out_w, feats, tokens[:, 1:], pos, None, None, None, False)
    fhat = out.features.astype(jnp.float32)
    mask = answer_mask(batch["prompt_len"], batch["length"], S)
    n = jnp.maximum(mask.sum(), 1.0)
    l1 = smooth_l1(fhat, hidden[:, 1:], beta)  # [B, S, D]
    reg = jnp.sum(l1[..., :A].sum(-1) * mask) / (D * n)
    feature_l1 = jnp.sum(l1.mean(-1) * mask) / n
    if ce_pairs:
      score = jnp.where(mask > 0, jax.random.uniform(pick_key, mask.shape), -1.0)
      idx = jax.lax.top_k(score, min(ce_pairs, S))[1]  # [B, M]
      kmask = jnp.take_along_axis(mask, idx, axis=1)
    else:
      K = window or S
      first = batch["prompt_len"][:, None] - 1
      idx = jnp.clip(first + jnp.arange(K)[None, :], 0, S - 1)
      kmask = jnp.take_along_axis(mask, idx, axis=1) * (jnp.arange(K)[None, :] < S - first)
    f_k = jnp.take_along_axis(fhat, idx[..., None], axis=1)  # [B, K, D]
    ebar_k = jnp.take_along_axis(batch["ebar"][:, 1:].astype(jnp.float32), idx[..., None], 1)
    z = dh.head_logits(out_w, cfg, f_k)  # [B, K, V]
    ce_k = jax.nn.logsumexp(z, axis=-1) - jnp.sum(f_k * ebar_k, -1)  # -sum_v p log q
    nk = jnp.maximum(kmask.sum(), 1.0)
    ce = jnp.sum(ce_k * kmask) / nk
    target = jnp.take_along_axis(batch["argmax"][:, 1:], idx, axis=1)
    top1 = jnp.sum((jnp.argmax(z, -1) == target) * kmask) / nk
    loss = reg + w_cls * ce
    return loss, {"feature_l1": feature_l1, "regression": reg, "ce": ce, "top1": top1,
                  "tokens": mask.sum(), "covered": kmask.sum() / n}
  return loss_fn


# ----------------------------------------------------------------------------- metrics


def chain_cache_mask(num_pairs: int, cache_len: int, depth: int) -> Array:
  """[S, cache_len] bool: the cache slots the chain starting at pair t may see when it drafts
  at `depth` (>= 2). The first S slots hold the true pairs (depth 1), slot (j - 1) * S + t
  the chain's own depth-j pair: it sees true pairs s <= t and its own depths 2..depth-1."""
  S = num_pairs
  slot = jnp.arange(cache_len)[None, :]
  t = jnp.arange(S)[:, None]
  own = (slot >= S) & (slot < (depth - 1) * S) & (slot % S == t)
  return ((slot < S) & (slot <= t)) | own


def chain_drafts(head: dh.EagleHead, hp, out_w, batch: dict, depth: int,
                 vocab_mask: Optional[Array] = None) -> Array:
  """[B, depth, S] int32: the draft argmax at depth j (1..depth) of the chain starting at
  pair t, i.e. the head's guess for x_{t+j+1} after drafting on its own features. All
  chains of a row draft together through one head cache of depth * S slots, each seeing
  only the true context up to t and its own earlier drafts (`chain_cache_mask`).
  batch: tokens [B, T], hidden [B, T, D] (`target_arrays`). `vocab_mask` [V] bool restricts
  the argmax to a reduced draft vocabulary."""
  B, T = batch["tokens"].shape
  S = T - 1
  # the empty cache and the masks are arguments, not constants of the jitted function:
  # XLA would otherwise spend minutes constant-folding attention over them
  cache = head.init_cache(B, depth * S)
  masks = jnp.stack([chain_cache_mask(S, depth * S, j) for j in range(2, depth + 1)]) if (
      depth > 1) else jnp.zeros((0, S, depth * S), bool)
  return _chain_drafts(head, hp, out_w, batch["tokens"], batch["hidden"], cache, masks,
                       jnp.eye(S, dtype=bool), depth, vocab_mask)


@functools.partial(jax.jit, static_argnums=(0, 8))
def _chain_drafts(head, hp, out_w, tokens, hidden, cache, masks, eye, depth, vocab_mask):
  cfg = head.config
  B, T = tokens.shape
  S = T - 1
  eye = jnp.broadcast_to(eye[None], (B, S, S))
  feats, drafts = hidden[:, :-1].astype(jnp.float32), []
  for j in range(1, depth + 1):
    # chain t at depth j: the pair (f̂_{t+j-1} (f_t at depth 1), x_{t+j}) at position t + j
    tok = jnp.pad(tokens[:, j:], ((0, 0), (0, j - 1)))  # x_{t+j}
    pos = jnp.broadcast_to(jnp.arange(j, S + j, dtype=jnp.int32), (B, S))
    if j == 1:
      out = dh.head_forward(hp, cfg, out_w, feats, tok, pos, cache, None, None, True)
    else:
      cm = jnp.broadcast_to(masks[j - 2][None], (B, S, depth * S))
      out = dh.head_forward(hp, cfg, out_w, feats, tok, pos, cache, eye, cm, True)
    cache, feats = out.cache, out.features
    logits = out.logits if vocab_mask is None else jnp.where(vocab_mask, out.logits, -jnp.inf)
    drafts.append(jnp.argmax(logits, -1).astype(jnp.int32))
  return jnp.stack(drafts, axis=1)


def chain_matches(head: dh.EagleHead, hp, out_w, batch: dict, depth: int,
                  vocab_mask: Optional[Array] = None) -> np.ndarray:
  """[B, depth, S] bool: whether the chain from pair t drafts at depth j the target's greedy
  token x_{t+j+1} (`batch["argmax"][:, t + j]`)."""
  drafts = np.asarray(chain_drafts(head, hp, out_w, batch, depth, vocab_mask))
  am = np.asarray(batch["argmax"])
  S = drafts.shape[-1]
  greedy = np.stack([np.pad(am[:, j:], ((0, 0), (0, j - 1)))[:, :S]
                     for j in range(1, depth + 1)], axis=1)
  return drafts == greedy


def acceptance(head: dh.EagleHead, hp, out_w, arrays: dict, depth: int = 5,
               batch_size: int = 8, draft_ids: Optional[np.ndarray] = None) -> dict:
  """1-step agreement and greedy chain acceptance on held-out rows (module docstring).

  Chains start at answer pairs t (t >= prompt_len - 1) with all `depth` compared tokens
  inside the sequence (t + depth + 1 < length). Returns top1 (depth-1 agreement over all
  answer pairs), accept_at_j (fraction of chains whose first j drafts are all accepted),
  expected_accepted (mean accepted drafts of a chain of `depth`) and tau = 1 + that.
  `draft_ids` (token ids) drafts from that reduced vocabulary only.
  """
  N = len(arrays["tokens"])
  vocab_mask = None
  if draft_ids is not None:
    vocab_mask = jnp.zeros((head.vocab_size,), bool).at[jnp.asarray(draft_ids)].set(True)
  hits1 = n1 = 0.0
  acc_sum = np.zeros(depth)
  nchain = 0.0
  for s in range(0, N, batch_size):
    rows = np.arange(s, s + batch_size) % N
    valid_row = (np.arange(s, s + batch_size) < N)
    batch = {k: jnp.asarray(v[rows]) for k, v in arrays.items()
             if k in ("tokens", "hidden", "argmax")}
    m = np.asarray(chain_matches(head, hp, out_w, batch, depth, vocab_mask))  # [B, depth, S]
    S = m.shape[-1]
    t = np.arange(S)[None, :]
    pl, ln = arrays["prompt_len"][rows][:, None], arrays["length"][rows][:, None]
    ans = (t >= pl - 1) & (t + 2 < ln) & valid_row[:, None]
    hits1 += float((m[:, 0] & ans).sum())
    n1 += float(ans.sum())
    starts = ans & (t + depth + 1 < ln)
    run = np.cumprod(m, axis=1).astype(bool)  # first j all accepted
    acc_sum += (run & starts[:, None, :]).sum(axis=(0, 2))
    nchain += float(starts.sum())
  accept_at = acc_sum / max(nchain, 1.0)
  return {"top1": hits1 / max(n1, 1.0), **{f"accept_at_{j + 1}": float(a)
                                          for j, a in enumerate(accept_at)},
          "expected_accepted": float(accept_at.sum()), "tau": 1.0 + float(accept_at.sum()),
          "chains": nchain, "pairs": n1}


# ----------------------------------------------------------------------------- training


def train_variant(name: str, head: dh.EagleHead, out_w: dict, train: dict, heldout: dict,
                  config: Any, workdir: str, log=print) -> tuple[Any, dict]:
  """Trains one head variant; returns (params, results) and writes workdir/results.json."""
  num_steps = int(config.num_steps)
  lcfg = config.loss
  window = int(config.logit_window)
  loss_fn = eagle_loss(head, lcfg.w_cls, lcfg.noise, lcfg.beta, window, int(lcfg.ce_pairs))
  eval_fn = eagle_loss(head, lcfg.w_cls, 0.0, lcfg.beta, window)  # exact: every answer pair
  tr = trainer_lib.Trainer(loss_fn, optim.make_optimizer(config.optimizer, num_steps),
                           assemble=lambda hp, ow: (hp, ow),
                           schedule=optim.make_schedule(config.optimizer, num_steps),
                           eval_loss_fn=eval_fn)
  key = jax.random.key(config.seed)
  hp0 = dh.init_head_params(head, jax.random.fold_in(key, 1))
  state = tr.init_state(hp0, jax.random.fold_in(key, 2))
  keys = ("tokens", "hidden", "ebar", "argmax", "prompt_len", "length")
  source = data_lib.ArrayData({k: train[k] for k in keys}, config.batch_size, seed=config.seed)
  eval_batches = data_lib.eval_batches({k: heldout[k] for k in keys}, config.batch_size) if (
      config.eval_every) else None
  t0 = time.perf_counter()

  def hook(step, state, record):
    del state
    if record is not None:
      log(f"[{name}] step {step}: " + ", ".join(
          f"{k} {v:.4g}" for k, v in record.items() if k not in ("split", "step")))

  settings = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE}
  meta = {"variant": name, "num_steps": num_steps,
          "fingerprint": _digest({"variant": name, "settings": settings})}
  try:  # a finished run of the same settings in `workdir` is reused, not retrained
    state = tr.fit(state, out_w, source, num_steps, workdir=workdir, eval_batches=eval_batches,
                   eval_every=int(config.eval_every), log_every=int(config.log_every),
                   checkpoint_every=0, keep=1, progress=False, hooks=(hook,), meta=meta)
  except trainer_lib.ResumeError:
    log(f"[{name}] {workdir} holds a run with other settings: starting afresh")
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    state = tr.fit(state, out_w, source, num_steps, workdir=workdir, eval_batches=eval_batches,
                   eval_every=int(config.eval_every), log_every=int(config.log_every),
                   checkpoint_every=0, keep=1, progress=False, hooks=(hook,), meta=meta)
  train_s = time.perf_counter() - t0
  params = jax.device_get(state.params)
  final_eval = tr.evaluate(state, out_w, data_lib.eval_batches(
      {k: heldout[k] for k in keys}, config.batch_size))
  rounded = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), params)
  t1 = time.perf_counter()
  acc = acceptance(head, rounded, out_w, heldout, config.eval.depth, config.eval.batch_size)
  acc_f32 = acceptance(head, params, out_w, heldout, config.eval.depth,
                       config.eval.batch_size) if config.eval.get("also_float32") else None
  last = _last_train_record(os.path.join(workdir, "metrics.jsonl"))
  results = {"variant": name, "options": VARIANTS[name], "steps": num_steps,
             "train_seconds": train_s, "eval_seconds": time.perf_counter() - t1,
             "num_params": dh.num_params(params), "last_train": last, "heldout_loss": final_eval,
             "heldout_acceptance_bf16": acc}
  if acc_f32 is not None:
    results["heldout_acceptance_f32"] = acc_f32
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  log(f"[{name}] {json.dumps(results)}")
  return params, results


def compare_variants(base_cfg: dh.HeadConfig, out_w: dict, train: dict, heldout: dict,
                     config: Any, workdir: str, summary: dict, log=print):
  """Trains every variant of `config.variants` (`train_variant`, in workdir/<variant>) after
  measuring an untrained head. Fills summary["untrained"], summary["variants"][name] and
  summary["best"] (the most accepted drafts per held-out chain); returns
  ({name: (head, params)}, best name)."""
  untrained = dh.EagleHead(base_cfg)
  summary["untrained"] = acceptance(untrained, dh.init_head_params(untrained, jax.random.key(0)),
                                    out_w, heldout, config.eval.depth, config.eval.batch_size)
  log(f"untrained head: {summary['untrained']}")
  summary.setdefault("variants", {})
  best, trained = None, {}
  for vname in config.variants:
    head = dh.EagleHead(base_cfg.replace(**VARIANTS[vname]))
    hp, res = train_variant(vname, head, out_w, train, heldout, config,
                            os.path.join(workdir, vname), log=log)
    summary["variants"][vname] = res
    trained[vname] = (head, hp)
    score = res["heldout_acceptance_bf16"]["expected_accepted"]
    if best is None or score > summary["variants"][best]["heldout_acceptance_bf16"][
        "expected_accepted"]:
      best = vname
  summary["best"] = best
  return trained, best


_VOLATILE = ("variants", "eval", "ship", "log_every", "eval_every", "workdir")


def _last_train_record(path: str) -> Optional[dict]:
  last = None
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if r.get("split") == "train":
          last = r
  return last


def load_target(mcfg: Any, seed: int):
  """(lm, params, tokenizer, name, sha256) of the target: a registered model / path, or
  "tiny" (a random tiny Llama with SmolLM2's tokenizer, for smoke runs); sha256 identifies
  its weights (`train.model_setup.ModelBundle.sha256`)."""
  bundle = model_setup.build(mcfg, seed=seed)
  return bundle.lm, bundle.params, bundle.tokenizer, mcfg.name, bundle.sha256


def run(config: Any, log=print) -> dict:
  t_start = time.perf_counter()
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  lm, params, tok, name, target_sha = load_target(config.model, config.seed)
  log(f"target {name} sha256 {target_sha[:16]}..., {lm.config.num_layers} layers, "
      f"D={lm.config.hidden_size}, V={lm.config.vocab_size}")
  dcfg = config.data
  corpus = corpus_texts("train") if dcfg.num_text else None
  prompts = build_prompts(dcfg, corpus)
  log(f"{len(prompts)} prompts: " + ", ".join(
      f"{k} {sum(p['kind'] == k for p in prompts)}" for k in ("chat", "arithmetic", "text",
                                                               "code")))

  @dataclasses.dataclass
  class _Model:
    lm: Any
    params: Any
    tokenizer: Any

  t = time.perf_counter()
  examples = generate_answers(_Model(lm, params, tok), prompts, dcfg, target_sha, log=log)
  gen_s = time.perf_counter() - t
  keep = [e for e in examples if len(e["prompt_ids"]) <= dcfg.seq_len - 16 and e["answer_ids"]]
  pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
  t = time.perf_counter()
  arrays = cached_target_arrays(lm, params, keep, dcfg, target_sha, pad, log=log)
  n_eval = int(dcfg.num_eval)
  train = {k: v[:-n_eval] for k, v in arrays.items()}
  heldout = {k: v[-n_eval:] for k, v in arrays.items()}
  if dcfg.num_corpus:  # plain Austen text rows (training only): every pair is an answer pair
    rows = text_data.load_text_sequences("train", tok, dcfg.seq_len,
                                         max_sequences=int(dcfg.num_corpus),
                                         eos_id=tasks.document_separator(tok))
    plain = cached_target_arrays(lm, params, [{"prompt_ids": [int(r[0])],
                                               "answer_ids": [int(x) for x in r[1:]]}
                                              for r in rows], dcfg, target_sha, pad, log=log)
    train = {k: np.concatenate([train[k], plain[k]]) for k in train}
  feat_s = time.perf_counter() - t
  mask = np.asarray(answer_mask(jnp.asarray(train["prompt_len"]), jnp.asarray(train["length"]),
                                dcfg.seq_len - 1))
  rms = float(np.sqrt((train["hidden"][:, :-1] ** 2).mean(-1)[mask > 0].mean()))
  if not config.logit_window:  # exact evaluation loss: a window covering the longest answer
    longest = int((arrays["length"] - arrays["prompt_len"]).max()) + 1
    config.logit_window = min(dcfg.seq_len - 1, -(-longest // 8) * 8)
  log(f"data: {len(train['tokens'])} train rows ({int(dcfg.num_corpus)} of plain text), "
      f"{n_eval} held-out rows, {int(mask.sum())} train answer pairs, feature RMS {rms:.3f}; "
      f"generation {gen_s:.0f} s, target pass {feat_s:.0f} s")
  counts = np.bincount(np.concatenate([np.asarray(e["answer_ids"], np.int64)
                                       for e in keep[:len(keep) - n_eval]]),
                       minlength=lm.config.vocab_size)
  ranking = dh.token_ranking(counts)  # FR-Spec's order: the target's most emitted tokens first
  out_w = dh.output_weights(params, dh.HeadConfig(lm.config))
  summary = {"target": name, "target_sha256": target_sha, "feature_rms": rms,
             "train_rows": int(len(train["tokens"])), "heldout_rows": n_eval,
             "train_answer_pairs": int(mask.sum()),
             "generation_seconds": gen_s, "target_pass_seconds": feat_s, "variants": {}}
  base_cfg = dh.HeadConfig(lm.config.replace(remat=False, scan_layers=False),
                           feature=config.head.feature,
                           partial_fraction=config.head.partial_fraction)
  trained, best = compare_variants(base_cfg, out_w, train, heldout, config, workdir, summary,
                                   log)
  if config.ship.enabled and best is not None:
    head, hp = trained[best]
    res = summary["variants"][best]
    ship_steps = int(config.ship.get("num_steps", 0))
    if ship_steps and ship_steps != int(config.num_steps):
      # the comparison picks the variant; the shipped head may then get a longer run of it,
      # kept only if it beats the comparison run on the held-out chains
      long_cfg = copy.deepcopy(config)
      long_cfg.num_steps = ship_steps
      hp_long, res_long = train_variant(best, head, out_w, train, heldout, long_cfg,
                                        os.path.join(workdir, f"{best}_{ship_steps}steps"),
                                        log=log)
      summary["ship_run"] = res_long
      if (res_long["heldout_acceptance_bf16"]["expected_accepted"]
          > res["heldout_acceptance_bf16"]["expected_accepted"]):
        hp, res = hp_long, res_long
    meta = {"target": name, "variant": best, "options": VARIANTS[best],
            "trained_by": " ".join(["python -m train.draft_head"] + sys.argv[1:]),
            "steps": res["steps"], "train_rows": summary["train_rows"],
            "heldout_acceptance": res["heldout_acceptance_bf16"],
            "loss": {"w_cls": config.loss.w_cls, "noise": config.loss.noise,
                     "smooth_l1_beta": config.loss.beta}}
    meta["draft_vocab"] = draft_vocab_report(head, hp, out_w, heldout, ranking, config, log)
    summary["draft_vocab"] = meta["draft_vocab"]
    path = registry.repo_path(config.ship.path)
    dh.save_head(path, head, hp, meta, target_name=name, target_sha256=target_sha,
                 ranking=ranking)
    summary["shipped"] = {"path": path, "bytes": artifacts.artifact_bytes(path)}
    log(f"shipped {best} to {path} ({summary['shipped']['bytes']} bytes)")
  summary["total_seconds"] = time.perf_counter() - t_start
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  table = ["variant        top1   accept@1..5                      E[accepted]  tau"]
  for vname, res in summary["variants"].items():
    a = res["heldout_acceptance_bf16"]
    table.append(f"{vname:12s} {a['top1']:.3f}  " + " ".join(
        f"{a[f'accept_at_{j}']:.3f}" for j in range(1, config.eval.depth + 1))
        + f"   {a['expected_accepted']:.3f}     {a['tau']:.3f}")
  if "ship_run" in summary:
    a = summary["ship_run"]["heldout_acceptance_bf16"]
    table.append(f"{best} x {summary['ship_run']['steps']} steps: top1 {a['top1']:.3f}, "
                 f"E[accepted] {a['expected_accepted']:.3f}, tau {a['tau']:.3f}")
  log("\n".join(table))
  return summary


def draft_vocab_report(head: dh.EagleHead, hp, out_w: dict, heldout: dict, ranking: np.ndarray,
                       config: Any, log=print) -> dict:
  """For each reduced draft vocabulary size V' of `config.eval.draft_vocab`: the share of
  held-out answer tokens inside the V' most frequent training-answer tokens (`coverage`)
  and the held-out chain acceptance when drafting from those V' tokens only (bf16-rounded
  parameters, as shipped)."""
  rounded = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), hp)
  t = np.arange(heldout["tokens"].shape[1])[None]
  ans = (t >= heldout["prompt_len"][:, None]) & (t < heldout["length"][:, None])
  answer_tokens = heldout["tokens"][ans]
  out = {"ranking_from": "the target's answers to the training prompts"}
  for n in config.eval.get("draft_vocab", ()):
    ids = ranking[:int(n)]
    inside = np.isin(answer_tokens, ids)
    acc = acceptance(head, rounded, out_w, heldout, config.eval.depth, config.eval.batch_size,
                     draft_ids=ids)
    out[str(int(n))] = {"coverage": float(inside.mean()), "heldout_acceptance": acc}
    log(f"draft vocabulary {int(n)}: coverage {inside.mean():.4f}, top1 {acc['top1']:.3f}, "
        f"tau {acc['tau']:.3f}")
  return out


def validate(config: Any) -> None:
  """Config errors, raised before any model is loaded."""
  unknown = [v for v in config.variants if v not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")


def _run_quietly(config: Any) -> dict:
  logging.set_verbosity(logging.WARNING)  # orbax and the trainer log every save / step at INFO
  return run(config, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  run_script(_run_quietly, validate=validate, print_result=False,
             config_help="draft-head config (configs/eagle_smollm2.py)")

"""DistillSpec: knowledge distillation of a draft model for speculative decoding.

"DistillSpec: Improving Speculative Decoding via Knowledge Distillation" (Zhou et al.,
ICLR 2024). With standard speculative sampling a draft token drawn from q is accepted with
probability sum_v min(p(v), q(v)) = 1 - TVD(p, q), so the speed of speculative decoding is
set by how close the draft q is to the target p *on the prefixes decoding visits*.
DistillSpec trains the draft q_theta against the frozen target p with the loss

    L(theta) = E_(x, y) ~ data [ (1 / |y|) sum_t D(p(. | x, y_<t) || q_theta(. | x, y_<t)) ]

where D is one of FKL, RKL, JSD_beta, TVD (`train.divergences`) and the continuations y
come from a fixed dataset, from the target, or from the draft itself (on-policy). The
paper's key finding is that on-policy, draft-generated data matters most: the draft is
trained on the prefixes it will actually propose from.

Here:
  * the target is any `TransformerLM` (SmolLM2-135M-Instruct in the shipped config), frozen;
  * the draft is either a separate model (`separate_draft`) or the *self-draft*
    (`self_draft`): the target's first k layers + final norm + output head
    (`TransformerLM.truncated`). Only the k layers and the final norm are trained; the
    embedding / tied head stay the target's, so a saved draft stores only the trained
    layers and is rebuilt from the target + that artifact (`save_draft`,
    `models.lm.load_self_draft`);
  * `DistillData` mixes three data sources row by row in every batch: fixed text (the
    `text_corpus` rows of `train.text_data`), target-generated and draft-generated
    (on-policy) continuations of prompts, sampled with the decoding core
    (`decoding.token_loop.decode` + `sample_select`, jitted, fixed shapes) every
    `refresh_every` steps from the *current* draft parameters;
  * the loss is computed on the continuation only, with the target forward inside the
    jitted train step of `train.trainer.Trainer` (optax);
  * `expected_acceptance` measures 1 - E[TVD] (the expected per-token acceptance rate of
    speculative sampling) and greedy agreement (argmax match rate, the acceptance rate of
    greedy speculative decoding), and `monte_carlo_acceptance` checks the first one by
    running the shared verifier (`decoding.speculative.verify.verify_chain`) on drawn draft tokens.

Run `python -m train.distillspec --config=configs/distillspec_smollm2.py [--workdir=DIR]`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from decoding import processors, token_loop
from decoding.speculative import verify  # the verification rule lives only there
from models import artifacts, registry, transformer
from models.lm import SHARED_WITH_TARGET, TransformerLM
from train import (data as data_lib, divergences, experiment, losses, optim, tasks,
                   trainer as trainer_lib)
from train.checkpointing import Checkpointer
from train.script import run_script, start_run

Array = jax.Array

SOURCES = ("fixed", "target", "draft")  # data sources, in the order their rows fill a batch
FROZEN_HEAD = SHARED_WITH_TARGET  # self-draft parameters shared with the target, not trained


# ------------------------------------------------------------------------------ the draft


def self_draft(target_lm: TransformerLM, target_params: Any,
               num_layers: int) -> tuple[TransformerLM, Any, Callable]:
  """The self-draft: the target's first `num_layers` layers, final norm and output head.

  Returns (draft_lm, trainable, assemble): `trainable` holds the parameters distillation
  updates (the k layers and the final norm, initialized from the target's), and
  `assemble(trainable, target_params) -> {"target": target_params, "draft": draft_params}`
  adds the target's embedding (and untied head) to them: the draft's frozen part *is* the
  target's, so nothing is copied and a checkpoint needs only `trainable`.
  """
  draft_lm, dparams = target_lm.truncated(target_params, num_layers)
  trainable = {k: v for k, v in dparams.items() if k not in FROZEN_HEAD}

  def assemble(trainable, target_params):
    head = {k: target_params[k] for k in FROZEN_HEAD if k in target_params}
    return {"target": target_params, "draft": {**head, **trainable}}

  return draft_lm, trainable, assemble


def separate_draft(draft_params: Any) -> tuple[Any, Callable]:
  """A stand-alone draft model, every parameter trained: (trainable, assemble)."""
  return draft_params, lambda trainable, target_params: {"target": target_params,
                                                         "draft": trainable}


# ------------------------------------------------------------------------------ the loss


def continuation_positions(prompt_len: Array, num_new: int, seq_len: int) -> Array:
  """Indices of the logits that predict the continuation tokens: row b's i-th continuation
  token (at `prompt_len[b] + i`) is predicted by the logits at `prompt_len[b] - 1 + i`.
  [B] -> [B, num_new] int32, clipped into [0, seq_len - 1] (masked positions)."""
  idx = prompt_len[:, None] - 1 + jnp.arange(num_new, dtype=jnp.int32)[None]
  return jnp.clip(idx, 0, seq_len - 1).astype(jnp.int32)


def continuation_logits(lm: TransformerLM, params: Any, tokens: Array, prompt_len: Array,
                        num_new: int) -> Array:
  """Full-sequence (cache-free) forward; the output head runs only at the positions that
  predict the continuation. tokens [B, T], prompt_len [B] -> [B, num_new, V] float32."""
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  at = continuation_positions(prompt_len, num_new, T)
  return transformer.forward(params, lm.config, tokens, positions, None,
                             logits_at=at).logits


def distill_loss(target_lm: TransformerLM, draft_lm: TransformerLM, divergence: str = "tvd", *,
                 temperature: float = 1.0, beta: float = 0.5,
                 per_sequence: bool = True) -> losses.LossFn:
  """The DistillSpec loss as a `train.losses` LossFn over params {"target", "draft"}.

  Batch: `tokens [B, T]` (prompt, continuation, padding), `prompt_len [B]` (where the
  continuation starts) and `gen_mask [B, N]` (1 for the continuation's real tokens). The
  loss is `divergences.masked_mean` of D(p_t, q_t) over the continuation (per-sequence mean
  by default, the paper's 1/|y| weighting); the target is run under `stop_gradient`.
  Metrics: `divergence` (= loss), `acceptance` (token mean of sum_v min(p, q) at
  temperature 1, the expected acceptance rate of speculative sampling on these prefixes),
  `greedy_agreement` (argmax match rate) and `tokens` (continuation tokens).
  """
  div = divergences.get(divergence, temperature=temperature, beta=beta)

  def loss_fn(params, batch, key):
    del key
    tokens, prompt_len = batch["tokens"], batch["prompt_len"]
    mask = batch["gen_mask"].astype(jnp.float32)
    N = mask.shape[1]
    t_logits = jax.lax.stop_gradient(
        continuation_logits(target_lm, params["target"], tokens, prompt_len, N))
    d_logits = continuation_logits(draft_lm, params["draft"], tokens, prompt_len, N)
    loss = divergences.masked_mean(div(t_logits, d_logits), mask, per_sequence)
    accept = jax.lax.stop_gradient(divergences.acceptance_probability(t_logits, d_logits))
    agree = (jnp.argmax(t_logits, -1) == jnp.argmax(d_logits, -1)).astype(jnp.float32)
    token_mean = lambda v: divergences.masked_mean(v, mask, per_sequence=False)
    return loss, {"divergence": loss, "acceptance": token_mean(accept),
                  "greedy_agreement": token_mean(agree), "tokens": jnp.sum(mask)}

  return loss_fn


# ------------------------------------------------------------------------------ measurement


@jax.jit
def _position_stats(t_logits: Array, d_logits: Array) -> tuple[Array, Array]:
  accept = divergences.acceptance_probability(t_logits, d_logits)
  agree = (jnp.argmax(t_logits, -1) == jnp.argmax(d_logits, -1)).astype(jnp.float32)
  return accept, agree


def _pad_rows(arr: np.ndarray, rows: int) -> np.ndarray:
  if len(arr) == rows:
    return arr
  pad = np.zeros((rows - len(arr),) + arr.shape[1:], arr.dtype)
  return np.concatenate([arr, pad])


def expected_acceptance(target: TransformerLM, tparams: Any, draft: TransformerLM, dparams: Any,
                        sequences, mask=None, *, temperature: float = 1.0,
                        batch_size: int = 8, mc_samples: int = 0, seed: int = 0) -> dict:
  """How well a draft would do in speculative decoding on the prefixes of `sequences`.

  sequences: [N, T] int32 token rows; mask: [N, T] aligned with the tokens, in the
  `train.losses` convention (`mask[n, t] > 0`: count the position that predicts
  `sequences[n, t]` from `sequences[n, :t]`); default: every position but column 0.
  Both models see the same prefixes; the logits are divided by `temperature`.

  Returns token-weighted means over the counted positions:
    `acceptance`: sum_v min(p(v), q(v)) = 1 - TVD(p, q), the probability that standard
      speculative sampling accepts a token drawn from q (the DistillSpec identity);
    `tvd` = 1 - acceptance;
    `greedy_agreement`: argmax q == argmax p, the acceptance rate of greedy speculative
      decoding;
    `positions`: how many positions were counted;
    `mc_acceptance` (only with `mc_samples > 0`): the acceptance rate measured by drawing
      `mc_samples` draft tokens per position and running the shared verifier
      (`monte_carlo_acceptance`).
  """
  seqs = np.asarray(sequences, np.int32)
  if seqs.ndim != 2:
    raise ValueError(f"sequences must be [N, T], got shape {seqs.shape}")
  if mask is None:
    mask = np.ones(seqs.shape, np.float32)
    mask[:, 0] = 0.0
  mask = np.asarray(mask, np.float32)
  if mask.shape != seqs.shape:
    raise ValueError(f"mask shape {mask.shape} differs from sequences shape {seqs.shape}")
  n = len(seqs)
  bs = min(int(batch_size), n)
  sums = {"acceptance": 0.0, "greedy_agreement": 0.0, "mc_acceptance": 0.0}
  weight = 0.0
  key = jax.random.key(seed)
  for start in range(0, n, bs):
    rows = min(bs, n - start)
    tok = jnp.asarray(_pad_rows(seqs[start:start + bs], bs))
    w = _pad_rows(mask[start:start + bs], bs)[:, 1:]  # the logits at t predict token t + 1
    t_logits = losses.sequence_logits(tparams, target.config, tok)[:, :-1] / temperature
    d_logits = losses.sequence_logits(dparams, draft.config, tok)[:, :-1] / temperature
    accept, agree = jax.device_get(_position_stats(t_logits, d_logits))
    sums["acceptance"] += float(np.sum(accept * w))
    sums["greedy_agreement"] += float(np.sum(agree * w))
    if mc_samples > 0:
      key, sub = jax.random.split(key)
      flat_w = w.reshape(-1)
      rate = monte_carlo_acceptance(t_logits.reshape(-1, t_logits.shape[-1]),
                                    d_logits.reshape(-1, d_logits.shape[-1]), sub, mc_samples)
      sums["mc_acceptance"] += float(np.sum(np.asarray(rate) * flat_w))
    weight += float(np.sum(w[:rows]))
  weight = max(weight, 1e-9)
  out = {"acceptance": sums["acceptance"] / weight, "greedy_agreement":
         sums["greedy_agreement"] / weight, "positions": int(round(weight))}
  out["tvd"] = 1.0 - out["acceptance"]
  if mc_samples > 0:
    out["mc_acceptance"] = sums["mc_acceptance"] / weight
  return out


def monte_carlo_acceptance(target_logits: Array, draft_logits: Array, key: Array,
                           num_samples: int) -> Array:
  """Per-position acceptance rate of single-token speculative sampling, by simulation.

  target_logits, draft_logits: [M, V] (already processed: temperature etc.). For each of
  `num_samples` rounds a token d ~ q is drawn per position and judged by the shared verifier
  `decoding.speculative.verify.verify_chain` (block length 1, sampling mode); returns the fraction of
  rounds in which d was accepted, [M] float32. Its expectation is sum_v min(p, q).
  """
  keys = jax.random.split(key, int(num_samples))
  return _monte_carlo(jnp.asarray(target_logits, jnp.float32),
                      jnp.asarray(draft_logits, jnp.float32), keys)


@jax.jit
def _monte_carlo(target_logits: Array, draft_logits: Array, keys: Array) -> Array:
  """Mean over the rounds (one per key, run one after another) of `_accepted_once`."""
  def body(total, k):
    return total + _accepted_once(target_logits, draft_logits, k), None
  total, _ = jax.lax.scan(body, jnp.zeros(target_logits.shape[:1], jnp.float32), keys)
  return total / keys.shape[0]


def _accepted_once(target_logits: Array, draft_logits: Array, key: Array) -> Array:
  """One round of `monte_carlo_acceptance`: [M, V], [M, V] -> [M] float32 (1 = accepted)."""
  M = target_logits.shape[0]
  k_draw, k_verify = jax.random.split(key)
  q_probs = jax.nn.softmax(draft_logits, axis=-1)
  d = jax.random.categorical(k_draw, draft_logits, axis=-1).astype(jnp.int32)  # [M]
  keys = jax.random.key_data(jax.random.split(k_verify, M))
  verdict = verify.verify_chain(jnp.stack([target_logits, target_logits], axis=1), d[:, None],
                                q_probs[:, None], keys, sample=True)
  return (verdict.num_accepted >= 1).astype(jnp.float32)


# ------------------------------------------------------------------------------ prompts


_TEMPLATES = (
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "Give me three interesting facts about {}.",
    "What are the advantages and disadvantages of {}?",
    "Write a short poem about {}.",
    "Describe {} in one paragraph.",
    "How would you teach a beginner about {}?",
    "What is the history of {}?",
    "List five questions a curious student might ask about {}.",
    "Why do people care about {}?",
    "Write a friendly email inviting a friend to a talk about {}.",
    "What are common misconceptions about {}?",
    "Compare {} with something from everyday life.",
    "Write a haiku about {}.",
    "Give a step-by-step plan to learn about {}.",
    "Write a dialogue between two people discussing {}.",
)

_SUBJECTS = (
    "the ocean", "volcanoes", "honeybees", "the moon", "rainbows", "chess", "bicycles",
    "photosynthesis", "the water cycle", "black holes", "gardening", "baking bread",
    "the Roman Empire", "electric cars", "recycling", "the human heart", "dinosaurs",
    "coffee", "mountains", "friendship", "libraries", "the internet", "solar panels",
    "penguins", "jazz music", "the printing press", "earthquakes", "vaccines", "deserts",
    "origami", "trains", "the stock market", "clouds", "octopuses", "the piano",
    "public parks", "climate change", "robots", "the pyramids", "sleep", "tea",
    "lighthouses", "forests", "airplanes", "bridges", "the immune system", "winter",
    "board games", "wolves", "the alphabet", "maps", "comets", "rivers", "museums",
    "bees and flowers", "swimming", "the telescope", "cats", "dogs", "spices", "glaciers",
    "hot air balloons", "kindness", "time zones", "the violin", "coral reefs", "deserts at night",
    "thunderstorms", "old castles", "ants", "the periodic table", "marathons", "postcards",
    "windmills", "owls", "islands", "fireflies", "the Olympic Games", "bamboo", "puzzles",
)


def chat_prompt_texts(num: int, split: str, seed: int = 0, heldout_fraction: float = 0.25
                      ) -> list[str]:
  """`num` deterministic chat prompts ("template" x "subject") for `split` "train" or
  "heldout". The subjects are divided once by a seeded permutation, so held-out prompts
  never share a subject with training prompts; within a split the (template, subject)
  pairs are drawn without replacement with a seeded generator."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  order = np.random.default_rng([seed, 101]).permutation(len(_SUBJECTS))
  n_held = max(1, int(round(heldout_fraction * len(_SUBJECTS))))
  subjects = [_SUBJECTS[i] for i in (order[:n_held] if split == "heldout" else order[n_held:])]
  pairs = [(t, s) for s in subjects for t in _TEMPLATES]
  if num > len(pairs):
    raise ValueError(f"only {len(pairs)} {split} prompts exist, {num} requested")
  pick = np.random.default_rng([seed, 103, split == "heldout"]).permutation(len(pairs))[:num]
  return [pairs[i][0].format(pairs[i][1]) for i in pick]


def pad_prompts(ids: Sequence[Sequence[int]], pad_id: int, length: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to [N, length] (0: the longest, rounded up to a multiple of 16);
  returns (prompts int32, prompt_len int32)."""
  longest = max(len(x) for x in ids)
  if length <= 0:
    length = -(-longest // 16) * 16
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than prompt_len={length}")
  out = np.full((len(ids), length), pad_id, np.int32)
  for i, x in enumerate(ids):
    out[i, :len(x)] = x
  return out, np.asarray([len(x) for x in ids], np.int32)


# ------------------------------------------------------------------------------ data


def join_continuations(prompts: np.ndarray, prompt_len: np.ndarray, gen: np.ndarray,
                       gen_len: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
  """Training rows from right-padded prompts [B, P] and continuations [B, N]: tokens
  [B, P + N] (row b: its prompt, its gen_len[b] generated tokens, then pad_id), prompt_len
  [B] and gen_mask [B, N] (1 for the generated tokens)."""
  B, P = prompts.shape
  N = gen.shape[1]
  t = np.arange(P + N)[None]
  rel = t - prompt_len[:, None]
  from_prompt = t < prompt_len[:, None]
  from_gen = (rel >= 0) & (rel < gen_len[:, None])
  gen_vals = np.take_along_axis(gen, np.clip(rel, 0, N - 1), axis=1)
  prompt_vals = np.take_along_axis(prompts, np.clip(t, 0, P - 1).repeat(B, 0), axis=1)
  tokens = np.where(from_prompt, prompt_vals, np.where(from_gen, gen_vals, pad_id))
  gen_mask = (np.arange(N)[None] < gen_len[:, None]).astype(np.float32)
  return {"tokens": tokens.astype(np.int32), "prompt_len": prompt_len.astype(np.int32),
          "gen_mask": gen_mask}


def _processor(temperature: float) -> processors.Chain:
  """The sampler's processor (a value: equal temperatures share one compiled loop)."""
  return processors.warpers(temperature if temperature not in (0.0, 1.0) else 1.0, 0, 1.0, 0.0)


class ContinuationSampler:
  """Continuations of prompts from a model with the token loop (jitted `token_loop.decode`,
  one compile per shape): ancestral sampling at `temperature` (`token_loop.sample_select`),
  or greedy when `temperature == 0`. Rows stop at an EOS id (kept, and counted)."""

  def __init__(self, lm: TransformerLM, max_new_tokens: int, eos_ids: Sequence[int],
               pad_id: int, temperature: float = 1.0):
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    self.lm = lm
    self.max_new_tokens = int(max_new_tokens)
    self.eos_ids = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    self.pad_id = int(pad_id)
    # built once: processor and selector are static arguments of the jitted loop
    self.processor = _processor(float(temperature))
    self.select = token_loop.greedy_select if temperature == 0 else token_loop.sample_select

  def __call__(self, params: Any, prompts: np.ndarray, prompt_len: np.ndarray,
               row_keys: Array) -> dict[str, np.ndarray]:
    """prompts [B, P], prompt_len [B], row_keys [B, 2] uint32 -> `join_continuations` rows."""
    P = prompts.shape[1]
    res = token_loop.decode(self.lm, params, jnp.asarray(prompts), jnp.asarray(prompt_len),
                            row_keys, self.eos_ids, processor=self.processor,
                            select=self.select, pad_id=self.pad_id,
                            max_new_tokens=self.max_new_tokens,
                            cache_len=P + self.max_new_tokens)
    gen, gen_len = jax.device_get((res.tokens, res.lengths))
    return join_continuations(np.asarray(prompts), np.asarray(prompt_len), np.asarray(gen),
                              np.asarray(gen_len), self.pad_id)


def source_rows(batch_size: int, mix: Mapping[str, float]) -> dict[str, int]:
  """Rows of each source in a batch of `batch_size` from the mixture fractions (largest
  remainder rounding, so the counts sum to batch_size and a source with a fraction > 0 and
  at least half a row gets rows)."""
  unknown = set(mix) - set(SOURCES)
  if unknown:
    raise ValueError(f"unknown data sources {sorted(unknown)}; choose from {SOURCES}")
  fr = np.asarray([float(mix.get(s, 0.0)) for s in SOURCES])
  if fr.min() < 0 or fr.sum() <= 0:
    raise ValueError(f"mixture fractions must be >= 0 and not all zero, got {dict(mix)}")
  exact = fr / fr.sum() * batch_size
  rows = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - rows), kind="stable")[:batch_size - rows.sum()]:
    rows[i] += 1
  return {s: int(r) for s, r in zip(SOURCES, rows)}


class DistillData:
  """Batches for `Trainer.fit` mixing the three sources row by row (`source_rows`).

  * fixed: `fixed_rows [M, P + N]` text rows; the first P tokens are the prompt, the last N
    the continuation the loss sees (shuffled epoch by epoch, `train.data.ArrayData`);
  * target / draft: continuations of `prompts` sampled from the target / the current draft.
    Every `refresh_every` steps the rows for the next `refresh_every` steps are generated
    in one call (one decode over rows x refresh_every rows), from the draft parameters of
    that moment (`set_trainable`, called by the trainer hook `hook`), then consumed in
    order. refresh_every = 1 is fully on-policy.

  The prompts and sampling keys of a window are functions of (seed, source, window), so a
  batch is a function of the step and of the draft parameters at its window's start (a run
  resumed in the middle of a window regenerates that window from the restored parameters).
  """

  def __init__(self, *, batch_size: int, mix: Mapping[str, float], prompts: np.ndarray,
               prompt_len: np.ndarray, draft_sampler: Optional[ContinuationSampler] = None,
               target_sampler: Optional[ContinuationSampler] = None,
               draft_params_fn: Optional[Callable[[Any], Any]] = None,
               target_params: Any = None, fixed_rows: Optional[np.ndarray] = None,
               refresh_every: int = 1, seed: int = 0):
    self.rows = source_rows(batch_size, mix)
    self.prompts, self.prompt_len = np.asarray(prompts, np.int32), np.asarray(prompt_len, np.int32)
    self.samplers = {"draft": draft_sampler, "target": target_sampler}
    self.draft_params_fn = draft_params_fn
    self.target_params = target_params
    self.refresh_every = int(refresh_every)
    if self.refresh_every < 1:
      raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
    self.seed = int(seed)
    self.trainable = None
    self._pools: dict[str, tuple[int, dict]] = {}
    self.generation_seconds = 0.0
    P = self.prompts.shape[1]
    for src in ("target", "draft"):
      if self.rows[src] and self.samplers[src] is None:
        raise ValueError(f"data source {src!r} has rows but no sampler")
    N = next((s.max_new_tokens for s in self.samplers.values() if s is not None), None)
    self.fixed = None
    if self.rows["fixed"]:
      if fixed_rows is None:
        raise ValueError("data source 'fixed' has rows but no fixed_rows")
      if N is not None and fixed_rows.shape[1] != P + N:
        raise ValueError(f"fixed rows have {fixed_rows.shape[1]} tokens, the generated rows "
                         f"{P + N} (prompt_len + max_new_tokens)")
      self.fixed = data_lib.ArrayData({"tokens": np.asarray(fixed_rows, np.int32)},
                                      self.rows["fixed"], seed=self.seed)
      self.fixed_prompt_len = P

  def set_trainable(self, trainable: Any) -> None:
    self.trainable = trainable

  def hook(self, step: int, state: Any, record: Optional[dict]) -> None:
    """`Trainer.fit` hook: the next batches are generated from the updated draft."""
    del step, record
    self.trainable = state.params

  def _window_rows(self, src: str, window: int) -> dict[str, np.ndarray]:
    n = self.rows[src] * self.refresh_every
    salt = SOURCES.index(src)
    rng = np.random.default_rng([self.seed, 211, salt, window])
    idx = rng.choice(len(self.prompts), n, replace=n > len(self.prompts))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), salt), window)
    row_keys = jax.random.key_data(jax.random.split(key, n))
    if src == "draft":
      if self.trainable is None or self.draft_params_fn is None:
        raise ValueError("on-policy data needs the draft parameters (set_trainable)")
      params = self.draft_params_fn(self.trainable)
    else:
      params = self.target_params
    t = time.perf_counter()
    rows = self.samplers[src](params, self.prompts[idx], self.prompt_len[idx], row_keys)
    self.generation_seconds += time.perf_counter() - t
    return rows

  def batch(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    window, offset = divmod(step, self.refresh_every)
    parts = []
    for src in SOURCES:
      n = self.rows[src]
      if not n:
        continue
      if src == "fixed":
        tokens = self.fixed.batch(step)["tokens"]
        N = tokens.shape[1] - self.fixed_prompt_len
        parts.append({"tokens": tokens,
                      "prompt_len": np.full((n,), self.fixed_prompt_len, np.int32),
                      "gen_mask": np.ones((n, N), np.float32)})
        continue
      if self._pools.get(src, (None,))[0] != window:
        self._pools[src] = (window, self._window_rows(src, window))
      pool = self._pools[src][1]
      parts.append({k: v[offset * n:(offset + 1) * n] for k, v in pool.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def loss_mask_of(rows: Mapping[str, np.ndarray]) -> np.ndarray:
  """The `train.losses`-style mask [B, T] (aligned with the tokens) of `join_continuations`
  rows: 1 at the generated tokens."""
  tokens, pl, gm = rows["tokens"], rows["prompt_len"], rows["gen_mask"]
  B, T = tokens.shape
  N = gm.shape[1]
  rel = np.arange(T)[None] - pl[:, None]
  inside = (rel >= 0) & (rel < N)
  return np.where(inside, np.take_along_axis(gm, np.clip(rel, 0, N - 1), axis=1),
                  0.0).astype(np.float32)


# ------------------------------------------------------------------------------ checkpoints


def save_draft(directory: str, trainable: Any, draft_lm: TransformerLM, *, target_name: str,
               target_sha256: str, target_config, info: Optional[dict] = None) -> str:
  """Writes a `self_draft` artifact (`models.artifacts`), read back by
  `models.lm.load_self_draft`: only the trained layers and final norm (stacked-layer
  layout, separate projections), config {"num_layers", "trained"}, the target it was trained for (`target_name`,
  `target_sha256` = its `LoadedModel.sha256`, the architecture of `target_config`) and
  free-form `info` (the training settings and results). Replaces an earlier draft there."""
  tree = trainable
  if draft_lm.config.matmul_kernel == "packed":  # stored as plain [K, N] matrices
    tree = transformer.unpack_params(tree, draft_lm.config)
  if draft_lm.config.fused_projections:  # stored with the separate projections
    tree = transformer.unfuse_projections(tree, draft_lm.config)
  if not draft_lm.config.scan_layers:
    tree = transformer.stack_layers(tree, draft_lm.config.num_layers)
  return artifacts.save_artifact(
      directory, "self_draft", tree,
      config={"num_layers": int(draft_lm.config.num_layers), "trained": sorted(tree)},
      target=artifacts.target_entry(target_name, target_sha256, target_config), info=info)


# ------------------------------------------------------------------------------ the run


def validate(config: Any) -> None:
  """Config errors, raised before any model is loaded."""
  optim.validate(config.optimizer)
  d = config.distillspec
  if d.divergence not in divergences.DIVERGENCES:
    raise ValueError(f"unknown divergence {d.divergence!r}; choose from "
                     f"{sorted(divergences.DIVERGENCES)}")
  if d.divergence == "jsd" and not 0.0 < d.jsd_beta < 1.0:
    raise ValueError(f"jsd_beta must be in (0, 1), got {d.jsd_beta}")
  if not d.temperature > 0:
    raise ValueError(f"distillspec.temperature must be > 0, got {d.temperature}")
  if d.sample_temperature < 0:
    raise ValueError(f"sample_temperature must be >= 0, got {d.sample_temperature}")
  if d.num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {d.num_layers}")
  sets = [n.strip() for n in d.eval_sets.split(",") if n.strip()]
  if not sets or set(sets) - {"sampled", "greedy"}:
    raise ValueError(f"distillspec.eval_sets must list 'sampled' and/or 'greedy', got "
                     f"{d.eval_sets!r}")
  if d.reduction not in ("sequence", "token"):
    raise ValueError(f"distillspec.reduction must be 'sequence' or 'token', got {d.reduction!r}")
  if d.prompts not in ("chat", "synthetic"):
    raise ValueError(f"distillspec.prompts must be 'chat' or 'synthetic', got {d.prompts!r}")
  source_rows(config.batch_size, dict(d.mix))
  for name in ("gen_len", "refresh_every", "num_train_prompts", "num_eval_prompts"):
    if int(d[name]) < 1:
      raise ValueError(f"distillspec.{name} must be >= 1, got {d[name]}")
  if config.num_steps < 1:
    raise ValueError("set num_steps >= 1")
  if config.grad_accum != 1 and config.batch_size % config.grad_accum:
    raise ValueError("batch_size must be divisible by grad_accum")


def _prompt_set(d: Any, model, split: str, num: int, seed: int, pad_id: int):
  """(prompts [N, P], prompt_len [N]) for training ('train') or measurement ('heldout')."""
  if d.prompts == "chat":
    if model.tokenizer is None:
      raise ValueError("chat prompts need a model with a tokenizer (or prompts='synthetic')")
    texts = chat_prompt_texts(num, split, seed)
    ids = [model.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    return pad_prompts(ids, pad_id, int(d.prompt_len))
  P = int(d.prompt_len) or 16
  rows = tasks.synthetic_sequences(num, P, model.config.vocab_size,
                                   seed=seed * 10 + (0 if split == "train" else 1),
                                   chain_seed=seed)
  lengths = np.random.default_rng([seed, 307, split == "train"]).integers(
      max(1, P // 2), P + 1, num).astype(np.int32)
  return rows, lengths


# distillspec settings that do not change the trained draft (left out of the fingerprint)
_VOLATILE = ("num_eval_prompts", "eval_gen_len", "eval_sets", "mc_samples", "save_name",
             "save_dir")


def fingerprint(config: Any) -> str:
  """`train.experiment.fingerprint` without the measurement / output settings, so a run
  resumes after those change but not after a change of what is trained."""
  c = config.copy_and_resolve_references()
  for name in _VOLATILE:
    if name in c.distillspec:
      del c.distillspec[name]
  return experiment.fingerprint(c)


def run(config: Any, workdir: str, progress: bool = True) -> dict:
  """Distills the self-draft of `config.model` and saves it; returns the results dict
  (also written to `workdir/results.json`, with per-step metrics in `metrics.jsonl`)."""
  validate(config)
  d = config.distillspec
  t_start = time.perf_counter()
  workdir, target, eos, pad_id = start_run(config, workdir)
  tok = target.tokenizer
  draft_lm, trainable, assemble = self_draft(target.lm, target.params, d.num_layers)
  N = int(d.gen_len)

  prompts, prompt_len = _prompt_set(d, target, "train", d.num_train_prompts, config.seed, pad_id)
  P = prompts.shape[1]
  mix = dict(d.mix)
  fixed_rows = None
  if float(mix.get("fixed", 0.0)) > 0:
    dcfg = config.data
    dcfg.seq_len = P + N
    if dcfg.source == "synthetic" and not dcfg.get("vocab_size", 0):
      dcfg.vocab_size = target.config.vocab_size
    fixed_rows = tasks.text_sequences(dcfg, tok, dcfg.split, dcfg.num_train, config.seed)
  sampler = lambda lm, temp: ContinuationSampler(lm, N, eos, pad_id, temp)
  draft_full = lambda tr: assemble(tr, target.params)["draft"]
  data = DistillData(batch_size=config.batch_size, mix=mix, prompts=prompts,
                     prompt_len=prompt_len, draft_sampler=sampler(draft_lm, d.sample_temperature),
                     target_sampler=sampler(target.lm, d.sample_temperature),
                     draft_params_fn=draft_full, target_params=target.params,
                     fixed_rows=fixed_rows, refresh_every=d.refresh_every, seed=config.seed)

  # Held-out measurement rows: target continuations of held-out prompts (the prefixes
  # speculative decoding visits), sampled at temperature 1 and/or greedy. Deterministic
  # (fixed keys), so a resumed run measures on the same rows; saved for inspection.
  names = [n.strip() for n in d.eval_sets.split(",") if n.strip()]
  hp, hl = _prompt_set(d, target, "heldout", d.num_eval_prompts, config.seed, pad_id)
  ekey = jax.random.key_data(jax.random.split(jax.random.key(config.seed + 7919), len(hp)))
  eval_sets = {}
  for name, temp in (("sampled", 1.0), ("greedy", 0.0)):
    if name in names:
      rows = ContinuationSampler(target.lm, int(d.eval_gen_len), eos, pad_id, temp)(
          target.params, hp, hl, ekey)
      eval_sets[name] = {"tokens": rows["tokens"], "mask": loss_mask_of(rows)}
  np.savez(os.path.join(workdir, "eval_rows.npz"),
           **{f"{n}_{k}": v for n, s in eval_sets.items() for k, v in s.items()})

  def report(trainable_params) -> dict:
    dparams = draft_full(trainable_params)
    out = {}
    for name, s in eval_sets.items():
      out[name] = expected_acceptance(target.lm, target.params, draft_lm, dparams, s["tokens"],
                                      s["mask"], batch_size=config.eval_batch_size,
                                      mc_samples=int(d.mc_samples) if name == "sampled" else 0,
                                      seed=config.seed)
    return out

  num_steps = int(config.num_steps)
  optimizer = optim.make_optimizer(config.optimizer, num_steps)
  loss_fn = distill_loss(target.lm, draft_lm, d.divergence, temperature=d.temperature,
                         beta=d.jsd_beta, per_sequence=d.reduction == "sequence")
  trainer = trainer_lib.Trainer(loss_fn, optimizer, assemble=assemble,
                                grad_accum=config.grad_accum,
                                schedule=optim.make_schedule(config.optimizer, num_steps))
  results_path = os.path.join(workdir, "results.json")
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  if "before" not in results:
    t = time.perf_counter()
    results["before"] = report(trainable)
    logging.info("before: %s (%.1f s)", results["before"], time.perf_counter() - t)
    with open(results_path, "w") as f:
      json.dump(results, f, indent=1)

  state = trainer.init_state(trainable, jax.random.key(config.seed))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir):  # the on-policy source needs the resumed draft before fit
    ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
      state, _ = ckpt.restore(state)
    ckpt.close()
  data.set_trainable(state.params)
  fp = fingerprint(config)
  t_train = time.perf_counter()
  state = trainer.fit(state, target.params, data, num_steps, workdir=workdir,
                      checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                      keep=config.keep_checkpoints, progress=progress, hooks=(data.hook,),
                      meta={"task": "distillspec", "num_steps": num_steps, "fingerprint": fp})
  results["train_seconds"] = time.perf_counter() - t_train
  results["generation_seconds"] = data.generation_seconds
  if tok is not None and data.rows["draft"]:  # what the draft wrote in the last window
    rows = data._pools["draft"][1]
    results["draft_samples"] = [
        tok.decode(rows["tokens"][i, rows["prompt_len"][i]:rows["prompt_len"][i] + int(
            rows["gen_mask"][i].sum())].tolist()) for i in range(min(3, len(rows["tokens"])))]
  results["steps"] = num_steps
  t = time.perf_counter()
  results["after"] = report(state.params)
  logging.info("after: %s (%.1f s)", results["after"], time.perf_counter() - t)
  results["settings"] = {
      "num_layers": int(d.num_layers), "divergence": d.divergence, "jsd_beta": d.jsd_beta,
      "temperature": d.temperature, "sample_temperature": d.sample_temperature,
      "mix": data.rows, "refresh_every": d.refresh_every, "gen_len": N, "prompt_len": P,
      "batch_size": config.batch_size, "learning_rate": config.optimizer.learning_rate}
  if d.save_name:
    out_dir = d.save_dir or registry.artifact_dir(d.save_name)
    save_draft(out_dir, state.params, draft_lm, target_name=config.model.name,
               target_sha256=target.sha256, target_config=target.config,
               info={"config": d.to_dict(), "steps": num_steps, "before": results["before"],
                     "after": results["after"], "fingerprint": fp})
    results["draft_path"] = out_dir
  results["total_seconds"] = time.perf_counter() - t_start
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  run_script(run, validate=validate,
             run_name=lambda c: c.distillspec.save_name or "distillspec")

"""Reinforcement learning from verifiable rewards on the arithmetic word problems: one loop,
three objectives (GRPO, DAPO, DCPO; `train.policy_loss`).

    python -m train.rl --config=configs/rl_smollm2.py --config.rl.objective=dcpo --workdir=DIR

Each iteration:

1. rollout: the next `prompts_per_iteration` problems of the training pool (a seeded
   permutation per pass, so the stream is a function of its position) are sampled G times
   each with the library's sampling strategy (`decoding.sampling.Sample`, temperature 1, no
   filtering, per-row keys from the run seed, the iteration and the problem), jitted and
   batched as decoding always is;
2. reward: 1 when the last number of the response equals the answer, else 0 (no format
   reward); DAPO adds its overlong shaping: 0 up to `max_new_tokens − overlong_buffer`
   tokens, falling linearly to −`overlong_penalty` at the limit, −`overlong_penalty` for a
   response cut off there;
3. DAPO's dynamic sampling draws further problems until `prompts_per_iteration` groups with
   unequal rewards are found (at most `max_sampling_rounds` rollouts; a short batch is
   padded with rows that carry no loss, so every update has one compiled shape);
4. advantages per group (`train.advantages`): GRPO/DAPO standardise within the group, DCPO
   with its running per-prompt statistics, which live in the checkpoint;
5. log-probs of the sampled tokens under the rollout policy (π_old) and, with a KL term,
   the initial policy, teacher-forced in one jitted pass;
6. `ppo_epochs` passes over the batch in `minibatch_size` rows, one optimizer update each
   (`train.trainer.Trainer.train_step`; LoRA or full fine-tuning).

Before the first iteration an optional supervised warm-up (`rl.warmup_steps` updates of
next-token loss on the training pool's reference solutions, `arithmetic.Problem.solution_text`)
teaches the answer format, so that enough sampled responses earn a reward to learn from; the
RL optimizer then starts fresh from the warmed-up parameters.

Every `eval_every` iterations the greedy accuracy on held-out problems (none of them in the
training pool) is measured. `workdir/metrics.jsonl` gets one "train" record per iteration
(reward, accuracy, response utilisation = share of the sampled responses whose advantage
is non-zero, token clipping ratio, dual-clip ratio, KL, entropy, lengths, rollout and
update seconds) and the "eval" records; checkpoints hold the train state, the prompt
statistics and the stream position, so a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from decoding.answers import last_number
from decoding.greedy import Greedy
from decoding.lengths import bucket
from decoding.runner import generate
from decoding.sampling import Sample
from decoding.strategy import Target
from models.datasets import arithmetic
from train import advantages as adv_lib
from train import experiment, lora, losses, optim, policy_loss
from train import trainer as trainer_lib
from train.checkpointing import Checkpointer
from train.script import run_script, start_run

EVAL_SEED_OFFSET = 7  # held-out problems come from seed + this; the pool excludes them
LENGTH_STEP = 32


# ------------------------------------------------------------------------------ problems


def problem_sets(config: Any) -> tuple[list[arithmetic.Problem], list[arithmetic.Problem]]:
  """(training pool, held-out problems), drawn with `rl.data_seed` (not the run seed, so
  every seed of a comparison trains and is measured on the same problems): the pool drops
  any question that is held out or that the library's reasoning evaluations use
  (`arithmetic.problems(n, seed=0)`)."""
  r = config.rl
  seed = int(r.data_seed)
  held = arithmetic.problems(int(r.num_eval_problems), seed=seed + EVAL_SEED_OFFSET)
  taken = {p.question for p in held} | {p.question for p in arithmetic.problems(512, seed=0)}
  pool, k = [], 0
  while len(pool) < int(r.num_train_problems):
    batch = arithmetic.problems(int(r.num_train_problems) * 2 + k, seed=seed + 1)
    pool = [p for p in batch if p.question not in taken][:int(r.num_train_problems)]
    k += int(r.num_train_problems)
  return pool, held


def prompt_stream(num_problems: int, seed: int, start: int, count: int) -> np.ndarray:
  """Pool indices at stream positions start .. start + count − 1: pass e visits the pool in
  the order of a permutation seeded by (seed, e)."""
  out = []
  for pos in range(start, start + count):
    e, i = divmod(pos, num_problems)
    out.append(int(np.random.default_rng([seed, 1009, e]).permutation(num_problems)[i]))
  return np.asarray(out, np.int64)


def reward(text: str, problem: arithmetic.Problem) -> float:
  """The verifiable reward: 1 if the response's last number is the answer, else 0."""
  return 1.0 if arithmetic.is_correct(last_number(text), problem) else 0.0


def overlong_shaping(lengths: np.ndarray, finished: np.ndarray, max_new: int, buffer: int,
                     penalty: float) -> np.ndarray:
  """DAPO's soft overlong punishment per response (0 when `buffer` is 0)."""
  if not buffer:
    return np.zeros(len(lengths), np.float32)
  soft = np.clip((max_new - buffer - lengths) / buffer, -1.0, 0.0) * penalty
  return np.where(finished, soft, -penalty).astype(np.float32)


# ------------------------------------------------------------------------------- pieces


@dataclasses.dataclass
class Groups:
  """Sampled responses of some prompts, G each, rows grouped by prompt (host arrays)."""
  prompt_ids: np.ndarray  # [P] pool indices
  tokens: np.ndarray  # [P * G, T] prompt + response, right-padded
  mask: np.ndarray  # [P * G, T] 1.0 on response tokens (EOS included)
  rewards: np.ndarray  # [P, G] verifiable reward
  shaped: np.ndarray  # [P, G] reward + overlong shaping (what the advantage sees)
  lengths: np.ndarray  # [P * G] response tokens
  finished: np.ndarray  # [P * G] ended with EOS

  def take(self, keep: np.ndarray) -> "Groups":
    G = self.rewards.shape[1]
    rows = (keep[:, None] * G + np.arange(G)[None]).reshape(-1)
    return Groups(self.prompt_ids[keep], self.tokens[rows], self.mask[rows], self.rewards[keep],
                  self.shaped[keep], self.lengths[rows], self.finished[rows])

  @staticmethod
  def concat(parts: list["Groups"]) -> "Groups":
    return Groups(*[np.concatenate([getattr(p, f.name) for p in parts])
                    for f in dataclasses.fields(Groups)])


class RolloutPolicy:
  """Samples groups and scores them (the rollout half of an iteration)."""

  def __init__(self, config: Any, target: Target, pool, prompts: list[list[int]],
               total_len: int, reward_fn: Callable[[str, Any], float] = reward):
    r = config.rl
    self.config, self.target, self.pool, self.prompts = config, target, pool, prompts
    self.reward_fn = reward_fn
    self.G, self.max_new, self.T = int(r.group_size), int(r.max_new_tokens), total_len
    self.settings = Sample(temperature=float(r.temperature), top_k=0, top_p=1.0,
                           max_new_tokens=self.max_new, num_return_sequences=self.G)
    self.obj = policy_loss.objective(r.objective, **dict(r.objective_overrides))
    self.batch_size = int(r.rollout_batch_size)

  def sample(self, params, prompt_ids: np.ndarray, seed: int) -> Groups:
    target = dataclasses.replace(self.target, params=params)
    gens = generate(target, [self.prompts[i] for i in prompt_ids], self.settings, seed=seed,
                    batch_size=self.batch_size * self.G, row_ids=[int(i) for i in prompt_ids])
    tok = self.target.tokenizer
    P, G, T = len(prompt_ids), self.G, self.T
    tokens = np.full((P * G, T), self.target.pad_id, np.int32)
    mask = np.zeros((P * G, T), np.float32)
    rewards = np.zeros((P, G), np.float32)
    lengths, finished = np.zeros(P * G, np.int32), np.zeros(P * G, bool)
    for n, g in enumerate(gens):  # prompt n // G, its samples in order
      p = len(g.prompt_ids)
      out = list(g.output_ids)
      tokens[n, :p], tokens[n, p:p + len(out)] = g.prompt_ids, out
      mask[n, p:p + len(out)] = 1.0
      lengths[n], finished[n] = len(out), g.finished
      rewards[n // G, n % G] = self.reward_fn(tok.decode(out, skip_special_tokens=True),
                                              self.pool[prompt_ids[n // G]])
    shaped = rewards + overlong_shaping(lengths, finished, self.max_new, self.obj.overlong_buffer,
                                        self.obj.overlong_penalty).reshape(P, G)
    return Groups(prompt_ids, tokens, mask, rewards, shaped, lengths, finished)


def logprob_fn(config):
  """Jitted (params, tokens [N, T]) -> log p(token t | < t) [N, T] (column 0 is 0)."""
  @jax.jit
  def fn(params, tokens):
    return losses.token_logprobs(losses.sequence_logits(params, config, tokens), tokens)
  return fn


def batched_logprobs(fn, params, tokens: np.ndarray, rows: int) -> np.ndarray:
  """`fn` over `rows` rows at a time (the [rows, T, V] logits bound the memory)."""
  out = [np.asarray(fn(params, jnp.asarray(tokens[i:i + rows])))
         for i in range(0, len(tokens), rows)]
  return np.concatenate(out)


def iteration_seed(seed: int, iteration: int, round_: int) -> int:
  return int(np.random.SeedSequence([seed, iteration, round_]).generate_state(1)[0] >> 1)


def accuracy(target: Target, params, prompts: list[list[int]], problems, max_new: int,
             batch_size: int) -> float:
  """Greedy accuracy (last number == answer) on held-out problems."""
  gens = generate(dataclasses.replace(target, params=params), prompts,
                  Greedy(max_new_tokens=max_new), batch_size=batch_size)
  tok = target.tokenizer
  return float(np.mean([reward(tok.decode(g.output_ids, skip_special_tokens=True), p)
                        for g, p in zip(gens, problems)]))


# ----------------------------------------------------------------------------- the loop


def warmup_rows(prompts: list[list[int]], problems, tok, eos_id: int, pad_id: int
                ) -> dict[str, np.ndarray]:
  """Supervised rows: chat prompt, reference solution, EOS; the loss on the solution and EOS."""
  seqs = [p + tok.encode(q.solution_text, add_special_tokens=False) + [eos_id]
          for p, q in zip(prompts, problems)]
  W = bucket(max(len(s) for s in seqs))
  tokens = np.full((len(seqs), W), pad_id, np.int32)
  mask = np.zeros((len(seqs), W), np.float32)
  for i, (s, p) in enumerate(zip(seqs, prompts)):
    tokens[i, :len(s)] = s
    mask[i, len(p):len(s)] = 1.0
  return {"tokens": tokens, "loss_mask": mask}


def warmup(config: Any, trainable, frozen, assemble, model_config, rows: dict, writer
           ) -> Any:
  """`rl.warmup_steps` AdamW updates (lr `rl.warmup_learning_rate`) of next-token loss on
  `rows`, `rl.warmup_batch_size` rows drawn per step from the run seed; returns the
  trainable parameters."""
  r = config.rl
  steps, B = int(r.warmup_steps), int(r.warmup_batch_size)
  opt = optim.make_optimizer({"name": "adamw", "learning_rate": float(r.warmup_learning_rate),
                              "grad_clip": 1.0}, steps)
  log = lambda s, m: writer.write({"split": "warmup", "step": 0, "warmup_step": s,
                                   "nll": float(m["nll"]), "accuracy": float(m["accuracy"])})
  return trainer_lib.fit_rows(losses.next_token_loss(model_config), opt, trainable, frozen, rows,
                              steps=steps, batch_size=B, seed=config.seed, assemble=assemble,
                              salt=2003, log=log)


def validate(config: Any) -> None:
  """Config errors, raised before any model is loaded."""
  optim.validate(config.optimizer)
  r = config.rl
  policy_loss.objective(r.objective, **dict(r.objective_overrides))  # unknown/bad: ValueError
  for name in ("iterations", "prompts_per_iteration", "group_size", "max_new_tokens",
               "ppo_epochs", "minibatch_size", "num_train_problems", "num_eval_problems",
               "max_sampling_rounds", "rollout_batch_size", "logprob_batch_size"):
    if int(r[name]) < 1:
      raise ValueError(f"rl.{name} must be >= 1, got {r[name]}")
  if int(r.group_size) < 2:
    raise ValueError("rl.group_size must be >= 2 (advantages compare a prompt's responses)")
  rows = int(r.prompts_per_iteration) * int(r.group_size)
  if rows % int(r.minibatch_size):
    raise ValueError(f"rl.minibatch_size ({r.minibatch_size}) must divide the "
                     f"{rows} responses of an iteration")
  if int(r.minibatch_size) % int(config.grad_accum):
    raise ValueError("rl.minibatch_size must be divisible by grad_accum")
  if int(r.warmup_steps) and (int(r.warmup_batch_size) < 1 or
                              not float(r.warmup_learning_rate) > 0):
    raise ValueError("a warm-up needs rl.warmup_batch_size >= 1 and rl.warmup_learning_rate > 0")
  if not float(r.temperature) > 0:
    raise ValueError(f"rl.temperature must be > 0, got {r.temperature}")
  if int(r.num_train_problems) % int(r.prompts_per_iteration):
    raise ValueError("rl.num_train_problems must be a multiple of rl.prompts_per_iteration "
                     "(so the problems of one rollout are distinct)")
  for name in ("eval_every", "checkpoint_every", "warmup_steps"):
    if int(r[name]) < 0:
      raise ValueError(f"rl.{name} must be >= 0, got {r[name]}")
  if config.lora.rank < 0:
    raise ValueError(f"lora.rank must be >= 0 (0 = full fine-tuning), got {config.lora.rank}")


VOLATILE = ("iterations", "eval_every", "checkpoint_every", "num_eval_problems",
            "logprob_batch_size", "rollout_batch_size")


def fingerprint(config: Any) -> str:
  """`train.experiment.fingerprint` without the run length, cadence and measurement
  settings, so a run resumes (or is extended) after those change."""
  c = config.copy_and_resolve_references()
  for name in VOLATILE:
    del c.rl[name]
  return experiment.fingerprint(c)


def run(config: Any, workdir: str, progress: bool = True, stop_after: Optional[int] = None,
        reward_fn: Callable[[str, Any], float] = reward) -> dict:
  """Trains `config.model` with `config.rl.objective`; returns the results (also in
  `workdir/results.json`). `stop_after`: return after that many iterations of this call
  (as a killed run would; the next call resumes). `reward_fn(response text, problem)`:
  another verifiable reward (the held-out accuracy always uses the answer match)."""
  validate(config)
  r = config.rl
  obj = policy_loss.objective(r.objective, **dict(r.objective_overrides))
  workdir, bundle, eos, pad_id = start_run(config, workdir)
  tok = bundle.tokenizer
  if tok is None:
    raise ValueError("RL on the word problems needs a model with a tokenizer")
  target = Target(bundle.lm, bundle.params, eos_ids=tuple(eos), pad_id=pad_id, tokenizer=tok,
                  name=bundle.source, sha256=bundle.sha256)
  encode = lambda p: tok.encode_chat([{"role": "user", "content": p.prompt}])
  pool, held = problem_sets(config)
  pool_prompts, held_prompts = [encode(p) for p in pool], [encode(p) for p in held]
  T = bucket(max(len(p) for p in pool_prompts)) + int(r.max_new_tokens)
  policy = RolloutPolicy(config, target, pool, pool_prompts, T, reward_fn)
  G, P = int(r.group_size), int(r.prompts_per_iteration)
  rows = P * G
  updates = int(r.ppo_epochs) * (rows // int(r.minibatch_size))
  num_steps = int(r.iterations) * updates

  if config.lora.rank:
    trainable = lora.init(bundle.params, jax.random.PRNGKey(config.seed), config.lora.rank,
                          tuple(config.lora.targets))
    frozen = bundle.params
    assemble = lambda t, f: lora.merge(f, t, config.lora.alpha, config.lora.rank)
  else:
    trainable, frozen, assemble = bundle.params, None, trainer_lib.identity_assemble
  optimizer = optim.make_optimizer(config.optimizer, num_steps)
  trainer = trainer_lib.Trainer(policy_loss.policy_loss(bundle.config, obj), optimizer,
                                assemble=assemble, grad_accum=config.grad_accum,
                                schedule=optim.make_schedule(config.optimizer, num_steps))
  state = {"train": trainer.init_state(trainable, jax.random.key(config.seed)),
           "stats": adv_lib.PromptStats.empty(len(pool)),
           "cursor": jnp.zeros((), jnp.int32)}
  # The KL term's reference is the policy RL starts from (after the warm-up): checkpointed
  # with the run when a warm-up made it, since a resumed run does not warm up again.
  keep_reference = bool(obj.kl_coef) and bool(int(r.warmup_steps))
  if keep_reference:
    state["reference"] = trainable
  fp = fingerprint(config)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  writer = trainer_lib.MetricWriter(os.path.join(workdir, "metrics.jsonl"))
  wall = 0.0
  fresh = ckpt.latest_step() is None
  if fresh:
    open(writer.path, "w").close()
    if int(r.warmup_steps):
      if int(r.eval_every):  # the model as loaded, before the warm-up
        writer.write({"split": "eval_base", "step": 0, "accuracy": accuracy(
            target, assemble(state["train"].params, frozen), held_prompts, held,
            int(r.max_new_tokens), int(r.rollout_batch_size) * G)})
      t = time.perf_counter()
      warmed = warmup(config, state["train"].params, frozen, assemble, bundle.config,
                      warmup_rows(pool_prompts, pool, tok, eos[0], pad_id), writer)
      state["train"] = trainer.init_state(warmed, jax.random.key(config.seed))
      if keep_reference:  # a copy: train steps donate the train state's buffers
        state["reference"] = jax.tree.map(jnp.copy, state["train"].params)
      writer.write({"split": "warmup_done", "step": 0, "seconds": time.perf_counter() - t})
  else:
    trainer_lib.check_resumable(ckpt.restore_meta().get("extra", {}),
                                {"fingerprint": fp, "num_steps": num_steps})
    state, meta = ckpt.restore(state)
    wall = float(meta.get("wall_seconds", 0.0))
    writer.truncate_after(int(meta["step"]))
  # the policy RL starts from (without a warm-up: the loaded model; LoRA starts at B = 0)
  reference = assemble(state["reference"], frozen) if keep_reference else bundle.params
  start = int(state["train"].step) // updates
  logprobs = logprob_fn(bundle.config)
  lp_rows = int(r.logprob_batch_size)
  current = lambda: assemble(state["train"].params, frozen)

  def evaluate(iteration: int) -> None:
    t = time.perf_counter()
    acc = accuracy(target, current(), held_prompts, held, int(r.max_new_tokens),
                   int(r.rollout_batch_size) * G)
    rec = {"split": "eval", "step": iteration, "accuracy": acc,
           "eval_seconds": time.perf_counter() - t}
    writer.write(rec)
    logging.info("eval %s", rec)

  if start == 0 and int(r.eval_every):
    evaluate(0)
  bar = tqdm(total=int(r.iterations), initial=start, desc=f"rl {obj.name}", unit="it",
             dynamic_ncols=True, disable=not progress)
  done_here = 0
  for it in range(start, int(r.iterations)):
    t0 = time.perf_counter()
    params = current()
    cursor = int(state["cursor"])
    kept, kept_adv, generated, rounds = [], [], 0, 0
    all_rewards, all_lengths, truncated = [], [], []
    stats = state["stats"]
    while sum(len(k.prompt_ids) for k in kept) < P and rounds < int(r.max_sampling_rounds):
      ids = prompt_stream(len(pool), config.seed, cursor, P)
      cursor += P
      groups = policy.sample(params, ids, iteration_seed(config.seed, it, rounds))
      rounds += 1
      generated += len(groups.lengths)
      all_rewards.append(groups.rewards.reshape(-1))
      all_lengths.append(groups.lengths)
      truncated.append(~groups.finished)
      shaped = jnp.asarray(groups.shaped)
      if obj.advantage == "smooth":
        adv, stats = adv_lib.smooth_advantages(stats, jnp.asarray(ids), shaped)
      else:
        adv = adv_lib.group_advantages(shaped)
      adv = np.asarray(adv, np.float32)
      keep = np.arange(len(ids))
      if obj.dynamic_sampling:  # DAPO: a group of equal rewards teaches nothing; draw more
        keep = np.flatnonzero(groups.shaped.std(-1) > 0)
      if len(keep):
        kept.append(groups.take(keep))
        kept_adv.append(adv[keep].reshape(-1))
      if not obj.dynamic_sampling:
        break
    t_roll = time.perf_counter() - t0
    n_kept = sum(len(k.prompt_ids) for k in kept)
    tokens = np.full((rows, T), pad_id, np.int32)
    mask = np.zeros((rows, T), np.float32)
    advantages = np.zeros((rows,), np.float32)
    if kept:
      batch = Groups.concat(kept)
      advs = np.concatenate(kept_adv)
      m = min(len(batch.tokens), rows)  # DAPO keeps the first P groups found
      tokens[:m], mask[:m], advantages[:m] = batch.tokens[:m], batch.mask[:m], advs[:m]
    # responses that carry a gradient: in the batch, with a non-zero advantage
    nonzero = int(((np.abs(advantages) > 1e-6) & (mask.sum(-1) > 0)).sum())
    # the passes need only the longest sequence, rounded up to a multiple of LENGTH_STEP
    # (a few compiled lengths): short answers make most of the padded width dead weight
    used = int(np.flatnonzero(mask.any(0)).max()) + 1 if mask.any() else 1
    width = min(T, -(-used // LENGTH_STEP) * LENGTH_STEP)
    tokens, mask = tokens[:, :width], mask[:, :width]
    old = batched_logprobs(logprobs, params, tokens, lp_rows)
    ref = (batched_logprobs(logprobs, reference, tokens, lp_rows) if obj.kl_coef else old)
    t1 = time.perf_counter()
    metrics = []
    train_state = state["train"]
    for epoch in range(int(r.ppo_epochs)):
      order = np.random.default_rng([config.seed, it, epoch, 17]).permutation(rows)
      for s in range(0, rows, int(r.minibatch_size)):
        idx = order[s:s + int(r.minibatch_size)]
        mb = {"tokens": tokens[idx], "mask": mask[idx], "old_logp": old[idx],
              "ref_logp": ref[idx], "advantages": advantages[idx]}
        train_state, m = trainer.train_step(train_state, frozen, mb)
        metrics.append(jax.device_get(m))
    state = dict(state, train=train_state, stats=stats, cursor=jnp.asarray(cursor, jnp.int32))
    t_upd = time.perf_counter() - t1
    wall += time.perf_counter() - t0
    mean = lambda k: float(np.mean([float(m[k]) for m in metrics]))
    rewards = np.concatenate(all_rewards)
    lengths = np.concatenate(all_lengths)
    rec = {"split": "train", "step": it + 1, "optimizer_steps": int(train_state.step),
           "reward": float(rewards.mean()), "responses": generated, "rollouts": rounds,
           "groups_used": n_kept, "utilisation": nonzero / generated,
           "response_tokens": float(lengths.mean()),
           "truncated": float(np.concatenate(truncated).mean()),
           **{k: mean(k) for k in ("loss", "pg_loss", "kl", "clip_ratio", "dual_clip_ratio",
                                    "ratio_mean", "entropy", "grad_norm")},
           "rollout_seconds": t_roll, "update_seconds": t_upd, "wall_seconds": wall}
    writer.write(rec)
    bar.update(1)
    bar.set_postfix(reward=f"{rec['reward']:.3f}", util=f"{rec['utilisation']:.2f}")
    done = it + 1
    last = done == int(r.iterations)
    if int(r.eval_every) and (done % int(r.eval_every) == 0 or last):
      evaluate(done)
    done_here += 1
    stopping = stop_after is not None and done_here >= stop_after
    if last or stopping or (int(r.checkpoint_every) and done % int(r.checkpoint_every) == 0):
      ckpt.save(done, state, {"step": done, "wall_seconds": wall,
                              "extra": {"fingerprint": fp, "num_steps": num_steps}})
    if stopping and not last:
      bar.close()
      ckpt.close()
      return {"stopped_at": done}
  bar.close()
  ckpt.close()
  records = [json.loads(line) for line in open(writer.path)]
  evals = [x for x in records if x["split"] == "eval"]
  result = {"objective": dataclasses.asdict(obj), "iterations": int(r.iterations),
            "optimizer_steps": int(state["train"].step), "train_problems": len(pool),
            "eval_problems": len(held), "eval_accuracy": {x["step"]: x["accuracy"] for x in evals},
            "wall_seconds": wall, "seed": int(config.seed)}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  run_script(run, validate=validate, run_name=lambda c: f"rl_{c.rl.objective}_seed{c.seed}")

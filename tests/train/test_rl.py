"""The RL loop (train/rl.py) on a tiny random model with SmolLM2's tokenizer: every objective
runs its own code path (KL reference, dynamic sampling with a padded batch, running prompt
statistics), a killed and resumed run equals the uninterrupted one, the prompt stream and
the reward pieces behave as documented, and bad configs fail before any model loads."""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import rl_smollm2
from models.datasets import arithmetic
from train import rl


def tiny_config(objective: str, **rl_fields) -> ml_collections.ConfigDict:
  c = rl_smollm2.get_config()
  c.model.name = "tiny"
  c.model.tokenizer = "smollm2-135m-instruct"
  c.model.overrides = ml_collections.ConfigDict(dict(max_position_embeddings=256))
  c.lora.rank = 0
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.0
  c.rl.objective = objective
  c.rl.iterations = 3
  c.rl.prompts_per_iteration = 2
  c.rl.group_size = 4
  c.rl.max_new_tokens = 8
  c.rl.minibatch_size = 4
  c.rl.num_train_problems = 6  # a multiple of prompts_per_iteration
  c.rl.num_eval_problems = 4
  c.rl.eval_every = 3
  c.rl.checkpoint_every = 1
  c.rl.rollout_batch_size = 2
  c.rl.logprob_batch_size = 4
  c.rl.warmup_steps = 0
  for k, v in rl_fields.items():
    c.rl[k] = v
  return c


def digit_parity(text: str, problem) -> float:
  """A reward that varies between a random model's responses (the answer match never would)."""
  return float(sum(ch.isdigit() for ch in text) % 2 == 1 or len(text) % 3 == 0)


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


TIMING = ("rollout_seconds", "update_seconds", "wall_seconds", "eval_seconds", "seconds")


def comparable(recs: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def final_state(workdir: str, step: int) -> list[np.ndarray]:
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return [np.asarray(x) for x in jax.tree.leaves(out["state"])]


@pytest.mark.slow  # SmolLM2 tokenizer + several compiles: ~30 s each
@pytest.mark.parametrize("objective", ["grpo", "dapo", "dcpo"])
def test_each_objective_trains_and_logs_its_mechanism_metrics(objective, tmp_path):
  result = rl.run(tiny_config(objective, iterations=2, eval_every=2), str(tmp_path),
                  progress=False, reward_fn=digit_parity)
  train = [r for r in records(str(tmp_path)) if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  assert all(r["optimizer_steps"] == 2 * (i + 1) for i, r in enumerate(train))
  for r in train:
    assert 0.0 <= r["utilisation"] <= 1.0 and 0.0 <= r["clip_ratio"] <= 1.0
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0  # the rewards differ: a gradient
  if objective == "dapo":  # dynamic sampling: responses drawn >= those used
    assert all(r["responses"] >= 4 * r["groups_used"] for r in train)
  else:
    assert all(r["responses"] == 8 and r["rollouts"] == 1 for r in train)
  if objective == "grpo":
    assert train[-1]["kl"] > 0  # the KL to the initial policy, once the policy moved
  assert set(result["eval_accuracy"]) == {0, 2}


@pytest.mark.slow  # SmolLM2 tokenizer + several compiles: ~30 s each
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  c = tiny_config("dcpo")
  rl.run(c, whole, progress=False, reward_fn=digit_parity)
  assert rl.run(c, parts, progress=False, stop_after=2, reward_fn=digit_parity) == {"stopped_at": 2}
  with open(os.path.join(parts, "metrics.jsonl"), "a") as f:  # a record the kill left behind
    f.write(json.dumps({"split": "train", "step": 3, "reward": -1.0}) + "\n")
  rl.run(c, parts, progress=False, reward_fn=digit_parity)
  assert comparable(records(parts)) == comparable(records(whole))
  for a, b in zip(final_state(parts, 3), final_state(whole, 3)):
    np.testing.assert_array_equal(a, b)  # parameters, optimizer, prompt statistics, cursor


@pytest.mark.slow  # SmolLM2 tokenizer + several compiles: ~30 s each
def test_a_resumed_run_refuses_a_changed_objective(tmp_path):
  rl.run(tiny_config("dcpo", iterations=1, eval_every=0), str(tmp_path), progress=False,
         reward_fn=digit_parity)
  with pytest.raises(ValueError, match="different experiment"):
    rl.run(tiny_config("grpo", iterations=2, eval_every=0), str(tmp_path), progress=False,
           reward_fn=digit_parity)


@pytest.mark.slow  # SmolLM2 tokenizer + several compiles: ~30 s each
def test_warm_up_teaches_the_reference_solutions_and_keeps_the_kl_reference(tmp_path):
  c = tiny_config("grpo", iterations=2, eval_every=2, warmup_steps=6, warmup_batch_size=4,
                  warmup_learning_rate=1e-2, minibatch_size=8)  # one update per iteration
  whole = str(tmp_path / "whole")
  rl.run(c, whole, progress=False, reward_fn=digit_parity)
  recs = records(whole)
  warm = [r for r in recs if r["split"] == "warmup"]
  assert [r["warmup_step"] for r in warm] == list(range(1, 7))
  assert warm[-1]["nll"] < warm[0]["nll"]  # it learns the solutions
  assert [r["split"] for r in recs[:2]] == ["eval_base", "warmup"]
  first = [r for r in recs if r["split"] == "train"][0]
  # the first update is computed at the warmed-up policy, the KL term's reference
  assert first["kl"] == pytest.approx(0.0, abs=1e-6)
  assert [r for r in recs if r["split"] == "train"][1]["kl"] > 0
  parts = str(tmp_path / "parts")
  rl.run(c, parts, progress=False, stop_after=1, reward_fn=digit_parity)
  rl.run(c, parts, progress=False, reward_fn=digit_parity)  # resumes without warming up again
  assert comparable(records(parts)) == comparable(recs)


def test_warm_up_rows_train_on_the_solution_and_eos_only():
  class Tok:
    def encode(self, text, add_special_tokens=False):
      return [7] * len(text.split())
  probs = arithmetic.problems(2, seed=0)
  rows = rl.warmup_rows([[1, 2, 3], [4, 5]], probs, Tok(), eos_id=9, pad_id=0)
  n = len(probs[0].solution_text.split())
  assert rows["tokens"][0, :3 + n + 1].tolist() == [1, 2, 3] + [7] * n + [9]
  assert rows["loss_mask"][0].tolist() == [0.0] * 3 + [1.0] * (n + 1) + [0.0] * (
      rows["tokens"].shape[1] - 4 - n)


def test_prompt_stream_visits_every_problem_once_per_pass():
  first = rl.prompt_stream(6, seed=0, start=0, count=6)
  assert sorted(first.tolist()) == list(range(6))
  second = rl.prompt_stream(6, seed=0, start=6, count=6)
  assert sorted(second.tolist()) == list(range(6)) and first.tolist() != second.tolist()
  np.testing.assert_array_equal(rl.prompt_stream(6, 0, 4, 4),
                                np.concatenate([first[4:], second[:2]]))


def test_training_pool_excludes_the_held_out_and_evaluation_problems():
  c = tiny_config("dcpo", num_train_problems=300, num_eval_problems=64)
  pool, held = rl.problem_sets(c)
  assert len(pool) == 300 and len(held) == 64
  used = {p.question for p in held} | {p.question for p in arithmetic.problems(512, seed=0)}
  assert not used & {p.question for p in pool}


def test_reward_is_the_last_number_answer_match():
  p = arithmetic.Problem("q", 12, 1)
  assert rl.reward("3 + 9 = 12. The answer is 12.", p) == 1.0
  assert rl.reward("The answer is 12, or 13", p) == 0.0
  assert rl.reward("no number", p) == 0.0


def test_overlong_shaping_is_zero_then_linear_then_the_penalty():
  lengths = np.asarray([10, 96, 112, 128, 128])
  finished = np.asarray([True, True, True, True, False])
  got = rl.overlong_shaping(lengths, finished, max_new=128, buffer=32, penalty=1.0)
  np.testing.assert_allclose(got, [0.0, 0.0, -0.5, -1.0, -1.0])
  assert not rl.overlong_shaping(lengths, finished, 128, 0, 1.0).any()


@pytest.mark.parametrize("field,value,match", [
    ("objective", "ppo", "unknown objective"),
    ("group_size", 1, "group_size"),
    ("minibatch_size", 3, "must divide"),
    ("temperature", 0.0, "temperature"),
    ("num_train_problems", 7, "multiple of rl.prompts_per_iteration"),
])
def test_bad_configs_fail_before_loading(field, value, match):
  c = tiny_config("dcpo")
  c.rl[field] = value
  c.model.name = "no-such-model"  # never reached
  with pytest.raises(ValueError, match=match):
    rl.validate(c)

"""GRPO / DAPO / DCPO on SmolLM2-135M-Instruct and the arithmetic word problems (`train.rl`).

    python -m train.rl --config=configs/rl_smollm2.py --config.rl.objective=dcpo \
        --config.seed=0 --workdir=runs/rl/dcpo_seed0

The papers train 1.5B-14B models with G = 16 responses per prompt and 512 prompts per batch
on GPUs. Scaled to a 2-core CPU: 4 problems per iteration x G = 8 responses of up to 128
tokens, one pass over them in minibatches of 8 (4 optimizer updates per iteration), a pool
of 32 training problems so that each comes back every 8 iterations, 3 times in the 24
iterations (DCPO's running statistics need repeat visits, as the papers' multi-epoch runs
give them),
LoRA rank 16 on every projection at lr 2e-5 (AdamW, weight decay 0.1 as in the DCPO runs,
gradient clipping 1.0), 64 held-out problems for greedy accuracy every 5 iterations.
Sampled at temperature 1, SmolLM2 answers about 3% of the problems and runs past 128 tokens
on most of them, which leaves almost no reward to learn from; a warm-up of 24 supervised
LoRA updates (lr 2e-4) on the training pool's reference solutions teaches the short
"a + b = c. The answer is N." form first, then RL starts from it with a fresh optimizer.
Objective settings are the presets of `train.policy_loss.PRESETS` (DAPO's overlong buffer
is 64 of the 128 tokens); override any with --config.rl.objective_overrides.NAME=VALUE.
"""
import ml_collections

from configs import train_base


def get_config():
  c = train_base.get_config()
  c.task = "rl"
  c.rl = ml_collections.ConfigDict()
  c.rl.objective = "dcpo"  # grpo | dapo | dcpo
  c.rl.objective_overrides = ml_collections.ConfigDict()  # PolicyObjective fields
  c.rl.iterations = 24  # each pool problem comes back 3 times (DCPO's statistics need repeats)
  c.rl.prompts_per_iteration = 4
  c.rl.group_size = 8
  c.rl.max_new_tokens = 128
  c.rl.temperature = 1.0
  c.rl.ppo_epochs = 1
  c.rl.minibatch_size = 8
  c.rl.max_sampling_rounds = 4  # DAPO's dynamic sampling: rollouts per iteration at most
  c.rl.data_seed = 0  # draws the training pool and the held-out problems
  c.rl.num_train_problems = 32  # small enough that each problem comes back every 8 iterations
  c.rl.num_eval_problems = 64
  c.rl.eval_every = 5
  c.rl.checkpoint_every = 5
  c.rl.rollout_batch_size = 4  # prompts per sampling batch (x group_size rows)
  c.rl.logprob_batch_size = 8  # rows per teacher-forced log-prob pass
  c.rl.warmup_steps = 24  # supervised updates on the pool's reference solutions (0: none)
  c.rl.warmup_batch_size = 8
  c.rl.warmup_learning_rate = 2e-4
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.optimizer.learning_rate = 2e-5
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 1.0
  c.keep_checkpoints = 2
  return c

"""Training a process reward model: the language model with a step tag after every step,
cross-entropy on the two label logits (minus, plus) at the tag positions only
(`decoding.process_reward` reads the scores back). Targets follow SPARE's reference code:
1 for a correct step, 0 for an incorrect or ungraded one, the last step's target the final
answer's correctness (`decoding.process_supervision.step_targets`). An outcome reward model
is the same model trained with one tag, after the whole solution, on the outcome.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoding.process_reward import TagFormat, label_logits, pad_tagged
from models.config import ModelConfig
from train import lora, losses, optim
from train import trainer as trainer_lib


def prm_loss(config: ModelConfig, fmt: TagFormat):
  """`loss_fn(params, batch, key)`: batch tokens [N, T], tags [N, T] (1.0 at tag positions),
  targets [N, T] (0/1 at the tags). Metrics: accuracy at the tags and their count."""
  def loss_fn(params, batch, key):
    del key
    logits = losses.sequence_logits(params, config, batch["tokens"])
    logp = jax.nn.log_softmax(label_logits(logits.astype(jnp.float32), fmt), axis=-1)
    target = batch["targets"].astype(jnp.int32)
    picked = jnp.where(target == 1, logp[..., 1], logp[..., 0])
    tags = batch["tags"].astype(jnp.float32)
    loss = -losses.masked_mean(picked, tags)
    right = ((logp[..., 1] > logp[..., 0]).astype(jnp.int32) == target).astype(jnp.float32)
    return loss, {"accuracy": losses.masked_mean(right, tags), "tokens": tags.sum()}
  return loss_fn


def prm_rows(seqs: Sequence[tuple[list[int], list[int]]], targets: Sequence[Sequence[int]],
             pad_id: int, length: int = 0) -> dict[str, np.ndarray]:
  """Training arrays from (tokens, tag positions) sequences and one 0/1 target per tag."""
  tokens, tags = pad_tagged(seqs, pad_id, length)
  tgt = np.zeros(tokens.shape, np.int32)
  for i, ((_, pos), t) in enumerate(zip(seqs, targets)):
    if len(pos) != len(t):
      raise ValueError(f"sequence {i}: {len(pos)} tags but {len(t)} targets")
    tgt[i, pos] = t
  return {"tokens": tokens, "tags": tags.astype(np.float32), "targets": tgt}


def train_prm(config: ModelConfig, params: Any, rows: dict[str, np.ndarray], fmt: TagFormat, *,
              steps: int, batch_size: int, learning_rate: float, lora_rank: int = 0,
              lora_alpha: float = 32.0, seed: int = 0, log=None) -> Any:
  """`steps` AdamW updates on batches drawn from `rows` (seeded); returns the model's
  parameters (LoRA adapters merged). `log(step, metrics)` is called after every update."""
  if lora_rank:
    trainable = lora.init(params, jax.random.PRNGKey(seed), lora_rank)
    assemble = lambda t, f: lora.merge(f, t, lora_alpha, lora_rank)
    frozen = params
  else:
    trainable, frozen, assemble = params, None, trainer_lib.identity_assemble
  opt = optim.make_optimizer({"name": "adamw", "learning_rate": learning_rate,
                              "grad_clip": 1.0}, steps)
  trained = trainer_lib.fit_rows(prm_loss(config, fmt), opt, trainable, frozen, rows,
                                 steps=steps, batch_size=batch_size, seed=seed,
                                 assemble=assemble, salt=4099, log=log)
  return assemble(trained, frozen)

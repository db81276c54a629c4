"""Training losses and the pieces they share.

Every loss has the same signature, so the trainer treats them alike:

    loss_fn(params, batch, key) -> (scalar loss, {name: scalar metric})

`params` are the model's parameters (for LoRA, the base with the adapters merged in),
`batch` a dict of arrays with a leading batch axis, `key` a PRNG key (dropout, or the
choice between losses in `mixture`). Text batches hold `tokens` [B, T] int32 and a
`loss_mask` [B, T] float32 aligned with the tokens: `loss_mask[b, t]` weights the
prediction of `tokens[b, t]` from `tokens[b, :t]` (column 0 is never predicted).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from models import transformer
from models.config import ModelConfig

Array = jax.Array
Batch = Mapping[str, Array]
LossFn = Callable[[Any, Batch, Array], tuple[Array, dict]]


def sequence_logits(params: Any, config: ModelConfig, tokens: Array,
                    positions: Optional[Array] = None) -> Array:
  """Causal full-sequence logits without a KV cache. tokens [B, T] -> [B, T, V] float32."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return transformer.forward(params, config, tokens, positions, None).logits


def token_logprobs(logits: Array, tokens: Array) -> Array:
  """log p(tokens[:, t] | tokens[:, :t]) aligned with the tokens; column 0 is 0.

  logits: [B, T, V] (position t predicts t + 1); tokens: [B, T] -> [B, T] float32.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def token_entropy(logits: Array) -> Array:
  """Entropy (nats) of each position's next-token distribution. [B, T, V] -> [B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def default_mask(tokens: Array) -> Array:
  return jnp.ones(tokens.shape, jnp.float32).at[:, 0].set(0.0)


def masked_mean(values: Array, mask: Array) -> Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_loss(config: ModelConfig) -> LossFn:
  """Mean token cross-entropy (maximum likelihood) over `loss_mask` (all but column 0 by default).

  Metrics: `nll` (= loss), `accuracy` (argmax equals the target) and `tokens` (weight sum).
  """
  def loss_fn(params, batch: Batch, key: Array):
    del key
    tokens = batch["tokens"]
    mask = batch.get("loss_mask")
    mask = default_mask(tokens) if mask is None else mask.astype(jnp.float32)
    logits = sequence_logits(params, config, tokens, batch.get("positions"))
    logp = token_logprobs(logits, tokens)
    loss = -masked_mean(logp, mask)
    correct = jnp.pad(jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:], ((0, 0), (1, 0)))
    return loss, {"nll": loss, "accuracy": masked_mean(correct.astype(jnp.float32), mask),
                  "tokens": jnp.sum(mask)}
  return loss_fn


def mixture(losses: Mapping[str, LossFn], rates: Mapping[str, float]) -> LossFn:
  """Picks one loss per step at random (probabilities `rates`), each on its own sub-batch.

  `batch[name]` is the sub-batch of loss `name`; the choice is drawn from `key`, so it is
  reproducible and resumes exactly. Only the chosen branch runs (`lax.switch`). Metrics
  of every branch are reported under `name/metric`, NaN for the branches not taken (the
  trainer's logs average each over the steps that computed it), plus `branch` (the index
  taken, in sorted name order) and `tokens`, the chosen branch's count if it reports one.
  """
  names = sorted(losses)
  probs = jnp.asarray([float(rates[n]) for n in names])
  if probs.min() < 0 or float(probs.sum()) <= 0:
    raise ValueError(f"mixture rates must be >= 0 and not all zero, got {dict(rates)}")

  def loss_fn(params, batch: Batch, key: Array):
    choose_key, key = jax.random.split(key)
    idx = jax.random.categorical(choose_key, jnp.log(probs / probs.sum()))

    def branch(i):
      def run(params, batch, key):
        loss, metrics = losses[names[i]](params, batch[names[i]], key)
        return loss, {f"{names[i]}/{k}": v for k, v in metrics.items()}
      return run

    shapes = [jax.eval_shape(branch(i), params, batch, key)[1] for i in range(len(names))]
    template = {k: jnp.full(v.shape, jnp.nan, jnp.float32) for s in shapes for k, v in s.items()}

    def padded(i):
      def run(params, batch, key):
        loss, metrics = branch(i)(params, batch, key)
        metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
        tokens = metrics.get(f"{names[i]}/tokens", jnp.ones((), jnp.float32))
        return loss, {**template, **metrics, "tokens": tokens}
      return run

    loss, metrics = jax.lax.switch(idx, [padded(i) for i in range(len(names))], params, batch,
                                   key)
    return loss, {**metrics, "branch": idx}
  return loss_fn

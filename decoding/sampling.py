"""Greedy decoding and ancestral sampling: the two token selectors of the core loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def greedy_select(logits: Array, keys: Array) -> Array:
  """argmax of the processed logits ([B, V] -> [B]); ties go to the lowest id, as in torch."""
  del keys
  return jnp.argmax(logits, axis=-1)


def sample_select(logits: Array, keys: Array) -> Array:
  """One categorical draw per row from softmax(processed logits), with that row's own key."""
  return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits)

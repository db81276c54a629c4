"""Model-free fakes for decoding tests (in the spirit of T5X's decoding tests)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from decoding.speculative.protocol import ChainDraft, Drafter
from models.kv_cache import KVCache
from models.transformer import ForwardOutput


@dataclasses.dataclass(frozen=True)
class BigramLM:
  """Next-token logits depend only on the last token: `params[token]` ([V, V] table).

  Has the `TransformerLM` boundary, so every strategy runs on it; exact answers can be
  computed by hand or by brute force over the tiny vocabulary.
  """
  vocab_size: int
  max_positions: int = 1024

  def init_cache(self, batch_size, max_len):
    z = jnp.zeros((1, batch_size, max_len, 1, 1), jnp.float32)
    return KVCache(k=z, v=z, lengths=jnp.zeros((batch_size,), jnp.int32))

  def __call__(self, params, tokens, positions, cache, attn_mask=None, embeds=None,
               logits_at=None, cache_mask=None):
    logits = params[tokens]  # [B, S, V]
    if logits_at is not None:
      logits = jnp.take_along_axis(logits, logits_at[:, :, None], axis=1)
    h = jnp.zeros(tokens.shape + (1,), jnp.float32)
    return ForwardOutput(logits=logits, hidden=h, penultimate=h,
                         cache=cache.replace(lengths=cache.lengths + tokens.shape[1]))


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """Text as its UTF-8 bytes, one token per byte (ids < 256, no special tokens, no chat
  template): the tokenizer boundary the text-building strategies (self-agreement) use."""
  chat_template = None

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class RandomDrafter(Drafter):
  """A chain drafter that proposes uniformly random tokens (speculative decoding must stay
  exact whatever the draft)."""
  vocab_size: int = 0
  num_draft: int = 3
  kind: str = "chain"

  def propose(self, dparams, tparams, state, view, processor, sample):
    keys = jax.vmap(jax.random.fold_in)(view.row_keys, view.num_generated + 7919)
    tokens = jax.vmap(lambda k: jax.random.randint(k, (self.num_draft,), 0, self.vocab_size))(keys)
    return ChainDraft(tokens=tokens.astype(jnp.int32)), state

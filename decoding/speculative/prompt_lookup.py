"""Prompt lookup: drafts copied from the prompt.

Input-guided aggressive decoding (IAD, "Lossless Acceleration for Seq2seq Generation with
Aggressive Decoding", Ge et al., 2022); Hugging Face's prompt lookup decoding is the same
idea. A chain drafter of the shared speculative loop, verified like every other.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from decoding.errors import GenerationError
from decoding.settings import Validated, check_int, settings
from decoding.speculative.protocol import ChainDraft, DraftView, Drafter, Verified

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter(Drafter):
  """Copies K tokens from the prompt (input-guided aggressive decoding).

  Re-alignment rule (stated here because the IAD paper leaves it open): let g be the
  longest n-gram, n from `max_ngram` down to `min_ngram`, that ends the row's current
  sequence and occurs in the prompt with at least one prompt token after it. Among its
  occurrences take the first one that ends at or after the alignment point a (the prompt
  position just after the last copied token that was accepted), else the last one
  before a, so copying moves forward through the input as an edit does. The draft is the
  K prompt tokens after it (past the prompt's end: the prompt's last token, which the
  target will simply reject). After verification a = end of the occurrence + accepted
  drafts. With no occurrence of any n-gram, the draft continues from a, and the draft is
  marked unmatched: when no active row of the batch has a match, the loop verifies no
  drafts at all that iteration (a plain one-token target call, as Hugging Face's prompt
  lookup does when it finds no candidates), so text with nothing to copy does not pay for
  K + 1 verified positions per token.
  """
  num_draft: int = 10
  max_ngram: int = 3
  min_ngram: int = 1
  kind: str = "chain"
  plain_when_unmatched: bool = True

  def init(self, dparams, tparams, prompts, prompt_len, first, info, cache_len):
    B = prompts.shape[0]
    return {"align": jnp.zeros((B,), jnp.int32), "start": jnp.zeros((B,), jnp.int32)}

  def match_start(self, sequences: Array, seq_len: Array, prompt_len: Array,
                  align: Array) -> Array:
    """[B] prompt index where the draft starts (the rule above)."""
    return self.match(sequences, seq_len, prompt_len, align)[0]

  def match(self, sequences: Array, seq_len: Array, prompt_len: Array,
            align: Array) -> tuple[Array, Array]:
    """([B] prompt index where the draft starts, [B] bool: some n-gram occurred)."""
    B, S = sequences.shape
    P = S  # candidate end positions e: the n-gram is sequences[e-n:e], e < prompt_len
    e = jnp.arange(P)[None]  # [1, P]
    found = jnp.zeros((B,), bool)
    start = align
    for n in range(self.max_ngram, self.min_ngram - 1, -1):
      tail_idx = jnp.clip(seq_len[:, None] - n + jnp.arange(n)[None], 0, S - 1)
      tail = jnp.take_along_axis(sequences, tail_idx, axis=1)  # [B, n]
      ok = (e >= n) & (e < prompt_len[:, None]) & (seq_len[:, None] >= n)
      for i in range(n):
        idx = jnp.clip(e - n + i, 0, S - 1)
        ok &= jnp.take_along_axis(sequences, jnp.broadcast_to(idx, (B, P)), axis=1) == tail[:, i:i + 1]
      after = ok & (e >= align[:, None])
      first_after = jnp.min(jnp.where(after, e, P), axis=1)
      last_before = jnp.max(jnp.where(ok & (e < align[:, None]), e, -1), axis=1)
      pick = jnp.where(first_after < P, first_after, last_before)
      take = ~found & jnp.any(ok, axis=1)
      start = jnp.where(take, pick, start)
      found = found | take
    return start, found

  def propose(self, dparams, tparams, state, view: DraftView, processor, sample: bool):
    start, found = self.match(view.sequences, view.seq_len, view.prompt_len, state["align"])
    idx = start[:, None] + jnp.arange(self.num_draft)[None]
    idx = jnp.minimum(idx, view.prompt_len[:, None] - 1)
    tokens = jnp.take_along_axis(view.sequences, idx, axis=1).astype(jnp.int32)
    return ChainDraft(tokens=tokens, matched=found), dict(state, start=start)

  def update(self, dparams, tparams, state, view, verified: Verified):
    accepted = jnp.minimum(verified.num_accepted, verified.count)
    return dict(state, align=jnp.where(view.active | (verified.count > 0),
                                       state["start"] + accepted, state["align"]))


@settings
class PromptLookup(Validated):
  """Drafts copied from the prompt (n-grams of prompt_lookup_max_ngram down to
  prompt_lookup_min_ngram tokens are looked up; see `PromptLookupDrafter`)."""
  num_draft_tokens: int = 4
  prompt_lookup_max_ngram: int = 3
  prompt_lookup_min_ngram: int = 1

  def validate(self) -> None:
    check_int("num_draft_tokens", self.num_draft_tokens, 1)
    check_int("prompt_lookup_max_ngram", self.prompt_lookup_max_ngram, 1)
    check_int("prompt_lookup_min_ngram", self.prompt_lookup_min_ngram, 1)
    if self.prompt_lookup_min_ngram > self.prompt_lookup_max_ngram:
      raise GenerationError(f"prompt_lookup_min_ngram ({self.prompt_lookup_min_ngram}) must be "
                            f"<= prompt_lookup_max_ngram ({self.prompt_lookup_max_ngram})")

  def build(self, target, resources):
    return PromptLookupDrafter(self.num_draft_tokens, self.prompt_lookup_max_ngram,
                               self.prompt_lookup_min_ngram), None

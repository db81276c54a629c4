"""Padded lengths: the few shapes decoding compiles for, and the cache a request needs."""
from __future__ import annotations

import math

from decoding.errors import GenerationError


def bucket(n: int, minimum: int = 16) -> int:
  """Next power of two >= n (at least `minimum`): the few shapes we compile for."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def plan_lengths(max_new_tokens: int, longest_prompt: int, max_positions: int,
                 explicit: int = 0, prompt_slots: int = 0) -> tuple[int, int]:
  """(padded prompt length P, cache length) for a batch; errors if the request cannot fit.

  The padded prefill writes P slots per row before they are trimmed to the true
  lengths, so the cache holds at least P + max_new_tokens slots. `explicit` > 0 is the
  requested cache length (max_cache_len). `prompt_slots` > 0 pads prompts to at least that
  many slots before bucketing, so that the chunks of one long prompt list all get the list's
  shapes.
  """
  n = int(max_new_tokens)
  P = bucket(max(longest_prompt, prompt_slots))
  needed = longest_prompt + n
  if explicit and needed > explicit:
    raise GenerationError(
        f"prompt of {longest_prompt} tokens + max_new_tokens={n} = {needed} exceeds the KV "
        f"cache (max_cache_len={explicit}); shorten the prompt or raise max_cache_len")
  if needed > max_positions:
    raise GenerationError(
        f"prompt of {longest_prompt} tokens + max_new_tokens={n} = {needed} exceeds the "
        f"model's context of {max_positions} positions")
  return P, max(explicit, P + n)

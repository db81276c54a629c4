"""A process reward model's step scores and their aggregation into a solution score.

The PRM is the language model itself with a step tag after every step (as in "Math-Shepherd",
Wang et al. 2024, and SPARE's reference code): the input is the prompt, then each step's tokens
followed by the tag token; at each tag position the model's next-token logits restricted to two
label tokens, {minus, plus}, give the step's score P(correct) = softmax([l−, l+])[1]. Training
(`train.prm`) puts cross-entropy on those two logits at the tag positions only.

SmolLM2's tokenizer splits SPARE's " ки" into two tokens, so the tag is a reserved special token
of its vocabulary that chat text never contains (`<empty_output>`, id 16), inserted as an id,
never through text; the labels are the single tokens " +" and " -".

Aggregations of a solution's step scores for best-of-N (the paper leaves the rule open):
`min` (the weakest step), `product` (every step right) and `last` (the final step, which is
trained on the outcome).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoding.lengths import bucket

Array = jax.Array

AGGREGATIONS = ("min", "product", "last")


@dataclasses.dataclass(frozen=True)
class TagFormat:
  """The step tag and the two label tokens (ids in the model's vocabulary)."""
  tag_id: int
  plus_id: int
  minus_id: int

  @classmethod
  def for_tokenizer(cls, tok, tag: str = "<empty_output>") -> "TagFormat":
    """The tag (a special token that must be one id) and the " +" / " -" label tokens."""
    tag_ids = tok.encode(tag, add_special_tokens=False)
    plus, minus = (tok.encode(t, add_special_tokens=False) for t in (" +", " -"))
    if len(tag_ids) != 1 or len(plus) != 1 or len(minus) != 1:
      raise ValueError(f"the step tag {tag!r} and the labels ' +', ' -' must be single tokens, "
                       f"got {tag_ids}, {plus}, {minus}")
    return cls(tag_ids[0], plus[0], minus[0])


def tagged_sequence(prompt_ids: Sequence[int], step_ids: Sequence[Sequence[int]],
                    tag_id: int) -> tuple[list[int], list[int]]:
  """(tokens, tag positions): the prompt, then each step followed by the tag."""
  tokens, tags = list(prompt_ids), []
  for step in step_ids:
    tokens += list(step)
    tags.append(len(tokens))
    tokens.append(tag_id)
  return tokens, tags


def pad_tagged(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, length: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded tokens [N, T] and a tag mask [N, T] (T = `length` or the bucketed longest)."""
  T = length or bucket(max(len(t) for t, _ in seqs))
  tokens = np.full((len(seqs), T), pad_id, np.int32)
  tags = np.zeros((len(seqs), T), bool)
  for i, (t, pos) in enumerate(seqs):
    if len(t) > T:
      raise ValueError(f"a tagged sequence of {len(t)} tokens does not fit in {T}")
    tokens[i, :len(t)] = t
    tags[i, pos] = True
  return tokens, tags


def label_logits(logits: Array, fmt: TagFormat) -> Array:
  """[..., V] -> [..., 2] logits of (minus, plus)."""
  return jnp.stack([logits[..., fmt.minus_id], logits[..., fmt.plus_id]], axis=-1)


def sequence_logits(lm, params, tokens: Array) -> Array:
  """Full-sequence causal logits [B, T, V] of the `TransformerLM` boundary (no cache)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return lm(params, tokens, positions, None).logits


@functools.partial(jax.jit, static_argnames=("lm", "fmt"))
def _scores(lm, params, tokens: Array, fmt: TagFormat) -> Array:
  two = label_logits(sequence_logits(lm, params, tokens).astype(jnp.float32), fmt)
  return jax.nn.softmax(two, axis=-1)[..., 1]


def step_scores(lm, params: Any, seqs: Sequence[tuple[list[int], list[int]]],
                fmt: TagFormat, pad_id: int = 0, batch_size: int = 8) -> list[list[float]]:
  """P(correct) at every tag of each (tokens, tag positions) sequence, with the model `lm`
  (causal, so the padding after a sequence changes nothing before it)."""
  tokens, tags = pad_tagged(seqs, pad_id)
  out = []
  for i in range(0, len(seqs), batch_size):
    chunk = tokens[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:  # one compiled batch shape
      chunk = np.concatenate([chunk, np.full((batch_size - n, chunk.shape[1]), pad_id, np.int32)])
    p = np.asarray(_scores(lm, params, jnp.asarray(chunk), fmt))[:n]
    out += [p[k][tags[i + k]].tolist() for k in range(n)]
  return out


def aggregate(scores: Sequence[float], how: str) -> float:
  """One solution score from its step scores (`AGGREGATIONS`); no steps scores 0."""
  if how not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")
  if not len(scores):
    return 0.0
  if how == "min":
    return float(min(scores))
  if how == "product":
    return float(np.prod(scores))
  return float(scores[-1])

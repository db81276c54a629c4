"""The drafter protocol of speculative decoding, and the tree helpers drafters share.

A drafter is a frozen dataclass (hashable: a static argument of the jitted loop) with
`init`, `propose` and `update` (see `Drafter`); its parameters travel separately as a pytree.
It sees the decoded rows through a `DraftView`, proposes a `ChainDraft` or a `TreeDraft`,
and after verification gets a `Verified` to update its own state (caches, alignment).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from decoding.errors import GenerationError
from decoding.processors import LogitsProcessor, ProcessorContext

Array = jax.Array


@flax.struct.dataclass
class ChainDraft:
  tokens: Array  # [B, K] int32
  probs: Optional[Array] = None  # [B, K, V] draft distributions (sampled drafts), else None
  # [B] bool, or None: False where the drafter found nothing to propose (drafters with
  # `plain_when_unmatched`: when no active row has a match the loop makes a plain call).
  matched: Optional[Array] = None


@flax.struct.dataclass
class TreeDraft:
  """Token tree; node 0 is the root (the loop puts the row's last token there)."""
  tokens: Array  # [B, N] int32
  parents: Array  # [B, N] int32, -1 for the root, parents[i] < i
  depth: Array  # [B, N] int32, root 0
  valid: Array  # [B, N] bool


@flax.struct.dataclass
class DraftView:
  """What a drafter sees before proposing."""
  sequences: Array  # [B, S] prompt + generated tokens (right-padded)
  seq_len: Array  # [B]: x = sequences[b, seq_len-1] is the last emitted token
  prompt_len: Array  # [B]
  num_generated: Array  # [B]: index (among generated tokens) of the next token
  active: Array  # [B] bool
  row_keys: Array  # [B, 2]

  def context(self, extra: Array | int = 0) -> ProcessorContext:
    """Processor context of the position `extra` tokens past the row's end (the drafts in
    between must already be written into `sequences`)."""
    return ProcessorContext(sequences=self.sequences, seq_len=self.seq_len + extra,
                            prompt_len=self.prompt_len, step=self.num_generated + extra)


@flax.struct.dataclass
class Verified:
  """What the verification decided, for the drafter's update. Emitted token j (j < count)
  was predicted by the target at block position `node_index[b, j]` (0 = the root x) and
  is `emitted[b, j]`; `hidden`/`penultimate` are the target's features at every block
  position of this call."""
  old_seq_len: Array  # [B]
  count: Array  # [B] tokens emitted (0 for inactive rows)
  num_accepted: Array  # [B] draft tokens accepted by verification (before EOS/budget cuts)
  emitted: Array  # [B, D+1] int32
  node_index: Array  # [B, D+1] int32
  hidden: Array  # [B, M, Dm]
  penultimate: Array  # [B, M, Dm]
  logits: Array  # [B, M, V] processed target logits (what verification compared against)


@flax.struct.dataclass
class PrefillInfo:
  logits: Array  # [B, V] target logits after the prompt
  hidden: Optional[Array]  # [B, P, Dm] target final hidden states (drafters with needs_features)


class Drafter:
  """Base class of drafters: frozen dataclasses (hashable, static under jit).

  `kind` is "chain" (`num_draft` tokens per call, verified block K + 1) or "tree"
  (`tree_size` nodes including the root, at most `max_depth` deep). Subclasses implement
  `init`, `propose` and (when they keep state that depends on what was accepted)
  `update`. Draft parameters `dparams` are a pytree passed at run time (None when the
  drafter needs none or reads the target's parameters).
  """
  kind: str = "chain"
  needs_features: bool = False  # init gets the target's hidden states of the prompt
  plain_when_unmatched: bool = False  # chains with `matched`: plain calls when nothing matches

  @property
  def block(self) -> int:
    return self.num_draft + 1 if self.kind == "chain" else self.tree_size

  @property
  def depth(self) -> int:
    return self.num_draft if self.kind == "chain" else self.max_depth

  def init(self, dparams, tparams, prompts: Array, prompt_len: Array, first: Array,
           info: PrefillInfo, cache_len: int) -> Any:
    return ()

  def propose(self, dparams, tparams, state, view: DraftView, processor: LogitsProcessor,
              sample: bool):
    raise NotImplementedError

  def update(self, dparams, tparams, state, view: DraftView, verified: Verified) -> Any:
    return state

  @property
  def extra_slots(self) -> int:
    """Cache slots needed past a row's committed tokens: the verified block (drafters that
    write more into their own cache, such as EAGLE-2 trees, say so here)."""
    return self.block


# --------------------------------------------------------------------------- tree helpers


def chain_tree(B: int, K: int) -> tuple[Array, Array]:
  """parents and depth of a chain of K drafts below the root: ([B, K+1], [B, K+1])."""
  parents = jnp.broadcast_to(jnp.arange(K + 1, dtype=jnp.int32)[None] - 1, (B, K + 1))
  return parents, jnp.broadcast_to(jnp.arange(K + 1, dtype=jnp.int32)[None], (B, K + 1))


def path_tokens(tokens: Array, parents: Array, depth: Array, max_depth: int) -> Array:
  """[B, M, D]: token of node m's ancestor at depth d+1 (0 where d+1 > depth[m])."""
  B, M = tokens.shape
  rows = jnp.arange(B)[:, None]
  out = jnp.zeros((B, M, max_depth), jnp.int32)
  cur = jnp.broadcast_to(jnp.arange(M)[None], (B, M))
  for _ in range(max_depth):
    d = depth[rows, cur]
    write = d >= 1
    slot = jnp.clip(d - 1, 0, max_depth - 1)
    out = out.at[rows, jnp.arange(M)[None], slot].set(
        jnp.where(write, tokens[rows, cur], out[rows, jnp.arange(M)[None], slot]))
    cur = jnp.where(write, jnp.maximum(parents[rows, cur], 0), cur)
  return out


def node_context(view: DraftView, tokens: Array, parents: Array, depth: Array, node: Array,
                 max_depth: int) -> ProcessorContext:
  """Processor context after tree node `node` ([B] index): the row plus its draft path."""
  B, S = view.sequences.shape
  rows = jnp.arange(B)
  path = path_tokens(tokens, parents, depth, max_depth)[rows, node]  # [B, D]
  d = depth[rows, node]
  pos = view.seq_len[:, None] + jnp.arange(max_depth)[None]
  pos = jnp.where(jnp.arange(max_depth)[None] < d[:, None], pos, S)
  seqs = view.sequences.at[rows[:, None], pos].set(path, mode="drop")
  return ProcessorContext(sequences=seqs, seq_len=view.seq_len + d, prompt_len=view.prompt_len,
                          step=view.num_generated + d)


def write_at(sequences: Array, pos: Array, tok: Array) -> Array:
  """sequences[b, pos[b]] = tok[b] (out-of-range positions dropped)."""
  return sequences.at[jnp.arange(sequences.shape[0]), pos].set(tok, mode="drop")


def require_checksum(target, what: str) -> None:
  """A trained drafter works only with the exact target it was trained on, which is told by
  the target's checksum (`decoding.strategy.Target.sha256`): GenerationError without one."""
  if target.sha256 is None:
    raise GenerationError(f"{what} drafts only for the target it was trained on, and this "
                          "target's checksum is unknown: load the model by name or path "
                          "(models.lm.load_model) or give Target(sha256=...)")

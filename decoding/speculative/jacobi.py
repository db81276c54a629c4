"""Speculative Jacobi decoding ("Accelerating Auto-regressive Text-to-Image Generation with
Training-free Speculative Jacobi Decoding", Teng et al., ICLR 2025), as a drafter of the shared
speculative loop (`decoding.speculative`): no draft model, the target refines its own window.

State per row: a window of L draft tokens for the next L positions, each with the exact
distribution q_j it was drawn from. One iteration:

  1. the target scores [x, d_1..d_L] in one call (x = the row's last token), giving p_1..p_{L+1};
  2. the shared chain verifier accepts d_j with probability min(1, p_j(d_j) / q_j(d_j)) left to
     right; at the first rejection it draws from norm(max(p_j - q_j, 0)); when all L are
     accepted it draws the bonus token from p_{L+1} (greedy mode: accept while d_j = argmax p_j);
  3. the window moves past the n + 1 committed tokens. Positions the old window already covered
     get a fresh draft from this call's p (the Jacobi update: the target's prediction for that
     position given the old, partly rejected, drafts before it), with q = that p (greedy: its
     argmax); positions beyond get initial drafts.

Initial drafts ("random", the paper's default): uniform tokens of [0, draft_vocab) (the image
codes) with a one-hot q, so q_j(d_j) = 1 and the acceptance probability is p_j(d_j).
"spatial" (the paper's spatial-prior initialization, as a one-hot copy): the token one image
row above (`grid` positions back) when that position is inside the image, else random.

Since every draft is drawn from the q stored with it, with randomness independent of the
verifier's, sampling mode keeps the target's distribution exactly, and greedy mode emits the
greedy tokens (tests). Keys: the draft at generated-token index i in iteration t uses
fold_in(draft_key(position_key(i)), t), so redrafting a position draws fresh randomness.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from decoding.speculative import verify
from decoding.speculative.protocol import ChainDraft, Drafter, DraftView, Verified

Array = jax.Array
INITS = ("random", "spatial")


@dataclasses.dataclass(frozen=True)
class JacobiDrafter(Drafter):
  num_draft: int = 16  # window length L
  draft_vocab: int = 0  # initial drafts are uniform over [0, draft_vocab); 0: the whole vocab
  init_mode: str = "random"  # "random" | "spatial"
  grid: int = 0  # image side in tokens ("spatial": the token `grid` positions back)
  kind: str = "chain"

  def __post_init__(self):
    if self.init_mode not in INITS:
      raise ValueError(f"init_mode must be one of {INITS}, got {self.init_mode!r}")
    if self.init_mode == "spatial" and self.grid < 1:
      raise ValueError("spatial initialization needs grid >= 1 (tokens per image row)")
    if self.num_draft < 1:
      raise ValueError(f"num_draft must be >= 1, got {self.num_draft}")

  def _keys(self, row_keys: Array, first_index: Array, iteration: Array) -> Array:
    """[B, L, 2] draft keys of the window starting at generated-token index first_index."""
    pk = verify.position_keys(row_keys, first_index, self.num_draft)
    it = iteration.astype(jnp.uint32)
    return jax.vmap(lambda ks, t: jax.vmap(
        lambda k: jax.random.fold_in(verify.draft_key(k), t))(ks))(pk, it)

  def _initial(self, keys: Array, sequences: Array, positions: Array, prompt_len: Array,
               window: Array, window_start: Array, V: int) -> Array:
    """Initial drafts [B, L] for the window positions `positions` [B, L] (absolute)."""
    vocab = self.draft_vocab or V
    rand = jax.vmap(jax.vmap(lambda k: jax.random.randint(k, (), 0, vocab)))(keys)
    if self.init_mode == "random":
      return rand.astype(jnp.int32)
    above = positions - self.grid
    S = sequences.shape[1]
    from_seq = jnp.take_along_axis(sequences, jnp.clip(above, 0, S - 1), axis=1)
    in_image = above >= prompt_len[:, None]
    committed = above < window_start[:, None]  # already in the sequence
    idx = jnp.clip(above - window_start[:, None], 0, self.num_draft - 1)
    from_win = jnp.take_along_axis(window, idx, axis=1)  # an earlier window slot
    copy = jnp.where(committed, from_seq, from_win)
    return jnp.where(in_image, copy, rand).astype(jnp.int32)

  def _fill(self, keys, sequences, start, prompt_len, tokens, probs, fresh, V):
    """Replaces the slots where `fresh` [B, L] with initial drafts (one-hot q), slot by slot
    so a spatial copy can read an earlier slot of the same window."""
    positions = start[:, None] + jnp.arange(self.num_draft)[None]
    if self.init_mode == "random":  # no slot reads another: one pass
      init = self._initial(keys, sequences, positions, prompt_len, tokens, start, V)
      tokens = jnp.where(fresh, init, tokens)
    for m in range(self.num_draft if self.init_mode == "spatial" else 0):
      init = self._initial(keys, sequences, positions, prompt_len, tokens, start, V)
      tokens = tokens.at[:, m].set(jnp.where(fresh[:, m], init[:, m], tokens[:, m]))
    onehot = jax.nn.one_hot(tokens, V, dtype=jnp.float32)
    probs = jnp.where(fresh[..., None], onehot, probs)
    return tokens, probs

  def init(self, dparams, tparams, prompts, prompt_len, first, info, cache_len):
    B, L, V = prompts.shape[0], self.num_draft, info.logits.shape[-1]
    # every slot starts fresh: propose draws the initial drafts (it has the row keys)
    zeros = jnp.zeros((B, L), jnp.int32)
    return {"sampled": zeros, "greedy": zeros, "probs": jnp.zeros((B, L, V), jnp.float32),
            "fresh": jnp.ones((B, L), bool), "iteration": jnp.zeros((B,), jnp.int32)}

  def propose(self, dparams, tparams, state, view: DraftView, processor, sample: bool):
    V = state["probs"].shape[-1]
    keys = self._keys(view.row_keys, view.num_generated, state["iteration"])
    tokens = state["sampled"] if sample else state["greedy"]
    tokens, probs = self._fill(keys, view.sequences, view.seq_len, view.prompt_len, tokens,
                               state["probs"], state["fresh"], V)
    return ChainDraft(tokens=tokens, probs=probs if sample else None), state

  def update(self, dparams, tparams, state, view: DraftView, verified: Verified):
    """Moves the window past the committed tokens (the Jacobi update, see the module doc)."""
    L = self.num_draft
    # new slot m covers the position the target predicted at block index count + m; those
    # with count + m <= L get this call's prediction, the others initial drafts
    idx = verified.count[:, None] + jnp.arange(L)[None]
    ok = idx <= L
    logits = jnp.take_along_axis(verified.logits, jnp.clip(idx, 0, L)[..., None], axis=1)
    it = state["iteration"] + 1
    keys = self._keys(view.row_keys, view.num_generated, it)
    sampled = jax.vmap(jax.vmap(jax.random.categorical))(keys, logits).astype(jnp.int32)
    return {"sampled": sampled, "greedy": jnp.argmax(logits, axis=-1).astype(jnp.int32),
            "probs": jnp.where(ok[..., None], jax.nn.softmax(logits, axis=-1), 0.0),
            "fresh": ~ok, "iteration": it}

"""Dynamic token trees from a draft model: DySpec's greedy construction under a budget.

"DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure" (Xiong et al.,
2024) observes that a draft token's chance of being accepted tracks its draft
probability, and grows the tree greedily: keep a max-heap of candidate expansions,
pop the best, run the draft model there, push that node's best child and the popped
node's next sibling, stop at the budget. With the value of a node equal to the product
of draft probabilities along its path (the reconstruction on algorithm card 20: the
paper's exact sibling value is unconfirmed), the procedure selects exactly the
`budget` nodes of highest path value, which are prefix-closed since values only
shrink along a path.

Here the heap is implicit and vectorized over the batch: every node u already in the
tree offers one candidate, its next unused child (the r_u-th best token of its draft
distribution, value v_u * q_u(child)); each step adds the best candidate over all nodes
(= the heap's top: a node's next child is its best remaining one), runs the draft model
on the new node (one token, attending to the prefix and its ancestors through the
cache mask) and records the node's own top children. `budget` draft calls build the
tree. Children are the top tokens of the processed draft distribution in both greedy
and sampling mode; the verifier's multi-candidate rule (`decoding.speculative.verify.verify_tree`)
is lossless for any candidate set.

The draft cache uses the target's layout: the root (the row's last token) at slot
seq_len - 1 and node i at slot seq_len - 1 + i; after verification the accepted path is
compacted into consecutive slots (`KVCache.compact`), so the next rollback stays valid.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from decoding.errors import GenerationError
from decoding.settings import Validated, check_int, settings
from decoding.speculative.model_drafter import DraftModelMixin, load_draft_model, self_layers
from decoding.speculative.protocol import DraftView, Drafter, TreeDraft, Verified, node_context

Array = jax.Array
NEG = -jnp.inf


def best_first_tree(root_logp: Array, expand, aux: Any, budget: int, max_depth: int,
                    max_children: int):
  """Grows a tree of `budget` nodes below the root by the best-first rule above.

  root_logp: [B, V] processed draft log-probs at the root. expand(i, tokens, parents,
  depth, aux) -> ([B, V] processed draft log-probs at new node i, aux): it runs the draft
  there (aux: the draft's cache or other state). Returns (TreeDraft with N = budget + 1
  nodes, node values = log path probs [B, N], aux).
  """
  B, V = root_logp.shape
  N, C = budget + 1, max_children
  top_lp, top_tok = jax.lax.top_k(root_logp, C)
  tree = dict(
      tokens=jnp.zeros((B, N), jnp.int32), parents=jnp.full((B, N), -1, jnp.int32),
      depth=jnp.zeros((B, N), jnp.int32), value=jnp.full((B, N), NEG).at[:, 0].set(0.0),
      nchild=jnp.zeros((B, N), jnp.int32),
      top_lp=jnp.full((B, N, C), NEG).at[:, 0].set(top_lp),
      top_tok=jnp.zeros((B, N, C), jnp.int32).at[:, 0].set(top_tok.astype(jnp.int32)))
  rows = jnp.arange(B)

  def add(i, carry):
    t, aux = carry
    r = jnp.minimum(t["nchild"], C - 1)
    cand = t["value"] + jnp.take_along_axis(t["top_lp"], r[..., None], -1)[..., 0]
    open_ = (jnp.arange(N)[None] < i) & (t["nchild"] < C) & (t["depth"] < max_depth)
    cand = jnp.where(open_, cand, NEG)
    u = jnp.argmax(cand, axis=-1)
    v = cand[rows, u]
    tok = t["top_tok"][rows, u, r[rows, u]]
    ok = v > NEG
    t = dict(t,
             tokens=t["tokens"].at[:, i].set(jnp.where(ok, tok, 0)),
             parents=t["parents"].at[:, i].set(jnp.where(ok, u, 0).astype(jnp.int32)),
             depth=t["depth"].at[:, i].set(jnp.where(ok, t["depth"][rows, u] + 1, 1)),
             value=t["value"].at[:, i].set(v),
             nchild=t["nchild"].at[rows, u].add(ok.astype(jnp.int32)))
    logp, aux = expand(i, t["tokens"], t["parents"], t["depth"], aux)
    lp, tk = jax.lax.top_k(logp, C)
    lp = jnp.where(ok[:, None], lp, NEG)
    return dict(t, top_lp=t["top_lp"].at[:, i].set(lp),
                top_tok=t["top_tok"].at[:, i].set(tk.astype(jnp.int32))), aux

  t, aux = jax.lax.fori_loop(1, N, add, (tree, aux))
  valid = t["value"] > NEG
  draft = TreeDraft(tokens=t["tokens"], parents=t["parents"], depth=t["depth"], valid=valid)
  return draft, t["value"], aux


@dataclasses.dataclass(frozen=True)
class DySpecDrafter(DraftModelMixin, Drafter):
  """A draft language model grown into a DySpec tree of `tree_budget` nodes per call.

  `self_layers=k` drafts with the target's first k layers (see `ModelDrafter`).
  """
  draft_lm: Any = None
  tree_budget: int = 16
  max_depth: int = 6
  max_children: int = 4
  self_layers: Optional[int] = None
  kind: str = "tree"

  @property
  def tree_size(self) -> int:
    return self.tree_budget + 1

  def propose(self, dparams, tparams, cache, view: DraftView, processor, sample: bool):
    lm, p = self._model(dparams, tparams)
    B = view.seq_len.shape[0]
    L = view.seq_len
    rows = jnp.arange(B)
    out = self._root(lm, p, cache, view)
    root_logp = jax.nn.log_softmax(processor(out.logits[:, 0], view.context()), axis=-1)
    T = cache.max_len
    N = self.tree_size

    def expand(i, tokens, parents, depth, c):
      # Visible: the prefix and root (slots < L) and node i's ancestors (node m at slot
      # L - 1 + m); the node's own key/value is handled by the new-token mask.
      anc = jnp.zeros((B, N), bool)
      cur = parents[:, i]
      for _ in range(self.max_depth):
        anc = anc | (jax.nn.one_hot(cur, N, dtype=bool) & (cur >= 1)[:, None])
        cur = jnp.where(cur >= 1, parents[rows, jnp.maximum(cur, 0)], 0)
      slot = jnp.arange(T)[None]
      m = slot - (L[:, None] - 1)
      vis = (slot < L[:, None]) | ((m >= 1) & (m < N)
                                   & anc[rows[:, None], jnp.clip(m, 0, N - 1)])
      o = lm(p, jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1), (L - 1 + depth[:, i])[:, None], c.with_lengths(L - 1 + i),
             cache_mask=vis[:, None])
      ctx = node_context(view, tokens, parents, depth, jnp.full((B,), i), self.max_depth)
      return jax.nn.log_softmax(processor(o.logits[:, 0], ctx), axis=-1), o.cache

    draft, _, cache = best_first_tree(root_logp, expand, out.cache, self.tree_budget,
                                      self.max_depth, self.max_children)
    return draft, cache

  def update(self, dparams, tparams, cache, view, verified: Verified):
    return cache.compact(verified.old_seq_len - 1, verified.node_index[:, 1:])


@settings
class DySpec(Validated):
  """A DySpec tree of `tree_budget` draft nodes per target call (at most `tree_depth` deep,
  `tree_children` children considered per node), grown from `draft_model` or, without one,
  from the target's first `draft_layers` layers (default 4)."""
  draft_model: str = ""
  draft_layers: Optional[int] = None
  tree_budget: int = 16
  tree_depth: int = 6
  tree_children: int = 4

  def validate(self) -> None:
    if self.draft_model and self.draft_layers is not None:
      raise GenerationError("draft_layers sets the self-draft's depth: it does not apply with "
                            "a draft_model")
    if self.draft_layers is not None:
      check_int("draft_layers", self.draft_layers, 1)
    check_int("tree_budget", self.tree_budget, 1)
    check_int("tree_depth", self.tree_depth, 1)
    check_int("tree_children", self.tree_children, 1)

  def build(self, target, resources):
    tree = dict(tree_budget=self.tree_budget, max_depth=self.tree_depth,
                max_children=self.tree_children)
    if self.draft_model:
      dlm, dparams = load_draft_model(self.draft_model, target, resources)
      return DySpecDrafter(dlm, **tree), dparams
    k = self_layers(4 if self.draft_layers is None else self.draft_layers, target)
    return DySpecDrafter(target.lm, self_layers=k, **tree), None

"""EAGLE feature drafting: chains and EAGLE-2 dynamic draft trees from a trained draft head.

The head (`models.eagle_head`, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty", Li et al., 2024; FSPAD's options) maps the pair (f_t, x_{t+1}) of a target
feature and the next token to f̂_{t+1}, whose logits through the target's LM head predict
x_{t+2}. Drafting autoregresses on features: (f̂_{t+1}, d_{t+2}) is the next pair.

Head cache layout: the pair whose token sits at position t + 1 is in slot t, so between
iterations the cache holds the pairs of every committed token but the first, i.e. slots
< seq_len - 1, and `root` holds f̂ for the next position (the output of the last pair).
After verification the accepted pairs (target features at the block positions that
predicted the emitted tokens, paired with those tokens) are fed in one call, which also
yields the next root; drafted pairs written beyond the committed length are simply
overwritten.

Chain mode drafts K tokens (argmax, or in sampling mode draws from q = softmax of the
processed draft logits, handed to the verifier). Tree mode is EAGLE-2 ("EAGLE-2: Faster
Inference of Language Models with Dynamic Draft Trees", Li et al., 2024): expand depth by
depth, at each depth feeding the `tree_children` best frontier nodes by cumulative draft
log-probability (one head call per depth, the frontier attending to its ancestors through
the cache mask), each proposing its `tree_children` best tokens; then keep the
`tree_budget` candidates of highest cumulative log-probability (a prefix-closed set: a
child never scores above its parent) as the tree the target verifies.

Two options cut or steer the draft distribution. A reduced draft vocabulary (`draft_vocab`
V' > 0; "FR-Spec", Zhao et al., 2025, and EAGLE-3's draft vocabulary) multiplies head
features by only the LM-head columns of the V' tokens the target emits most often (the
ranking is stored with the head), so the largest matmul of a draft step reads V'/V of the
head. Under classifier-free guidance (`guidance`, a scale; image tokens) the head runs on
both streams' features and its drafts come from the guided combination of its two
distributions, the distribution the target verifies against. Neither option touches
exactness: verification is unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from decoding.errors import GenerationError
from decoding.guidance import GuidedCache, guide
from decoding.settings import Validated, check_bool, check_int, settings
from decoding.speculative.model_drafter import draft_chain
from decoding.speculative.protocol import (DraftView, Drafter, PrefillInfo, TreeDraft, Verified,
                                           node_context, require_checksum)
from models import eagle_head

Array = jax.Array
NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class EagleDrafter(Drafter):
  head: Any = None  # models.eagle_head.EagleHead
  num_draft: int = 4
  tree: bool = False
  tree_budget: int = 16
  max_depth: int = 6
  max_children: int = 4
  draft_vocab: int = 0  # 0: the full vocabulary; V' > 0: hparams carry the reduced one
  guidance: Optional[float] = None  # a scale: draft from the classifier-free-guided distribution
  needs_features: bool = True

  @property
  def kind(self) -> str:
    return "tree" if self.tree else "chain"

  @property
  def tree_size(self) -> int:
    return self.tree_budget + 1

  @property
  def extra_slots(self) -> int:
    """The tree writes its expanded frontier, max_children nodes for each depth below the
    last, into the head cache after the row's committed pairs (`_tree`)."""
    if not self.tree:
      return self.block
    return max(self.block, max(self.max_depth - 1, 1) * self.max_children)

  def init(self, hparams, tparams, prompts, prompt_len, first, info: PrefillInfo, cache_len):
    B, P = prompts.shape
    rows = jnp.arange(B)
    nxt = jnp.concatenate([prompts[:, 1:], prompts[:, :1]], axis=1)
    nxt = nxt.at[rows, prompt_len - 1].set(first)  # x_{t+1} for t = 0..P_b-1
    positions = jnp.broadcast_to(jnp.arange(1, P + 1, dtype=jnp.int32)[None], (B, P))
    cache = jax.lax.optimization_barrier(self._init_cache(B, cache_len))
    out = self._call(hparams, tparams, info.hidden, nxt, positions, cache)
    root = out.features[rows, prompt_len - 1]
    return {"cache": out.cache.with_lengths(prompt_len), "root": root}

  def update(self, hparams, tparams, state, view: DraftView, v: Verified):
    B, J = v.emitted.shape
    rows = jnp.arange(B)
    feats = v.hidden[rows[:, None], v.node_index]  # [B, J, D]: features that predicted e_j
    start = v.old_seq_len - 1  # slot of the pair (f_{L-1}, e_0)
    positions = v.old_seq_len[:, None] + jnp.arange(J)[None]
    out = self._call(hparams, tparams, feats, v.emitted, positions,
                     state["cache"].with_lengths(start))
    moved = v.count > 0
    root = jnp.where(moved[:, None], out.features[rows, jnp.maximum(v.count - 1, 0)],
                     state["root"])
    return {"cache": out.cache.with_lengths(start + v.count), "root": root}

  def propose(self, hparams, tparams, state, view: DraftView, processor, sample: bool):
    if self.tree:
      return self._tree(hparams, tparams, state, view, processor)
    L = view.seq_len

    def advance(st, tok, j):
      o = self._call(hparams, tparams, st[0][:, None], tok[:, None], (L + j)[:, None], st[1])
      return o.features[:, 0], o.cache

    draft, _ = draft_chain(view, processor, sample, self.num_draft,
                           (state["root"], state["cache"].with_lengths(L - 1)),
                           lambda st: self._logits(hparams, tparams, st[0]), advance)
    return draft, state

  def _tree(self, hparams, tparams, state, view: DraftView, processor):
    B = view.seq_len.shape[0]
    L = view.seq_len
    k, D = self.max_children, self.max_depth
    rows = jnp.arange(B)
    region = max(D - 1, 1) * k  # head slots of expanded frontier nodes, after slot L - 2
    cache = state["cache"]
    T = cache.max_len
    # Candidate pool, index 0 = the root (depth 0); grows by k (depth 1) then k*k per depth.
    root_lp = jax.nn.log_softmax(
        processor(self._logits(hparams, tparams, state["root"]), view.context()), -1)
    lp, tk = jax.lax.top_k(root_lp, k)
    pool_tok = jnp.concatenate([view.sequences[rows, L - 1][:, None], tk.astype(jnp.int32)], 1)
    pool_par = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), jnp.zeros((B, k), jnp.int32)], 1)
    pool_val = jnp.concatenate([jnp.zeros((B, 1)), lp], 1)
    pool_dep = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.ones((B, k), jnp.int32)], 1)
    cand_feat = jnp.broadcast_to(state["root"][:, None], (B, k, state["root"].shape[-1]))
    cand_vis = jnp.zeros((B, k, region), bool)  # parent chain's head slots
    cur, ncur = 1, k
    for d in range(1, D):
      fv, fi = jax.lax.top_k(pool_val[:, cur:cur + ncur], k)  # frontier: k best at depth d
      f_pool = cur + fi  # [B, k]
      f_tok = pool_tok[rows[:, None], f_pool]
      f_feat = cand_feat[rows[:, None], fi]
      own = jax.nn.one_hot((d - 1) * k + jnp.arange(k), region, dtype=bool)[None]
      vis = cand_vis[rows[:, None], fi] | own  # [B, k, region]: ancestors and itself
      slot = jnp.arange(T)[None, None]
      m = slot - (L[:, None, None] - 1)
      parents_vis = cand_vis[rows[:, None], fi]
      cmask = (slot < (L[:, None, None] - 1)) | (
          (m >= 0) & (m < region) & jnp.take_along_axis(
              parents_vis, jnp.clip(m, 0, region - 1).astype(jnp.int32)
              * jnp.ones((1, k, 1), jnp.int32), axis=2))
      o = self._call(hparams, tparams, f_feat, f_tok, (L - 1 + d)[:, None] * jnp.ones((1, k), jnp.int32),
                    cache.with_lengths(L - 1 + (d - 1) * k),
                    attn_mask=jnp.broadcast_to(jnp.eye(k, dtype=bool), (B, k, k)),
                    cache_mask=cmask)
      cache = o.cache
      ctxs = [node_context(view, pool_tok, pool_par, pool_dep, f_pool[:, r], D) for r in range(k)]
      logits = self._logits(hparams, tparams, o.features)  # [B, k, V]
      child_lp = jnp.stack([jax.nn.log_softmax(processor(logits[:, r], ctxs[r]), -1)
                            for r in range(k)], axis=1)
      clp, ctk = jax.lax.top_k(child_lp, k)  # [B, k, k]
      n_new = k * k
      pool_tok = jnp.concatenate([pool_tok, ctk.reshape(B, n_new).astype(jnp.int32)], 1)
      pool_par = jnp.concatenate([pool_par, jnp.repeat(f_pool, k, axis=1).astype(jnp.int32)], 1)
      pool_val = jnp.concatenate([pool_val, (fv[:, :, None] + clp).reshape(B, n_new)], 1)
      pool_dep = jnp.concatenate([pool_dep, jnp.full((B, n_new), d + 1, jnp.int32)], 1)
      cand_feat = jnp.repeat(o.features, k, axis=1)
      cand_vis = jnp.repeat(vis, k, axis=1)
      cur, ncur = cur + ncur, n_new
    return self._select(pool_tok, pool_par, pool_val, pool_dep), state

  # Under classifier-free guidance (`guidance` set) the target is a `GuidedLM` built with
  # `paired_hidden=True`: its features are [..., 2D], the conditional stream's then the
  # unconditional one's. The head then runs both streams (2B rows of one head cache, a
  # `GuidedCache` that shows B rows to the loop) on the same tokens, and its draft logits
  # are guided like the target's: log_softmax(l_u + s (l_c - l_u)). Unguided, features are
  # [..., D] and the head runs B rows.

  def _init_cache(self, batch_size: int, max_len: int):
    if self.guidance is not None:
      return GuidedCache(self.head.init_cache(2 * batch_size, max_len))
    return self.head.init_cache(batch_size, max_len)

  def _call(self, hparams, tparams, features: Array, tokens: Array, positions: Array, cache,
            attn_mask=None, cache_mask=None):
    """The head over B rows of features [B, S, D] (or paired [B, S, 2D] under guidance)."""
    if self.guidance is None:
      return self.head(hparams["head"], tparams, features, tokens, positions, cache,
                       attn_mask=attn_mask, cache_mask=cache_mask)
    D = features.shape[-1] // 2
    both = jnp.concatenate([features[..., :D], features[..., D:]], axis=0)
    pair = lambda x: None if x is None else jnp.concatenate([x, x], axis=0)
    o = self.head(hparams["head"], tparams, both, pair(tokens), pair(positions), cache.inner,
                  attn_mask=pair(attn_mask), cache_mask=pair(cache_mask))
    B = tokens.shape[0]
    return o.replace(features=jnp.concatenate([o.features[:B], o.features[B:]], axis=-1),
                     logits=None, cache=GuidedCache(o.cache))

  def _logits(self, hparams, tparams, features: Array) -> Array:
    """Draft logits [..., V] of head features: the target's whole LM head, or only the
    columns of the reduced draft vocabulary (`eagle_head.draft_logits`); guided when
    `guidance` is set."""
    def logits(f):
      if self.draft_vocab:
        return eagle_head.draft_logits(hparams["vocab_w"], hparams["vocab_ids"], f,
                                       self.head.vocab_size)
      return self.head.logits(tparams, f)
    if self.guidance is None:
      return logits(features)
    D = features.shape[-1] // 2
    return guide(logits(features[..., :D]), logits(features[..., D:]), self.guidance)

  def _select(self, tok, par, val, dep):
    """The `tree_budget` best candidates (parents before children) as a TreeDraft."""
    B, Np = tok.shape
    n = min(self.tree_budget, Np - 1)
    key = jnp.where(jnp.arange(Np)[None] == 0, NEG, val - 1e-4 * dep)  # root excluded
    _, chosen = jax.lax.top_k(key, n)  # [B, n] pool indices
    order = jnp.argsort(jnp.take_along_axis(dep, chosen, 1) * 1e6 - jnp.take_along_axis(
        val, chosen, 1) + 0.0, axis=1)
    chosen = jnp.take_along_axis(chosen, order, 1)
    nodes = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), chosen.astype(jnp.int32)], 1)
    rows = jnp.arange(B)[:, None]
    where = jnp.full((B, Np), 0, jnp.int32).at[rows, nodes].set(
        jnp.arange(n + 1, dtype=jnp.int32)[None])
    parents = jnp.where(jnp.arange(n + 1)[None] == 0, -1, where[rows, jnp.maximum(par[rows, nodes], 0)])
    valid = jnp.isfinite(val[rows, nodes])
    tokens, depth = tok[rows, nodes], dep[rows, nodes]
    if n < self.tree_budget:  # fewer candidates than the budget: pad with invalid nodes
      pad = self.tree_budget - n
      tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
      parents = jnp.pad(parents, ((0, 0), (0, pad)))
      depth = jnp.pad(depth, ((0, 0), (0, pad)), constant_values=1)
      valid = jnp.pad(valid, ((0, 0), (0, pad)))
    return TreeDraft(tokens=tokens, parents=parents.astype(jnp.int32), depth=depth, valid=valid)


@settings
class EagleDraft(Validated):
  """A trained EAGLE/FSPAD feature head (`eagle_head`, a registered name or a folder):
  an EAGLE-2 dynamic tree of `tree_budget` nodes (`eagle_tree=True`), or a chain of
  `num_draft_tokens`. `eagle_draft_vocab=V'` drafts from the V' tokens the target emits
  most often (the ranking stored with the head; 0: every token)."""
  eagle_head: str = "eagle-smollm2-135m"
  # A chain from the 8192 most frequent tokens: the fastest shape measured on SmolLM2 at batch
  # 1 on CPU (BENCHMARKS.md); trees accept more per call but cost more than they gain there.
  eagle_tree: bool = False
  num_draft_tokens: int = 4
  tree_budget: int = 16
  tree_depth: int = 6
  tree_children: int = 4
  eagle_draft_vocab: int = 8192

  def validate(self) -> None:
    check_bool("eagle_tree", self.eagle_tree)
    for name in ("num_draft_tokens", "tree_budget", "tree_depth", "tree_children"):
      check_int(name, getattr(self, name), 1)
    check_int("eagle_draft_vocab", self.eagle_draft_vocab, 0)

  def build(self, target, resources):
    lm = target.lm
    require_checksum(target, "an EAGLE head")
    try:
      head, hparams, ranking = resources.get(
          ("eagle_head", self.eagle_head, target.sha256, str(lm.config.dtype)),
          lambda: eagle_head.load_head(self.eagle_head, target_sha256=target.sha256,
                                       with_ranking=True, dtype=lm.config.dtype))
    except (ValueError, FileNotFoundError) as e:
      raise GenerationError(f"cannot load EAGLE head {self.eagle_head!r}: {e}") from e
    if (head.config.target.hidden_size != lm.config.hidden_size
        or head.vocab_size != lm.vocab_size):
      raise GenerationError(f"EAGLE head {self.eagle_head!r} was trained for another target "
                            "architecture")
    hp = {"head": hparams}
    n = self.eagle_draft_vocab
    if n:
      if ranking is None:
        raise GenerationError(f"eagle_draft_vocab={n} needs a token ranking, and EAGLE head "
                              f"{self.eagle_head!r} was saved without one: use "
                              "eagle_draft_vocab=0 (the full vocabulary) or retrain the head")
      if n > head.vocab_size:
        raise GenerationError(f"eagle_draft_vocab={n} exceeds the vocabulary "
                              f"({head.vocab_size} tokens): use eagle_draft_vocab=0 (all tokens)")
      ids = jnp.asarray(ranking[:n])
      hp["vocab_ids"] = ids
      hp["vocab_w"] = resources.get(
          ("eagle_vocab", self.eagle_head, target.sha256, n, lm.config.matmul_kernel),
          lambda: eagle_head.draft_vocab_matrix(target.params, head.config, ids))
    return EagleDrafter(head, self.num_draft_tokens, tree=self.eagle_tree,
                        tree_budget=self.tree_budget, max_depth=self.tree_depth,
                        max_children=self.tree_children, draft_vocab=n), hp

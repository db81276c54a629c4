"""The one verification core of speculative decoding: chains and token trees, greedy and sampling.

Every speculative method in decodax (draft models, self-drafting, prompt lookup / IAD,
GAD, EAGLE/FSPAD heads, DySpec trees, DistillSpec drafts) proposes tokens and hands the
target's logits at the proposed positions to the functions below; none implements its
own acceptance rule. Everything is vectorized over a ragged batch: each row gets its own
number of accepted tokens, and no Python loop runs over rows or positions.

Target logits passed in are *processed* (the same logits processors the non-speculative
strategy would apply, see `decoding.processors`), so "the target distribution" below is
p = softmax(processed logits), and greedy means argmax of the processed logits.

Chain verification ("Fast Inference from Transformers via Speculative Decoding",
Leviathan, Kalman, Matias, 2023; "Accelerating Large Language Model Decoding with
Speculative Sampling", Chen et al., 2023). Draft d_1..d_K; the target scores the block
[x, d_1..d_K] once, giving p_1..p_{K+1} (p_j predicts the position of d_j).
* greedy: accept d_j while d_j = argmax p_j; then emit argmax p_{n+1} (the correction,
  or the bonus token when all K are accepted). The output is exactly greedy decoding.
* sampling, with the draft distributions q_j the drafts were sampled from: accept d_j
  with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection n+1 emit a token
  from norm(max(p_{n+1} - q_{n+1}, 0)); if all K are accepted emit a bonus token from
  p_{K+1}. The per-token acceptance probability is sum_v min(p, q) = 1 - TV(p, q).
* sampling with deterministic drafts (no q: prompt lookup, greedy drafts): the same rule
  with q_j the point mass on d_j, i.e. accept with probability p_j(d_j) and on rejection
  sample p_j with d_j removed. Drawing x_j ~ p_j and accepting iff x_j = d_j is that rule
  exactly, and that is how it is computed: the emitted tokens are then the very tokens
  ancestral sampling draws with the same per-position keys.

Tree verification ("SpecInfer: Accelerating Generative LLM Serving with Tree-based
Speculative Inference and Verification", Miao et al., 2024; EAGLE-2; DySpec). Nodes
0..N-1 with parents (node 0 is the root: the last emitted token, already decided); the
target scores all nodes in one pass under an ancestor mask, p_i is its distribution
after node i. From the root, move to the child whose token equals the target's choice
c_i at the current node (argmax p_i, or a draw from p_i); stop when no child matches and
emit c_i there. In sampling mode this is multi-candidate rejection over siblings with
point-mass proposals: sibling t_1 is accepted with probability p(t_1), on rejection
p <- p with t_1 removed and renormalized, then t_2, ... and after the last sibling a
token is drawn from what remains. Sampling x ~ p once and matching it against the
siblings is exactly that sequential rule (P(t_k) = p(t_k) for every sibling and the
residual is p off the siblings), so the tree is lossless whatever the drafter put in
it, and sibling tokens need not come from any particular distribution. Siblings should
carry distinct tokens (a duplicate is wasted budget, never an error).

Randomness. Position keys are `fold_in(row_key, offset + j)` where `offset` is the index
(among generated tokens) of the first verified position: the target's choice at token
index i always uses the same key, whatever the draft or the batch. Uniforms of the
min(1, p/q) test use `fold_in(key_i, 1)`; drafters sample their tokens with
`fold_in(key_i, 2)` (`draft_key`).
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from decoding.speculative.acceptance import Acceptance, GadPlus, Lantern, Lenient, Strict

Array = jax.Array


@flax.struct.dataclass
class ChainVerdict:
  num_accepted: Array  # [B] int32 in [0, K]: accepted draft tokens
  next_token: Array  # [B] int32: the correction (after a rejection) or the bonus token


@flax.struct.dataclass
class TreeVerdict:
  num_accepted: Array  # [B] int32 in [0, D]: accepted draft nodes (depth of the last one)
  path: Array  # [B, D] int32: accepted node at depth 1..D (entries >= num_accepted: 0)
  next_token: Array  # [B] int32: the target's token after the last accepted node


def position_keys(row_keys: Array, offsets: Array, num: int) -> Array:
  """[B, 2] row keys, [B] offsets -> [B, num, 2] keys fold_in(row_key, offset + j)."""
  idx = offsets.astype(jnp.uint32)[:, None] + jnp.arange(num, dtype=jnp.uint32)[None, :]
  return jax.vmap(lambda k, ids: jax.vmap(lambda i: jax.random.fold_in(k, i))(ids))(
      row_keys, idx)


def draft_key(pos_key: Array) -> Array:
  """The key a drafter samples the draft token at a position with (distinct from the
  target's own draws at that position)."""
  return jax.random.fold_in(pos_key, 2)


def target_choice(logits: Array, keys: Array, sample: bool) -> Array:
  """The target's own token at each position: argmax (ties to the lowest id, as greedy
  decoding) or a draw from softmax(logits) with that position's key. logits [..., V],
  keys [..., 2] -> [...] int32."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  flat_l = logits.reshape(-1, logits.shape[-1])
  flat_k = keys.reshape(-1, keys.shape[-1])
  draws = jax.vmap(jax.random.categorical)(flat_k, flat_l)
  return draws.reshape(logits.shape[:-1]).astype(jnp.int32)


def _leading_true(match: Array) -> Array:
  """Number of leading True entries per row: [B, K] bool -> [B] int32."""
  return jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def latent_relaxation(p: Array, draft_tokens: Array, neighbors: Array,
                      delta: float) -> tuple[Array, Array]:
  """LANTERN's relaxed target mass ("LANTERN: Accelerating Visual Autoregressive Models with
  Relaxed Speculative Decoding", Jang et al., ICLR 2025).

  p: [B, K, V] target distributions; draft_tokens [B, K]; neighbors [V, k] int32: the k
  nearest other codes of each token in the VQ latent space (-1 pads, `decoding.speculative.lantern`).
  With c_m = sum_{j <= m} p(N_j(x)) (x's neighbours in order), m* = the largest m with
  c_m <= delta: returns (extra [B, K] = c_{m*} (0 when no m qualifies), lent [B, K, k] bool:
  the neighbours whose mass was moved onto x). extra <= delta always; delta = 0 moves
  nothing unless some neighbour has probability exactly 0 (and then extra = 0).
  """
  nb = neighbors[draft_tokens]  # [B, K, k]
  p_nb = jnp.where(nb >= 0, jnp.take_along_axis(p, jnp.maximum(nb, 0), axis=-1), 0.0)
  c = jnp.cumsum(p_nb, axis=-1)
  lent = (c <= delta) & (nb >= 0)
  lent = jnp.cumprod(lent.astype(jnp.int32), axis=-1).astype(bool)  # a prefix of the list
  extra = jnp.max(jnp.where(lent, c, 0.0), axis=-1)
  return extra, lent & (extra[..., None] > 0)


def verify_chain(target_logits: Array, draft_tokens: Array, draft_probs: Optional[Array],
                 keys: Array, sample: bool, offsets: Optional[Array] = None,
                 acceptance: Acceptance = Strict()) -> ChainVerdict:
  """Verifies a chain of K drafts per row.

  target_logits: [B, K+1, V] processed target logits (row j predicts draft j, row K the
    bonus position). draft_tokens: [B, K] int32. draft_probs: [B, K, V] draft
    distributions the drafts were sampled from (sampling mode), or None for deterministic
    drafts. keys: [B, 2] row keys; offsets: [B] token index of the first position
    (default 0). sample: False for greedy verification.

  acceptance: `Strict()` (lossless) or a LOSSY rule (`decoding.speculative.acceptance`).
  `GadPlus(beta, tau)` (greedy): `verify_chain_relaxed`. `Lenient(epsilon)` (sampling):
  DistillSpec's lenient acceptance min(1, p / (epsilon q)).
  `Lantern(neighbors [V, k], delta)` with delta > 0: LANTERN's relaxed acceptance (`latent_relaxation`):
  sampling accepts d with probability min(1, (p(d) + c_{m*}) / q(d)); on a rejection where
  mass was moved, the residual follows the LANTERN code's heuristic: sampled drafts zero q
  on the lending neighbours before norm(max(p - q, 0)); point-mass drafts (q(d) = 1) zero p
  at d and at the lending neighbours and renormalize. Greedy accepts d when d is the argmax
  or its relaxed mass reaches the argmax's probability (this greedy form is our choice; the
  card describes the sampling rule). Where no mass moved, every rule is the strict one, so
  delta = 0 is exactly standard speculative decoding.
  """
  B, K1, _ = target_logits.shape
  K = K1 - 1
  if draft_tokens.shape != (B, K):
    raise ValueError(f"draft_tokens {draft_tokens.shape} do not match logits {target_logits.shape}")
  if isinstance(acceptance, GadPlus):
    return verify_chain_relaxed(target_logits, draft_tokens, acceptance.beta, acceptance.tau)
  lenience = acceptance.epsilon if isinstance(acceptance, Lenient) else 1.0
  neighbors, delta = ((acceptance.neighbors, acceptance.delta) if isinstance(acceptance, Lantern)
                      else (None, 0.0))
  offsets = jnp.zeros((B,), jnp.int32) if offsets is None else offsets
  pkeys = position_keys(keys, offsets, K1)  # [B, K+1, 2]
  relax = neighbors is not None and float(delta) > 0 and K > 0
  if relax:
    p = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)  # [B, K+1, V]
    extra, lent = latent_relaxation(p[:, :K], draft_tokens, neighbors, float(delta))
  if not sample:
    choice = target_choice(target_logits, pkeys, False)  # [B, K+1]
    ok = draft_tokens == choice[:, :K]
    if relax:
      p_d = jnp.take_along_axis(p[:, :K], draft_tokens[..., None], -1)[..., 0]
      ok |= (extra > 0) & (p_d + extra >= jnp.max(p[:, :K], axis=-1))
    n = _leading_true(ok) if K else jnp.zeros((B,), jnp.int32)
    return ChainVerdict(num_accepted=n, next_token=jnp.take_along_axis(choice, n[:, None], 1)[:, 0])
  if draft_probs is None and relax:  # point-mass drafts under LANTERN: q = one-hot
    draft_probs = jax.nn.one_hot(draft_tokens, target_logits.shape[-1], dtype=jnp.float32)
  if draft_probs is None:
    choice = target_choice(target_logits, pkeys, sample)  # [B, K+1]
    n = _leading_true(draft_tokens == choice[:, :K]) if K else jnp.zeros((B,), jnp.int32)
    return ChainVerdict(num_accepted=n, next_token=jnp.take_along_axis(choice, n[:, None], 1)[:, 0])
  if not relax:
    p = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)  # [B, K+1, V]
  q = draft_probs.astype(jnp.float32)
  p_d = jnp.take_along_axis(p[:, :K], draft_tokens[..., None], -1)[..., 0]  # [B, K]
  q_d = jnp.take_along_axis(q, draft_tokens[..., None], -1)[..., 0]
  u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1))))(pkeys[:, :K])
  # accept iff u < p/(eps q), written without the division (q_d > 0 for a sampled draft)
  n = _leading_true(u * lenience * q_d < (p_d + extra if relax else p_d))
  rows = jnp.arange(B)
  p_n = p[rows, n]  # [B, V]
  q_n = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)[rows, n]  # 0 at the bonus slot
  if relax:  # LANTERN's residual where the rejected draft had borrowed mass
    V = p.shape[-1]
    nn_ = jnp.concatenate([neighbors[draft_tokens], jnp.zeros((B, 1, neighbors.shape[1]),
                                                               jnp.int32)], axis=1)[rows, n]
    lent_n = jnp.concatenate([lent, jnp.zeros_like(lent[:, :1])], axis=1)[rows, n]  # [B, k]
    hit = jnp.zeros((B, V), bool).at[rows[:, None], jnp.maximum(nn_, 0)].max(lent_n)
    d_n = jnp.concatenate([draft_tokens, jnp.zeros_like(draft_tokens[:, :1])], 1)[rows, n]
    one_hot_draft = jnp.concatenate([q_d, jnp.zeros_like(q_d[:, :1])], 1)[rows, n] >= 1.0
    moved = jnp.any(lent_n, axis=-1)
    pm = jnp.where(hit | (jnp.arange(V)[None] == d_n[:, None]), 0.0, p_n)
    p_n = jnp.where((moved & one_hot_draft)[:, None], pm, p_n)
    q_n = jnp.where((moved & one_hot_draft)[:, None], 0.0,
                    jnp.where(moved[:, None] & hit, 0.0, q_n))
  residual = jnp.maximum(p_n - q_n, 0.0)
  mass = residual.sum(-1, keepdims=True)
  # p = q exactly at a rejected position has probability 0; fall back to p for safety.
  residual = jnp.where(mass > 0, residual, p_n)
  logits = jnp.where(residual > 0, jnp.log(residual), -jnp.inf)
  nxt = jax.vmap(jax.random.categorical)(pkeys[rows, n], logits).astype(jnp.int32)
  return ChainVerdict(num_accepted=n, next_token=nxt)


def verify_chain_relaxed(target_logits: Array, draft_tokens: Array, beta: int,
                         tau: float) -> ChainVerdict:
  """GAD++ relaxed acceptance ("Lossless Acceleration for Seq2seq Generation with
  Aggressive Decoding", Ge et al., 2022), greedy only and LOSSY.

  With logp = log_softmax of the processed target logits, draft d_j is accepted iff it
  ranks among the top `beta` tokens at position j (ties toward the lowest id, as argmax)
  and logp_j(top-1) - logp_j(d_j) <= tau; the leading accepted drafts are kept and the
  target's top-1 follows them. beta <= 1 or tau <= 0 is exactly greedy verification
  (vanilla GAD). beta and tau are static Python numbers.
  """
  B, K1, V = target_logits.shape
  K = K1 - 1
  top1 = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, K+1]
  d = draft_tokens.astype(jnp.int32)
  if int(beta) <= 1 or float(tau) <= 0.0:
    ok = d == top1[:, :K]
  else:
    logp = jax.nn.log_softmax(target_logits[:, :K].astype(jnp.float32), axis=-1)  # [B, K, V]
    d_lp = jnp.take_along_axis(logp, d[..., None], axis=-1)  # [B, K, 1]
    v = jnp.arange(V)[None, None]
    rank = jnp.sum((logp > d_lp) | ((logp == d_lp) & (v < d[..., None])), axis=-1)
    ok = (rank < int(beta)) & (jnp.max(logp, axis=-1) - d_lp[..., 0] <= float(tau))
  n = _leading_true(ok)
  return ChainVerdict(num_accepted=n, next_token=jnp.take_along_axis(top1, n[:, None], 1)[:, 0])


def ancestor_matrix(parents: Array, max_depth: int) -> Array:
  """anc[b, i, j] = node j is node i or one of its ancestors. parents: [B, N] int32 with
  parents[b, 0] = -1 (root) and parents[b, i] < i. -> [B, N, N] bool (the tree attention
  mask among the nodes)."""
  B, N = parents.shape
  eye = jnp.broadcast_to(jnp.eye(N, dtype=bool), (B, N, N))
  anc = eye
  cur = parents
  rows = jnp.arange(B)[:, None]
  for _ in range(max_depth):
    ok = cur >= 0
    hit = jax.nn.one_hot(jnp.where(ok, cur, 0), N, dtype=bool) & ok[..., None]
    anc = anc | hit
    cur = jnp.where(ok, parents[rows, jnp.maximum(cur, 0)], -1)
  return anc


def _relaxed_tree_matches(target_logits: Array, tokens: Array, par: Array, choice: Array,
                          child: Array, sample: bool, neighbors: Array,
                          delta: float) -> Array:
  """[B, N] bool: LANTERN's relaxation of tree verification, the nodes a relaxed match
  accepts although the target's choice y at their parent is another token.

  Each node d borrows the mass of its lent neighbours B(d) at its parent's distribution
  (`latent_relaxation`, c <= delta). Sampling: d is accepted when y is in B(d), so the
  emitted token's law at the parent is the target's with each drafted child's lent mass moved
  onto it (the point-mass rule of `verify_chain`, per child). Greedy: d is accepted when
  p(d) + c reaches the argmax's probability (the chain's greedy rule). An exact match among
  the siblings wins; otherwise the first relaxed sibling in node order (the drafter's order,
  best first). With m children per node the moved mass is at most m * delta.
  """
  B, N, _ = target_logits.shape
  rows = jnp.arange(B)[:, None]
  p_par = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)[rows, par]  # [B, N, V]
  extra, lent = latent_relaxation(p_par, tokens, neighbors, delta)
  if sample:
    y = choice[rows, par]
    rel = jnp.any(lent & (neighbors[tokens] == y[..., None]), axis=-1)
  else:
    p_d = jnp.take_along_axis(p_par, tokens[..., None], -1)[..., 0]
    rel = (extra > 0) & (p_d + extra >= jnp.max(p_par, axis=-1))
  rel &= child
  exact = child & (tokens == choice[rows, par])
  sib = child[:, :, None] & child[:, None, :] & (par[:, :, None] == par[:, None, :])  # [B, N, N]
  exact_sibling = jnp.any(sib & exact[:, None, :], axis=-1)
  earlier = jnp.arange(N)[None, :] < jnp.arange(N)[:, None]  # [i, j]: j before i
  earlier_rel = jnp.any(sib & earlier[None] & rel[:, None, :], axis=-1)
  return rel & ~exact_sibling & ~earlier_rel


def verify_tree(target_logits: Array, tokens: Array, parents: Array, depth: Array,
                valid: Array, keys: Array, sample: bool, max_depth: int,
                offsets: Optional[Array] = None,
                acceptance: Acceptance = Strict()) -> TreeVerdict:
  """Verifies a token tree per row.

  target_logits: [B, N, V] processed target logits after each node. tokens: [B, N] node
  tokens (node 0, the root, is the last emitted token). parents: [B, N] int32, -1 for the
  root, parents[i] < i. depth: [B, N] int32 (root 0). valid: [B, N] bool (padding nodes
  are never accepted). keys/offsets as in `verify_chain`: the target's choice at a node of
  depth d uses the key of token index offset + d. max_depth: static bound on depth.
  A node is accepted when its token is the target's choice at its parent and its parent is
  accepted; `acceptance=Lantern(neighbors, delta)` also accepts relaxed matches
  (`_relaxed_tree_matches`; LOSSY). The token after the deepest accepted node is the
  target's own choice there, which no child matched.
  """
  B, N, _ = target_logits.shape
  offsets = jnp.zeros((B,), jnp.int32) if offsets is None else offsets
  pkeys = position_keys(keys, offsets, max_depth + 1)  # [B, D+1, 2]
  node_keys = jnp.take_along_axis(pkeys, jnp.clip(depth, 0, max_depth)[..., None], axis=1)
  choice = target_choice(target_logits, node_keys, sample)  # [B, N]
  rows = jnp.arange(B)[:, None]
  par = jnp.maximum(parents, 0)
  child = valid & (parents >= 0)
  ok = child & (tokens == choice[rows, par])
  if isinstance(acceptance, Lantern) and float(acceptance.delta) > 0:
    ok |= _relaxed_tree_matches(target_logits, tokens, par, choice, child, sample,
                                acceptance.neighbors, float(acceptance.delta))
  ok = ok.at[:, 0].set(True)
  path_ok = ok
  for _ in range(max_depth):  # a node is accepted iff it and all its ancestors match
    path_ok = ok & path_ok[rows, par]
  score = jnp.where(path_ok, depth * N + (N - 1 - jnp.arange(N))[None], -1)
  last = jnp.argmax(score, axis=-1).astype(jnp.int32)  # deepest accepted (lowest index on ties)
  n = depth[jnp.arange(B), last].astype(jnp.int32)
  # Walk up from `last`, filling path[d-1] with the ancestor at depth d.
  path = jnp.zeros((B, max_depth), jnp.int32)
  cur = last
  for _ in range(max_depth):
    d = depth[jnp.arange(B), cur]
    write = d >= 1
    path = path.at[jnp.arange(B), jnp.clip(d - 1, 0, max_depth - 1)].set(
        jnp.where(write, cur, path[jnp.arange(B), jnp.clip(d - 1, 0, max_depth - 1)]))
    cur = jnp.where(write, parents[jnp.arange(B), cur], cur)
  return TreeVerdict(num_accepted=n, path=path, next_token=choice[jnp.arange(B), last])

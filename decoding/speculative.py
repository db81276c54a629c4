"""Lossless speculative decoding: one jitted loop for every drafter, ragged batches included.

Each iteration a drafter proposes tokens (a chain of K, or a token tree of N nodes), the
target scores them all in one forward pass, `decoding.verify` decides per row how many
to keep, and each row advances by its own number of tokens:

  1. propose:  chain d_1..d_K (with the draft distributions q_j when sampled), or a tree
               whose root is the row's last emitted token x;
  2. score:    one target call on [x, d_1..d_K] (causal) or on the tree's nodes (ancestor
               mask, RoPE position = row length - 1 + node depth), writing their keys and
               values into the KV cache at the row's own length;
  3. verify:   the shared core (greedy: the target's argmax; sampling: rejection
               sampling) gives n accepted drafts and one target token;
  4. commit:   emit d_1..d_n and the target token (stopping at EOS / max_new_tokens), roll
               each row's cache back to its accepted length (trees first move the accepted
               path's entries into consecutive slots, `KVCache.compact`), and let the
               drafter update its own state.

Invariant between iterations: row b's sequence is `sequences[b, :seq_len[b]]` and the
target cache holds every token of it except the last one, x = sequences[b, seq_len-1],
which is fed at the next call. The first generated token comes from the prefill's logits,
exactly as in the token-by-token loop (`decoding.core`), so the output of greedy
speculative decoding is the output of greedy decoding, token for token, and sampling with
a deterministic drafter reproduces ancestral sampling with the same seed (see
`decoding.verify` for the keys).

The logits processors (penalties, bans, warpers) are applied to the target logits at
every verified position with that position's own context (the row's sequence followed by
the draft path to it), and drafters apply the same processors to their own logits.

Mean accepted tokens per target call (tau): for a row, the tokens emitted by verification
calls (accepted drafts plus the target's own token, truncated at EOS and at
max_new_tokens) divided by the number of verification calls made while the row was
active. The first token, produced by the prefill, counts in neither. For a batch or a
benchmark, tau is the ratio of the sums over rows (a token-weighted mean). tau = 1 means
every draft was rejected; a chain of K drafts gives tau <= K + 1.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from decoding import core, verify
from decoding.processors import LogitsProcessor, ProcessorContext

Array = jax.Array


# ----------------------------------------------------------------------------- protocol


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
           prefill: PrefillInfo, cache_len: int) -> Any:
    return ()

  def propose(self, dparams, tparams, state, view: DraftView, processor: LogitsProcessor,
              sample: bool):
    raise NotImplementedError

  def update(self, dparams, tparams, state, view: DraftView, verified: Verified) -> Any:
    return state


# ------------------------------------------------------------------------------- state


@flax.struct.dataclass
class SpecState:
  sequences: Array  # [B, S]
  seq_len: Array  # [B]
  prompt_len: Array  # [B]
  done: Array  # [B] bool
  num_generated: Array  # [B]
  token_logprobs: Array  # [B, N]
  processed_logprobs: Array  # [B, N]
  token_entropy: Array  # [B, N]
  token_mean_logp: Array  # [B, N]
  cache: Any  # target KVCache: every token of the row except the last one
  drafter_state: Any
  row_keys: Array  # [B, 2]
  target_calls: Array  # [B] verification calls while the row was active
  accepted: Array  # [B] draft tokens emitted
  emitted: Array  # [B] tokens emitted by verification calls


def _record(arr: Array, values: Array, start: Array, count: Array) -> Array:
  """arr[b, start[b] + j] = values[b, j] for j < count[b] (others dropped)."""
  B, N = arr.shape
  J = values.shape[1]
  j = jnp.arange(J)[None]
  idx = jnp.where(j < count[:, None], start[:, None] + j, N)  # N is out of range: dropped
  return arr.at[jnp.arange(B)[:, None], idx].set(values.astype(arr.dtype), mode="drop")


def _path_tokens(tokens: Array, parents: Array, depth: Array, max_depth: int) -> Array:
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


def process_block(processor: LogitsProcessor, reads_context: bool, logits: Array,
                  view: DraftView, tokens: Array, parents: Array, depth: Array,
                  max_depth: int) -> Array:
  """Applies the processors to the target logits of every block position ([B, M, V]),
  each with its own context: the row's sequence followed by the path of drafts to it."""
  B, M, V = logits.shape
  flat = logits.reshape(B * M, V)
  if not reads_context:  # warpers only: the context is never read
    ctx = ProcessorContext(sequences=view.sequences[:1], seq_len=view.seq_len[:1],
                           prompt_len=view.prompt_len[:1], step=jnp.zeros((), jnp.int32))
    return processor(flat, ctx).reshape(B, M, V)
  S = view.sequences.shape[1]
  path = _path_tokens(tokens, parents, depth, max_depth)  # [B, M, D]
  pos = view.seq_len[:, None, None] + jnp.arange(max_depth)[None, None]  # [B, 1, D]
  pos = jnp.where(jnp.arange(max_depth)[None, None] < depth[:, :, None], pos, S)  # drop
  seqs = jnp.broadcast_to(view.sequences[:, None], (B, M, S))
  seqs = seqs.at[jnp.arange(B)[:, None, None], jnp.arange(M)[None, :, None], pos].set(
      path, mode="drop")
  rep = lambda x: jnp.repeat(x, M, axis=0)
  ctx = ProcessorContext(sequences=seqs.reshape(B * M, S),
                         seq_len=(view.seq_len[:, None] + depth).reshape(-1),
                         prompt_len=rep(view.prompt_len),
                         step=(view.num_generated[:, None] + depth).reshape(-1))
  return processor(flat, ctx).reshape(B, M, V)


def _view(s: SpecState) -> DraftView:
  return DraftView(sequences=s.sequences, seq_len=s.seq_len, prompt_len=s.prompt_len,
                   num_generated=s.num_generated, active=~s.done, row_keys=s.row_keys)


def chain_tree(B: int, K: int) -> tuple[Array, Array]:
  """parents and depth of a chain of K drafts below the root: ([B, K+1], [B, K+1])."""
  parents = jnp.broadcast_to(jnp.arange(K + 1, dtype=jnp.int32)[None] - 1, (B, K + 1))
  return parents, jnp.broadcast_to(jnp.arange(K + 1, dtype=jnp.int32)[None], (B, K + 1))


# -------------------------------------------------------------------------------- loop


def init(lm, params, drafter: Drafter, dparams, prompts: Array, prompt_len: Array,
         row_keys: Array, eos_ids: Array, processor: LogitsProcessor, sample: bool,
         pad_id: int, max_new_tokens: int, cache_len: int) -> SpecState:
  """Prefill, the first token (from the prefill logits, as the token loop does) and the
  drafter's initial state."""
  B, P = prompts.shape
  M = drafter.block
  cache = jax.lax.optimization_barrier(lm.init_cache(B, cache_len))
  logits, cache, *hidden = core.prefill(lm, params, prompts, prompt_len, cache,
                                        return_hidden=drafter.needs_features)
  hidden = hidden[0] if hidden else None
  S = P + max_new_tokens + M + 1
  sequences = jnp.full((B, S), pad_id, jnp.int32).at[:, :P].set(prompts)
  sequences = jnp.where(jnp.arange(S)[None] < prompt_len[:, None], sequences, pad_id)
  zeros = jnp.zeros((B, max_new_tokens), jnp.float32)
  view = DraftView(sequences=sequences, seq_len=prompt_len, prompt_len=prompt_len,
                   num_generated=jnp.zeros((B,), jnp.int32), active=jnp.ones((B,), bool),
                   row_keys=row_keys)
  processed = processor(logits, view.context())
  keys = verify.position_keys(row_keys, jnp.zeros((B,), jnp.int32), 1)[:, 0]
  first = verify.target_choice(processed, keys, sample)  # [B]
  raw_logp = jax.nn.log_softmax(logits, axis=-1)
  proc_logp = jax.nn.log_softmax(processed, axis=-1)
  rows = jnp.arange(B)
  entropy, mean_logp = core.distribution_stats(raw_logp)
  is_eos = jnp.any(first[:, None] == eos_ids[None, :], axis=-1)
  dstate = drafter.init(dparams, params, prompts, prompt_len, first,
                        PrefillInfo(logits=logits, hidden=hidden), cache_len)
  zero_i = jnp.zeros((B,), jnp.int32)
  return SpecState(
      sequences=sequences.at[rows, prompt_len].set(first), seq_len=prompt_len + 1,
      prompt_len=prompt_len, done=is_eos | (max_new_tokens <= 1),
      num_generated=jnp.ones((B,), jnp.int32),
      token_logprobs=zeros.at[:, 0].set(raw_logp[rows, first]),
      processed_logprobs=zeros.at[:, 0].set(proc_logp[rows, first]),
      token_entropy=zeros.at[:, 0].set(entropy), token_mean_logp=zeros.at[:, 0].set(mean_logp),
      cache=cache, drafter_state=dstate, row_keys=row_keys, target_calls=zero_i,
      accepted=zero_i, emitted=zero_i)


def step(lm, params, drafter: Drafter, dparams, s: SpecState, eos_ids: Array,
         processor: LogitsProcessor, reads_context: bool, sample: bool,
         max_new_tokens: int, relaxation: tuple = (), proposal=None,
         neighbors: Optional[Array] = None) -> SpecState:
  """One propose / score / verify / commit iteration for the whole batch. `proposal`:
  (draft, drafter state) already proposed (a chain may carry fewer than num_draft tokens,
  down to none: a plain target step)."""
  B = s.seq_len.shape[0]
  view = _view(s)
  active = view.active
  if proposal is None:
    proposal = drafter.propose(dparams, params, s.drafter_state, view, processor, sample)
  draft, dstate = proposal
  last = s.sequences[jnp.arange(B), s.seq_len - 1]
  if drafter.kind == "chain":
    K = D = draft.tokens.shape[1]
    tokens = jnp.concatenate([last[:, None], draft.tokens.astype(jnp.int32)], axis=1)
    parents, depth = chain_tree(B, K)
    mask = None
  else:
    D = drafter.depth
    tokens = draft.tokens.astype(jnp.int32).at[:, 0].set(last)
    parents, depth = draft.parents, draft.depth
    mask = verify.ancestor_matrix(parents, D)
  start = s.seq_len - 1  # cache slot of the root
  positions = start[:, None] + depth
  cache = s.cache.with_lengths(start)
  out = lm(params, tokens, positions, cache, mask)
  processed = process_block(processor, reads_context, out.logits, view, tokens, parents, depth, D)
  offsets = s.num_generated
  if drafter.kind == "chain" and relaxation and relaxation[0] == "gad_plus":
    v = verify.verify_chain_relaxed(processed, tokens[:, 1:], relaxation[1], relaxation[2])
  elif drafter.kind == "chain":
    lenience = relaxation[1] if relaxation and relaxation[0] == "lenient" else 1.0
    delta = relaxation[1] if relaxation and relaxation[0] == "lantern" else 0.0
    v = verify.verify_chain(processed, tokens[:, 1:], draft.probs if sample else None,
                            s.row_keys, sample, offsets, lenience, neighbors, delta)
  if drafter.kind == "chain":
    n = v.num_accepted
    j = jnp.arange(K + 1)[None]
    nxt = v.next_token
    node_index = jnp.broadcast_to(j, (B, K + 1))
    drafted = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # [B, K+1]
    emitted = jnp.where(j < n[:, None], drafted, nxt[:, None])
    new_cache = out.cache
  else:
    v = verify.verify_tree(processed, tokens, parents, depth, draft.valid, s.row_keys, sample,
                           D, offsets)
    n, nxt = v.num_accepted, v.next_token
    j = jnp.arange(D + 1)[None]
    node_index = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), v.path], axis=1)
    path_tokens = jnp.take_along_axis(tokens, v.path, axis=1)
    emitted = jnp.where(j < n[:, None],
                        jnp.concatenate([path_tokens, path_tokens[:, :1]], axis=1), nxt[:, None])
    new_cache = out.cache.compact(start, v.path)
  # How many of the n + 1 tokens to keep: stop after EOS and at the length budget.
  is_eos = jnp.any(emitted[..., None] == eos_ids[None, None, :], axis=-1) & (j <= n[:, None])
  first_eos = jnp.min(jnp.where(is_eos, j, j.shape[1]), axis=1)
  remaining = max_new_tokens - s.num_generated
  count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), remaining)
  count = jnp.where(active, count, 0)
  # Statistics of the target at the positions that predicted the emitted tokens.
  rows = jnp.arange(B)[:, None]
  raw_logp = jax.nn.log_softmax(out.logits, axis=-1)[rows, node_index]  # [B, D+1, V]
  proc_logp = jax.nn.log_softmax(processed, axis=-1)[rows, node_index]
  pick = lambda lp: jnp.take_along_axis(lp, emitted[..., None], -1)[..., 0]
  entropy, mean_logp = core.distribution_stats(raw_logp)
  g = s.num_generated
  new_seq_len = s.seq_len + count
  s2 = s.replace(
      sequences=_record(s.sequences, emitted, s.seq_len, count),
      seq_len=new_seq_len,
      done=s.done | (active & ((first_eos < count) | (g + count >= max_new_tokens))),
      num_generated=g + count,
      token_logprobs=_record(s.token_logprobs, pick(raw_logp), g, count),
      processed_logprobs=_record(s.processed_logprobs, pick(proc_logp), g, count),
      token_entropy=_record(s.token_entropy, entropy, g, count),
      token_mean_logp=_record(s.token_mean_logp, mean_logp, g, count),
      cache=new_cache.with_lengths(start + count),
      target_calls=s.target_calls + active,
      accepted=s.accepted + jnp.where(active, jnp.minimum(n, count), 0),
      emitted=s.emitted + count)
  verified = Verified(old_seq_len=s.seq_len, count=count, num_accepted=n, emitted=emitted,
                      node_index=node_index, hidden=out.hidden, penultimate=out.penultimate,
                      logits=processed)
  dstate = drafter.update(dparams, params, dstate, _view(s2), verified)
  return s2.replace(drafter_state=dstate)


def finalize(s: SpecState, pad_id: int, max_new_tokens: int) -> core.DecodeResult:
  idx = s.prompt_len[:, None] + jnp.arange(max_new_tokens)[None]
  tokens = jnp.take_along_axis(s.sequences, jnp.clip(idx, 0, s.sequences.shape[1] - 1), axis=1)
  valid = jnp.arange(max_new_tokens)[None] < s.num_generated[:, None]
  mask = lambda x: jnp.where(valid, x, 0.0)
  tlp = mask(s.token_logprobs)
  tokens = jnp.where(valid, tokens, pad_id)
  return core.DecodeResult(
      tokens=tokens, lengths=s.num_generated, token_logprobs=tlp,
      processed_logprobs=mask(s.processed_logprobs), scores=tlp.sum(-1),
      finished=s.done,  # set to "ended with EOS" by the caller, which knows the EOS ids
      token_entropy=mask(s.token_entropy), token_mean_logp=mask(s.token_mean_logp),
      extras={"target_calls": s.target_calls, "accepted_drafts": s.accepted,
              "verified_tokens": s.emitted})


RELAXATIONS = ("gad_plus", "lenient", "lantern")


@functools.partial(jax.jit, static_argnames=("lm", "drafter", "processor", "reads_context",
                                             "sample", "pad_id", "max_new_tokens",
                                             "cache_len", "relaxation"))
def speculative_decode(lm, params, drafter: Drafter, dparams, prompts: Array, prompt_len: Array,
                       row_keys: Array, eos_ids: Array, *, processor: LogitsProcessor,
                       reads_context: bool, sample: bool, pad_id: int, max_new_tokens: int,
                       cache_len: int, relaxation: tuple = (),
                       neighbors: Optional[Array] = None) -> core.DecodeResult:
  """Speculative decoding of a ragged batch, jitted (static shapes: bucket them).

  prompts [B, P] right-padded, prompt_len [B] (>= 1), row_keys [B, 2], eos_ids [E].
  `cache_len` must hold P + max_new_tokens + drafter.block slots. Returns a DecodeResult
  whose `extras` hold per-row `target_calls`, `accepted_drafts` and `verified_tokens`
  (tau = verified_tokens / target_calls).

  relaxation: () for lossless verification, or a LOSSY acceptance rule for chains:
  ("gad_plus", beta, tau) (greedy; `verify.verify_chain_relaxed`) or ("lenient", epsilon)
  (sampling; DistillSpec's lenience, `verify.verify_chain`) or ("lantern", delta) with the
  latent-neighbour table `neighbors` [V, k] (LANTERN, greedy or sampling; `decoding.lantern`).
  """
  if relaxation:
    if relaxation[0] not in RELAXATIONS or drafter.kind != "chain":
      raise ValueError(f"relaxation {relaxation!r}: one of {RELAXATIONS}, chain drafters only")
    if relaxation[0] == "lantern":
      if neighbors is None:
        raise ValueError("the lantern relaxation needs the latent-neighbour table")
    elif (relaxation[0] == "gad_plus") == sample:
      raise ValueError("gad_plus relaxes greedy verification, lenient relaxes sampling")
  s = init(lm, params, drafter, dparams, prompts, prompt_len, row_keys, eos_ids, processor,
           sample, pad_id, max_new_tokens, cache_len)

  def cond(s):
    return ~jnp.all(s.done)

  run = functools.partial(step, lm, params, drafter, dparams, eos_ids=eos_ids,
                          processor=processor, reads_context=reads_context, sample=sample,
                          max_new_tokens=max_new_tokens, relaxation=relaxation,
                          neighbors=neighbors)

  def propose(s):
    return drafter.propose(dparams, params, s.drafter_state, _view(s), processor, sample)

  if not getattr(drafter, "plain_when_unmatched", False):
    def body(s):
      return run(s, proposal=propose(s))
  else:
    # Plain one-token calls while no active row has a match, then (at most) one speculative
    # call. Both are while loops, not a lax.cond, so the cache is updated in place (a
    # conditional would copy it on every iteration).
    def unmatched(s):
      return ~jnp.all(s.done) & ~jnp.any(propose(s)[0].matched & ~s.done)

    def plain(s):
      draft, dstate = propose(s)
      return run(s, proposal=(ChainDraft(tokens=draft.tokens[:, :0]), dstate))

    def body(s):
      s = jax.lax.while_loop(unmatched, plain, s)
      return jax.lax.while_loop(lambda c: ~c[1] & ~jnp.all(c[0].done),
                                lambda c: (run(c[0], proposal=propose(c[0])), jnp.bool_(True)),
                                (s, jnp.bool_(False)))[0]

  s = jax.lax.while_loop(cond, body, s)
  res = finalize(s, pad_id, max_new_tokens)
  # finished = the row's last token is EOS
  last = jnp.take_along_axis(res.tokens, jnp.maximum(res.lengths - 1, 0)[:, None], 1)[:, 0]
  ended = jnp.any(last[:, None] == eos_ids[None, :], axis=-1) & (res.lengths > 0)
  return res.replace(finished=ended)

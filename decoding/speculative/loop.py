"""Lossless speculative decoding: one jitted loop for every drafter, ragged batches included.

Each iteration a drafter proposes tokens (a chain of K, or a token tree of N nodes), the
target scores them all in one forward pass, `decoding.speculative.verify` decides per row how many
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
exactly as in the token-by-token loop (`decoding.token_loop`), so the output of greedy
speculative decoding is the output of greedy decoding, token for token, and sampling with
a deterministic drafter reproduces ancestral sampling with the same seed (see
`decoding.speculative.verify` for the keys). Relaxed, LOSSY acceptance rules
(`decoding.speculative.acceptance`) trade that exactness for longer accepted runs.

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
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from decoding.prefill import new_cache, prefill
from decoding.processors import LogitsProcessor, ProcessorContext
from decoding.records import DecodeResult, TokenRecord, token_stats
from decoding.speculative import verify
from decoding.speculative.acceptance import Acceptance, Strict
from decoding.speculative.protocol import (ChainDraft, DraftView, Drafter, PrefillInfo, Verified,
                                           chain_tree, path_tokens)

Array = jax.Array


@flax.struct.dataclass
class SpecState:
  sequences: Array  # [B, S]
  seq_len: Array  # [B]
  prompt_len: Array  # [B]
  done: Array  # [B] bool
  num_generated: Array  # [B]
  record: TokenRecord  # [B, N]
  cache: Any  # target KVCache: every token of the row except the last one
  drafter_state: Any
  row_keys: Array  # [B, 2]
  target_calls: Array  # [B] verification calls while the row was active
  accepted: Array  # [B] draft tokens emitted
  emitted: Array  # [B] tokens emitted by verification calls

  @property
  def view(self) -> DraftView:
    return DraftView(sequences=self.sequences, seq_len=self.seq_len, prompt_len=self.prompt_len,
                     num_generated=self.num_generated, active=~self.done,
                     row_keys=self.row_keys)


def process_block(processor: LogitsProcessor, logits: Array, view: DraftView, tokens: Array,
                  parents: Array, depth: Array, max_depth: int) -> Array:
  """Applies the processors to the target logits of every block position ([B, M, V]),
  each with its own context: the row's sequence followed by the path of drafts to it."""
  B, M, V = logits.shape
  flat = logits.reshape(B * M, V)
  if not processor.reads_context:  # warpers only: the context is never read
    ctx = ProcessorContext(sequences=view.sequences[:1], seq_len=view.seq_len[:1],
                           prompt_len=view.prompt_len[:1], step=jnp.zeros((), jnp.int32))
    return processor(flat, ctx).reshape(B, M, V)
  S = view.sequences.shape[1]
  path = path_tokens(tokens, parents, depth, max_depth)  # [B, M, D]
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


# -------------------------------------------------------------------------------- loop


def init(lm, params, drafter: Drafter, dparams, prompts: Array, prompt_len: Array,
         row_keys: Array, eos_ids: Array, processor: LogitsProcessor, sample: bool,
         pad_id: int, max_new_tokens: int, cache_len: int) -> SpecState:
  """Prefill, the first token (from the prefill logits, as the token loop does) and the
  drafter's initial state."""
  B, P = prompts.shape
  M = drafter.block
  logits, cache, *hidden = prefill(lm, params, prompts, prompt_len, new_cache(lm, B, cache_len),
                                   return_hidden=drafter.needs_features)
  hidden = hidden[0] if hidden else None
  S = P + max_new_tokens + M + 1
  sequences = jnp.full((B, S), pad_id, jnp.int32).at[:, :P].set(prompts)
  sequences = jnp.where(jnp.arange(S)[None] < prompt_len[:, None], sequences, pad_id)
  view = DraftView(sequences=sequences, seq_len=prompt_len, prompt_len=prompt_len,
                   num_generated=jnp.zeros((B,), jnp.int32), active=jnp.ones((B,), bool),
                   row_keys=row_keys)
  processed = processor(logits, view.context())
  keys = verify.position_keys(row_keys, jnp.zeros((B,), jnp.int32), 1)[:, 0]
  first = verify.target_choice(processed, keys, sample)  # [B]
  stats = token_stats(first, jax.nn.log_softmax(logits, axis=-1),
                      jax.nn.log_softmax(processed, axis=-1))
  record = TokenRecord.empty((B, max_new_tokens), pad_id).write(
      0, jax.tree.map(lambda x: x[:, None], stats))
  is_eos = jnp.any(first[:, None] == eos_ids[None, :], axis=-1)
  dstate = drafter.init(dparams, params, prompts, prompt_len, first,
                        PrefillInfo(logits=logits, hidden=hidden), cache_len)
  zero_i = jnp.zeros((B,), jnp.int32)
  return SpecState(
      sequences=sequences.at[jnp.arange(B), prompt_len].set(first), seq_len=prompt_len + 1,
      prompt_len=prompt_len, done=is_eos | (max_new_tokens <= 1),
      num_generated=jnp.ones((B,), jnp.int32), record=record, cache=cache,
      drafter_state=dstate, row_keys=row_keys, target_calls=zero_i, accepted=zero_i,
      emitted=zero_i)


def step(lm, params, drafter: Drafter, dparams, s: SpecState, proposal, eos_ids: Array,
         processor: LogitsProcessor, sample: bool, max_new_tokens: int,
         acceptance: Acceptance) -> SpecState:
  """One score / verify / commit iteration for the whole batch, on `proposal` = (draft,
  drafter state) from `drafter.propose` (a chain may carry fewer than num_draft tokens,
  down to none: a plain target step)."""
  B = s.seq_len.shape[0]
  view = s.view
  active = view.active
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
  out = lm(params, tokens, positions, s.cache.with_lengths(start), mask)
  processed = process_block(processor, out.logits, view, tokens, parents, depth, D)
  offsets = s.num_generated
  if drafter.kind == "chain":
    v = verify.verify_chain(processed, tokens[:, 1:], draft.probs if sample else None,
                            s.row_keys, sample, offsets, acceptance)
    n = v.num_accepted
    j = jnp.arange(K + 1)[None]
    node_index = jnp.broadcast_to(j, (B, K + 1))
    drafted = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # [B, K+1]
    emitted = jnp.where(j < n[:, None], drafted, v.next_token[:, None])
    new_cache = out.cache
  else:
    v = verify.verify_tree(processed, tokens, parents, depth, draft.valid, s.row_keys, sample,
                           D, offsets, acceptance)
    n = v.num_accepted
    j = jnp.arange(D + 1)[None]
    node_index = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), v.path], axis=1)
    path_toks = jnp.take_along_axis(tokens, v.path, axis=1)
    emitted = jnp.where(j < n[:, None],
                        jnp.concatenate([path_toks, path_toks[:, :1]], axis=1),
                        v.next_token[:, None])
    new_cache = out.cache.compact(start, v.path)
  # How many of the n + 1 tokens to keep: stop after EOS and at the length budget.
  is_eos = jnp.any(emitted[..., None] == eos_ids[None, None, :], axis=-1) & (j <= n[:, None])
  first_eos = jnp.min(jnp.where(is_eos, j, j.shape[1]), axis=1)
  remaining = max_new_tokens - s.num_generated
  count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), remaining)
  count = jnp.where(active, count, 0)
  # The record of the target at the positions that predicted the emitted tokens.
  rows = jnp.arange(B)[:, None]
  stats = token_stats(emitted, jax.nn.log_softmax(out.logits, axis=-1)[rows, node_index],
                      jax.nn.log_softmax(processed, axis=-1)[rows, node_index])
  g = s.num_generated
  s2 = s.replace(
      sequences=s.sequences.at[rows, jnp.where(j < count[:, None], s.seq_len[:, None] + j,
                                               s.sequences.shape[1])].set(emitted, mode="drop"),
      seq_len=s.seq_len + count,
      done=s.done | (active & ((first_eos < count) | (g + count >= max_new_tokens))),
      num_generated=g + count,
      record=s.record.write(g, stats, count),
      cache=new_cache.with_lengths(start + count),
      target_calls=s.target_calls + active,
      accepted=s.accepted + jnp.where(active, jnp.minimum(n, count), 0),
      emitted=s.emitted + count)
  verified = Verified(old_seq_len=s.seq_len, count=count, num_accepted=n, emitted=emitted,
                      node_index=node_index, hidden=out.hidden, penultimate=out.penultimate,
                      logits=processed)
  dstate = drafter.update(dparams, params, dstate, s2.view, verified)
  return s2.replace(drafter_state=dstate)


def finalize(s: SpecState, eos_ids: Array, pad_id: int) -> DecodeResult:
  record = s.record.finalize(s.num_generated, pad_id)
  last = jnp.take_along_axis(record.tokens, jnp.maximum(s.num_generated - 1, 0)[:, None], 1)[:, 0]
  ended = jnp.any(last[:, None] == eos_ids[None, :], axis=-1) & (s.num_generated > 0)
  return DecodeResult(record=record, lengths=s.num_generated,
                      scores=record.token_logprobs.sum(-1), finished=ended,
                      extras={"target_calls": s.target_calls, "accepted_drafts": s.accepted,
                              "verified_tokens": s.emitted})


@functools.partial(jax.jit, static_argnames=("lm", "drafter", "processor", "sample", "pad_id",
                                             "max_new_tokens", "cache_len"))
def speculative_decode(lm, params, drafter: Drafter, dparams, prompts: Array, prompt_len: Array,
                       row_keys: Array, eos_ids: Array, *, processor: LogitsProcessor,
                       sample: bool, pad_id: int, max_new_tokens: int, cache_len: int,
                       acceptance: Acceptance = Strict()) -> DecodeResult:
  """Speculative decoding of a ragged batch, jitted (static shapes: bucket them).

  prompts [B, P] right-padded, prompt_len [B] (>= 1), row_keys [B, 2], eos_ids [E].
  `cache_len` >= P + max_new_tokens, as for the other loops: the caches get the drafter's
  `extra_slots` on top. `acceptance`: `Strict()` (lossless) or a LOSSY rule
  (`decoding.speculative.acceptance`, checked by the caller against the mode and drafter).
  Returns a DecodeResult whose `extras` hold per-row `target_calls`, `accepted_drafts` and
  `verified_tokens` (tau = verified_tokens / target_calls).
  """
  s = init(lm, params, drafter, dparams, prompts, prompt_len, row_keys, eos_ids, processor,
           sample, pad_id, max_new_tokens, cache_len + drafter.extra_slots)
  run = functools.partial(step, lm, params, drafter, dparams, eos_ids=eos_ids,
                          processor=processor, sample=sample, max_new_tokens=max_new_tokens,
                          acceptance=acceptance)

  def propose(s):
    return drafter.propose(dparams, params, s.drafter_state, s.view, processor, sample)

  if not drafter.plain_when_unmatched:
    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done), lambda s: run(s, propose(s)), s)
    return finalize(s, eos_ids, pad_id)

  # Plain one-token calls while no active row has a match, then (at most) one speculative
  # call. Both are while loops, not a lax.cond, so the cache is updated in place (a
  # conditional would copy it on every iteration). Each state is proposed for once: the
  # proposal travels in the loop carry from the iteration that made the state.
  def unmatched(c):
    s, (draft, _) = c
    return ~jnp.all(s.done) & ~jnp.any(draft.matched & ~s.done)

  def plain(c):
    s, (draft, dstate) = c
    s = run(s, (ChainDraft(tokens=draft.tokens[:, :0]), dstate))
    return s, propose(s)

  def speculative(c):
    s, proposal, _ = c
    s = run(s, proposal)
    return s, propose(s), jnp.bool_(True)

  def body(c):
    c = jax.lax.while_loop(unmatched, plain, c)
    s, proposal, _ = jax.lax.while_loop(lambda c: ~c[2] & ~jnp.all(c[0].done), speculative,
                                        c + (jnp.bool_(False),))
    return s, proposal

  s, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done), body, (s, propose(s)))
  return finalize(s, eos_ids, pad_id)

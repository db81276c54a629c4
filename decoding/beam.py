"""Beam search, beam sampling and diverse (group) beam search, with Hugging Face's semantics.

Beam search keeps K running hypotheses per prompt. Each step scores every one-token
extension of every running hypothesis y by its cumulative score

  s(y v) = s(y) + phi(log p(. | x, y))[v]

where phi are the logits processors applied to the log-softmax of the model (Hugging Face
applies them to log-probs in beam search: penalties and bans, and with `do_sample` the
warpers temperature, top-k, top-p, min-p). Of the K*V extensions it keeps the best
C = max(2, 1 + |EOS|) * K candidates in rank order. A candidate ending in EOS, or any
candidate at the last step (`max_new_tokens`), that ranks among the first K is a finished
hypothesis, scored

  score(y) = s(y) / L(y)^alpha       (alpha = length_penalty, L = generated tokens incl. EOS,
                                      prompt excluded, as HF for decoder-only models)

and kept if it is among the K best finished ones; the K best candidates not ending in EOS
continue. Only the first beam starts with score 0 (the others with -1e9), so the first
step does not pick the same token K times. A prompt is done when K hypotheses are
finished and (HF's `early_stopping`):
  True:     nothing more (stop as soon as K hypotheses are finished);
  False:    the best running score divided by L^alpha at the current length cannot beat
            the worst finished score (HF's heuristic);
  "never":  the same bound, but at length `max_new_tokens` when alpha > 0 (the exact
            bound for non-positive scores: the canonical beam search).
`scores` is HF's `sequences_scores`: score(y) above. Reference: "Sequence to Sequence
Learning with Neural Networks" (Sutskever, Vinyals, Le, 2014) and HF 4.55.4's
`GenerationMixin._beam_search`.

Beam sampling (`do_sample=True`, HF's beam sample) draws the C candidates without
replacement from softmax(s) over the K*V extensions, in draw order (Gumbel-top-k:
"Stochastic Beams and Where to Find Them", Kool, van Hoof, Welling, 2019), with each
row's own key folded with the step; the rest is as above.

Diverse beam search ("Diverse Beam Search: Decoding Diverse Solutions from Neural
Sequence Models", Vijayakumar et al., AAAI 2018) splits the K beams into G groups of
K/G. At each step the groups choose in order g = 1..G, each with an ordinary beam step
on its own beams, after Hamming diversity has augmented its log-probs:

  theta_g(v) = log p(v | y) - lambda * #{beams of groups h < g that chose v at this step}

(lambda = diversity_penalty; a group that is already done counts as having chosen the pad
token with all its beams, as in HF). The diversity term comes first, then the other
processors. As in HF 4.55.4's `_group_beam_search` (with its `BeamSearchScorer`):
  - the *augmented* cumulative score is kept for ranking, for the finished scores and
    for `scores` (the unaugmented log-probs are `token_logprobs`);
  - each group keeps its own K/G finished hypotheses and its own done flag, whose bound
    starts from the best of the group's candidates at this step, EOS ones included;
  - only EOS candidates finish during the search; after the last step the running beams
    of the groups not yet done join their group's finished hypotheses;
  - the returned sequences are the best of all groups' finished hypotheses.
We do NOT stagger the groups in time (the reference Lua code starts group g g-1 steps
late; HF does not): every group advances one token per step. G = 1 is plain beam search
(HF routes it to `_beam_search` too), and lambda = 0 makes the G groups identical.

Beam caches are never recomputed: the prompts are prefilled once (B rows), the cache is
broadcast to B*K rows, and after each step every cache row is gathered from its parent
beam. Rows of a ragged batch are independent: each computes what it would alone.

Results (`DecodeResult` with fields [B, R, ...], best first): `scores` as above,
`token_logprobs` the raw model log-probs of the tokens along each returned beam,
`processed_logprobs` each token's increment of the beam score (processed log-prob,
diversity term included), so scores = sum(processed_logprobs) / L^alpha; `finished` means
ended with EOS (a hypothesis finished at `max_new_tokens` has finished=False).

With do_sample, the top-k / top-p / min-p warpers keep at least max(2, 1 + |EOS|) tokens
per beam, as HF's do in beam sampling (so a beam can always continue without EOS).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decoding import core, generation, processors
from decoding.processors import LogitsProcessor, ProcessorContext
from models.kv_cache import KVCache

Array = jax.Array
NEG = -1.0e9  # HF's score for "cannot be chosen" (initial extra beams, finished candidates)
EARLY_STOPPING = {False: 0, True: 1, "never": 2}  # traced codes, so one compile serves all
_IDENTITY = processors.chain()


@flax.struct.dataclass
class Hyps:
  """Per-position records of hypotheses, each [B, M, N]: 0 (pad_id for tokens) beyond
  a hypothesis' length."""
  tokens: Array  # int32 generated tokens
  token_logprobs: Array  # raw model log p of each token (fp32)
  processed_logprobs: Array  # the token's increment of the beam score (processed log-prob)
  token_entropy: Array  # entropy of the raw model distribution at each position
  token_mean_logp: Array  # (1/V) sum_v log p_model(v) at each position


@flax.struct.dataclass
class Beams:
  """Running and finished hypotheses of each prompt: [B, M, ...] with M = K (all beams)
  or K/G (one group's)."""
  sequences: Array  # [B, M, S] int32: prompt then generated tokens of the running beams
  scores: Array  # [B, M] fp32: cumulative processed (for G > 1 augmented) running scores
  running: Hyps  # [B, M, N]
  finished: Hyps  # [B, M, N]
  fin_scores: Array  # [B, M] fp32: length-penalized scores, -inf for empty slots
  fin_valid: Array  # [B, M] bool: slot holds a finished hypothesis
  fin_eos: Array  # [B, M] bool: that hypothesis ended with EOS
  fin_len: Array  # [B, M] int32: its generated length (EOS included)


@flax.struct.dataclass
class BeamState:
  """Loop state. Group g owns beams g*K/G .. (g+1)*K/G - 1."""
  step: Array  # [] int32: tokens generated so far
  logits: Array  # [B*K, V] fp32: next-token logits of the running beams
  cache: KVCache  # B*K rows, row b*K + k is beam k of prompt b
  prompt_len: Array  # [B] int32
  row_keys: Array  # [B, 2] uint32
  beams: Beams  # [B, K, ...]
  done: Array  # [B, G] bool: the group's finished hypotheses can no longer change


def _take(x: Array, idx: Array) -> Array:
  """x [B, M, ...] gathered along the beam axis with idx [B, M']: [B, M', ...]."""
  return jax.vmap(lambda a, i: a[i])(x, idx)


def init_state(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, *,
               num_beams: int, num_beam_groups: int, pad_id: int, max_new_tokens: int,
               cache_len: int) -> BeamState:
  """Prefills each prompt once and broadcasts its cache and logits to its K beams."""
  B, K, N = prompts.shape[0], num_beams, max_new_tokens
  base = core.init_state(lm, params, prompts, prompt_len, N, cache_len, row_keys, pad_id)
  rows = jnp.repeat(jnp.arange(B), K)
  first = (jnp.arange(K) % (K // num_beam_groups)) == 0  # the first beam of each group
  zeros = jnp.zeros((B, K, N), jnp.float32)
  empty = Hyps(tokens=jnp.full((B, K, N), pad_id, jnp.int32), token_logprobs=zeros,
               processed_logprobs=zeros, token_entropy=zeros, token_mean_logp=zeros)
  beams = Beams(sequences=jnp.repeat(base.sequences[:, None], K, axis=1),
                scores=jnp.broadcast_to(jnp.where(first, 0.0, NEG), (B, K)).astype(jnp.float32),
                running=empty, finished=empty, fin_scores=jnp.full((B, K), -jnp.inf, jnp.float32),
                fin_valid=jnp.zeros((B, K), bool), fin_eos=jnp.zeros((B, K), bool),
                fin_len=jnp.zeros((B, K), jnp.int32))
  return BeamState(step=jnp.zeros((), jnp.int32), logits=base.logits[rows],
                   cache=base.cache.take_rows(rows), prompt_len=prompt_len,
                   row_keys=row_keys, beams=beams, done=jnp.zeros((B, num_beam_groups), bool))


def _merge_finished(b: Beams, new: Hyps, new_scores: Array, eligible: Array, new_eos: Array,
                    length: Array) -> Beams:
  """Keeps the best M of the M finished hypotheses of `b` and the eligible new ones
  ([B, C], with length-penalized `new_scores`, all of generated length `length`)."""
  M = b.fin_scores.shape[1]
  merged = jnp.concatenate([b.fin_scores, jnp.where(eligible, new_scores, -jnp.inf)], axis=1)
  keep = jax.lax.top_k(merged, M)[1]
  merge = lambda old, x: _take(jnp.concatenate([old, x], axis=1), keep)
  return b.replace(finished=jax.tree.map(merge, b.finished, new), fin_scores=_take(merged, keep),
                   fin_valid=merge(b.fin_valid, eligible), fin_eos=merge(b.fin_eos, new_eos),
                   fin_len=merge(b.fin_len, jnp.full(new_eos.shape, length, jnp.int32)))


def _group_step(b: Beams, done: Array, counts: Array, raw: Array, entropy: Array,
                mean_logp: Array, step: Array, prompt_len: Array, row_keys: Array,
                eos_ids: Array, length_penalty: Array, early_stopping: Array,
                diversity_penalty: Array, *, processor: LogitsProcessor, num_beam_groups: int,
                do_sample: bool, max_new_tokens: int) -> tuple[Array, Array, Beams, Array]:
  """One beam step of one group of M = K/G beams.

  b: the group's beams [B, M, ...]; done [B]; counts [B, V]: how many beams of earlier
  groups chose each token at this step; raw [B, M, V]: the raw model log-probs, entropy
  and mean_logp [B, M] their statistics. Returns the parents (within the group) [B, M]
  and tokens [B, M] of the new running beams, the group's new beams and done flag.
  """
  B, M, S = b.sequences.shape
  V = raw.shape[-1]
  C = min(max(2, 1 + eos_ids.shape[0]) * M, M * V)  # candidates kept per row
  logp = raw - diversity_penalty * counts[:, None, :] if num_beam_groups > 1 else raw
  ctx = ProcessorContext(sequences=b.sequences.reshape(B * M, S),
                         seq_len=jnp.repeat(prompt_len + step, M),
                         prompt_len=jnp.repeat(prompt_len, M), step=step)
  proc = processor(logp.reshape(B * M, V), ctx).reshape(B, M, V)
  acc = (proc + b.scores[:, :, None]).reshape(B, M * V)
  if do_sample:  # C draws without replacement from softmax(acc), in draw order
    keys = core.step_keys(row_keys, step)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (M * V,), jnp.float32))(keys)
    idx = jax.lax.top_k(acc + noise, C)[1]
    cand = jnp.take_along_axis(acc, idx, axis=1)
  else:
    cand, idx = jax.lax.top_k(acc, C)  # [B, C], best first
  parent, token = idx // V, (idx % V).astype(jnp.int32)
  is_eos = jnp.any(token[..., None] == eos_ids, axis=-1)
  pick = lambda x: jnp.take_along_axis(x.reshape(B, M * V), idx, axis=1)
  write = lambda rec, v: rec.at[:, :, step].set(v)
  prev = jax.tree.map(lambda x: _take(x, parent), b.running)
  cands = Hyps(tokens=write(prev.tokens, token),
               token_logprobs=write(prev.token_logprobs, pick(raw)),
               processed_logprobs=write(prev.processed_logprobs, pick(proc)),
               token_entropy=write(prev.token_entropy, _take(entropy, parent)),
               token_mean_logp=write(prev.token_mean_logp, _take(mean_logp, parent)))

  # Finished: EOS candidates among the first M ranks; with G = 1 also, at the last step,
  # every candidate among them (HF `_beam_search` finishes them all at once).
  gen_len = (step + 1).astype(jnp.float32)
  last = step == max_new_tokens - 1
  ends = is_eos | (last & (num_beam_groups == 1))
  eligible = ends & (jnp.arange(C) < M)[None] & ~done[:, None]
  b = _merge_finished(b, cands, cand / gen_len ** length_penalty, eligible, is_eos, step + 1)

  # Running: the best M candidates that did not end with EOS.
  masked = cand + jnp.where(is_eos, NEG, 0.0)
  sel = jax.lax.top_k(masked, M)[1]
  parent, token = _take(parent, sel), _take(token, sel)
  pos = (prompt_len + step)[:, None]  # where the new token goes
  rows, cols = jnp.arange(B)[:, None], jnp.arange(M)[None]
  sequences = _take(b.sequences, parent).at[rows, cols, pos].set(token)
  b = b.replace(sequences=sequences, scores=_take(masked, sel),
                running=jax.tree.map(lambda x: _take(x, sel), cands))

  # Done: M hypotheses finished and (early_stopping=True or none can be beaten). The
  # bound starts from the best running score (HF `_beam_search`) or, for G > 1, from the
  # best candidate, EOS ones included (HF `BeamHypotheses.is_done` in group beam search).
  best = cand.max(axis=1) if num_beam_groups > 1 else b.scores[:, 0]
  never_long = (early_stopping == EARLY_STOPPING["never"]) & (length_penalty > 0)
  bound_len = jnp.where(never_long, float(max_new_tokens), gen_len)
  beaten = b.fin_scores.min(axis=1) >= best / bound_len ** length_penalty
  stop = b.fin_valid.all(axis=1) & ((early_stopping == EARLY_STOPPING[True]) | beaten)
  done = done | stop
  if num_beam_groups > 1:  # HF `BeamSearchScorer.finalize`: after the last step the
    # running beams of the groups not done join their finished hypotheses.
    b = _merge_finished(b, b.running, b.scores / gen_len ** length_penalty,
                        jnp.broadcast_to((last & ~done)[:, None], (B, M)),
                        jnp.zeros((B, M), bool), step + 1)
  return parent, token, b, done


def beam_step(lm, params, s: BeamState, eos_ids: Array, length_penalty: Array,
              early_stopping: Array, diversity_penalty: Array, *, processor: LogitsProcessor,
              num_beam_groups: int, do_sample: bool, pad_id: int,
              max_new_tokens: int) -> BeamState:
  """Chooses the next token of every beam, group after group (a scan, so compile time
  does not grow with G), updates the finished hypotheses, then reorders the cache by
  parent beam and runs the model on the new tokens."""
  B, K, _ = s.beams.sequences.shape
  G, M = num_beam_groups, K // num_beam_groups
  V = s.logits.shape[-1]
  raw = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1).reshape(B, K, V)
  entropy, mean_logp = core.distribution_stats(raw)  # [B, K]
  split = lambda x: jnp.moveaxis(x.reshape((B, G, M) + x.shape[2:]), 1, 0)  # [G, B, M, ...]
  join = lambda x: jnp.moveaxis(x, 0, 1).reshape((B, K) + x.shape[3:])

  def group(counts, xs):
    b, was_done, raw_g, ent_g, mean_g = xs
    parent, token, b, done = _group_step(
        b, was_done, counts, raw_g, ent_g, mean_g, s.step, s.prompt_len, s.row_keys, eos_ids,
        length_penalty, early_stopping, diversity_penalty, processor=processor,
        num_beam_groups=G, do_sample=do_sample, max_new_tokens=max_new_tokens)
    chosen = jnp.where(was_done[:, None], pad_id, token)  # a group already done "chooses" pad
    counts = counts.at[jnp.arange(B)[:, None], chosen].add(1.0)
    return counts, (parent, token, b, done)

  xs = (jax.tree.map(split, s.beams), s.done.T, split(raw), split(entropy), split(mean_logp))
  _, (parent, token, beams, done) = jax.lax.scan(group, jnp.zeros((B, V), jnp.float32), xs)
  parent = join(parent + (jnp.arange(G) * M)[:, None, None])  # [B, K] beam index in the row
  token = join(token)
  s = s.replace(step=s.step + 1, beams=jax.tree.map(join, beams), done=done.T)

  def advance(st: BeamState) -> BeamState:
    cache = st.cache.take_rows((jnp.arange(B)[:, None] * K + parent).reshape(-1))
    pos = jnp.repeat(st.prompt_len + st.step - 1, K)[:, None]
    out = lm(params, token.reshape(B * K, 1), pos, cache)
    return st.replace(logits=out.logits[:, 0], cache=out.cache.with_lengths(cache.lengths + 1))

  more = (s.step < max_new_tokens) & ~jnp.all(s.done)
  return jax.lax.cond(more, advance, lambda st: st, s)


def finalize(s: BeamState) -> core.DecodeResult:
  """All K finished hypotheses of each prompt, best first: fields [B, K, ...]."""
  b = s.beams
  order = jax.lax.top_k(b.fin_scores, b.fin_scores.shape[1])[1]
  h = jax.tree.map(lambda x: _take(x, order), b.finished)
  return core.DecodeResult(
      tokens=h.tokens, lengths=_take(b.fin_len, order), token_logprobs=h.token_logprobs,
      processed_logprobs=h.processed_logprobs, scores=_take(b.fin_scores, order),
      finished=_take(b.fin_eos, order), token_entropy=h.token_entropy,
      token_mean_logp=h.token_mean_logp)


@functools.partial(jax.jit, static_argnames=(
    "lm", "processor", "num_beams", "num_beam_groups", "do_sample", "pad_id", "max_new_tokens",
    "cache_len"))
def _search(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, eos_ids: Array,
            length_penalty: Array, early_stopping: Array, diversity_penalty: Array, *,
            processor: LogitsProcessor, num_beams: int, num_beam_groups: int, do_sample: bool,
            pad_id: int, max_new_tokens: int, cache_len: int) -> core.DecodeResult:
  s = init_state(lm, params, prompts, prompt_len, row_keys, num_beams=num_beams,
                 num_beam_groups=num_beam_groups, pad_id=pad_id, max_new_tokens=max_new_tokens,
                 cache_len=cache_len)

  def body(st):
    return beam_step(lm, params, st, eos_ids, length_penalty, early_stopping, diversity_penalty,
                     processor=processor, num_beam_groups=num_beam_groups, do_sample=do_sample,
                     pad_id=pad_id, max_new_tokens=max_new_tokens)

  s = jax.lax.while_loop(lambda st: (st.step < max_new_tokens) & ~jnp.all(st.done), body, s)
  return finalize(s)


def check_args(num_beams, num_return_sequences=1, length_penalty=1.0, early_stopping=False,
               num_beam_groups=1, diversity_penalty=0.0, do_sample=False,
               temperature=1.0) -> None:
  """Raises GenerationError for values beam search cannot run with."""
  err = generation.GenerationError
  for name, v in (("num_beams", num_beams), ("num_beam_groups", num_beam_groups),
                  ("num_return_sequences", num_return_sequences)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise err(f"{name} must be an integer >= 1, got {v!r}")
  if num_beams < 2:
    raise err(f"beam search needs num_beams >= 2, got {num_beams} "
              "(num_beams=1 is greedy decoding: use strategy='greedy')")
  if num_return_sequences > num_beams:
    raise err(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
  if num_beams % num_beam_groups:
    raise err(f"num_beams ({num_beams}) must be divisible by num_beam_groups ({num_beam_groups})")
  if not (isinstance(early_stopping, (bool, np.bool_)) or early_stopping == "never"):
    raise err(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  for name, v in (("length_penalty", length_penalty), ("diversity_penalty", diversity_penalty)):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
      raise err(f"{name} must be a finite number, got {v!r}")
  if diversity_penalty < 0:
    raise err(f"diversity_penalty must be >= 0, got {diversity_penalty}")
  if not isinstance(do_sample, (bool, np.bool_)):
    raise err(f"do_sample must be True or False, got {do_sample!r}")
  if do_sample and num_beam_groups > 1:
    raise err("diverse beam search (num_beam_groups > 1) cannot sample: set do_sample=False")
  if do_sample and not temperature > 0:
    raise err(f"temperature must be > 0 for beam sampling, got {temperature}")


def beam_search(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, eos_ids: Array,
                *, num_beams: int, max_new_tokens: int, cache_len: int, pad_id: int,
                num_return_sequences: int = 1, length_penalty: float = 1.0,
                early_stopping=False, num_beam_groups: int = 1, diversity_penalty: float = 0.0,
                do_sample: bool = False,
                processor: Optional[LogitsProcessor] = None) -> core.DecodeResult:
  """Beam search / beam sampling / diverse beam search (see the module docstring).

  prompts [B, P] int32 right-padded, prompt_len [B], row_keys [B, 2] uint32 (used only
  with do_sample), eos_ids [E] int32. `processor` (default: none) acts on log-probs, as
  from `processors.build(cfg, eos, sampling=do_sample)`. Returns a DecodeResult with
  fields [B, R, ...] (R = num_return_sequences, best first); `scores` is HF's
  `sequences_scores`. One compile serves every length_penalty, early_stopping,
  diversity_penalty and R for given shapes, K, G and do_sample.
  """
  check_args(num_beams, num_return_sequences, length_penalty, early_stopping, num_beam_groups,
             diversity_penalty, do_sample)
  res = _search(lm, params, prompts, prompt_len, row_keys, eos_ids,
                jnp.float32(length_penalty), jnp.int32(EARLY_STOPPING[early_stopping]),
                jnp.float32(diversity_penalty), processor=processor or _IDENTITY,
                num_beams=num_beams, num_beam_groups=num_beam_groups, do_sample=bool(do_sample),
                pad_id=pad_id, max_new_tokens=max_new_tokens, cache_len=cache_len)
  return jax.tree.map(lambda x: x[:, :num_return_sequences], res)


# ---------------------------------------------------------------------------- strategies


def _args(cfg) -> dict:
  get = generation._get
  return dict(num_beams=get(cfg, "num_beams", 1),
              num_return_sequences=get(cfg, "num_return_sequences", 1),
              length_penalty=get(cfg, "length_penalty", 1.0),
              early_stopping=get(cfg, "early_stopping", False),
              num_beam_groups=get(cfg, "num_beam_groups", 1),
              diversity_penalty=get(cfg, "diversity_penalty", 0.0),
              do_sample=get(cfg, "do_sample", False))


def _validate_beam(cfg) -> None:
  a = _args(cfg)
  if a["num_beam_groups"] != 1:
    raise generation.GenerationError(
        f"num_beam_groups={a['num_beam_groups']} needs strategy='diverse_beam'")
  if a["diversity_penalty"] != 0:
    raise generation.GenerationError(
        "diversity_penalty only applies to strategy='diverse_beam' (with num_beam_groups > 1)")
  check_args(**a, temperature=generation._get(cfg, "temperature", 1.0))


def _validate_diverse(cfg) -> None:
  a = _args(cfg)
  if a["do_sample"]:
    raise generation.GenerationError(
        "strategy='diverse_beam' does not sample (as in Hugging Face): set do_sample=False")
  check_args(**a)


def _run(lm, params, prompts, prompt_len, row_keys, eos_ids, cfg, pad_id, max_new_tokens,
         cache_len) -> core.DecodeResult:
  a = _args(cfg)
  eos = [int(e) for e in np.asarray(eos_ids) if e >= 0]
  # HF's beam sampling warpers keep at least one non-EOS token per beam.
  proc = processors.build(cfg, eos, sampling=bool(a["do_sample"]),
                          min_tokens_to_keep=max(2, len(eos) + 1) if a["do_sample"] else 1)
  return beam_search(lm, params, prompts, prompt_len, row_keys, eos_ids, processor=proc,
                     pad_id=pad_id, max_new_tokens=max_new_tokens, cache_len=cache_len, **a)


generation.register_strategy(generation.Strategy("beam", _run, validate=_validate_beam,
                                                 multiple=True))
generation.register_strategy(generation.Strategy("diverse_beam", _run, validate=_validate_diverse,
                                                 multiple=True))

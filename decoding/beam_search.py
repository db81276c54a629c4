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
from typing import Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decoding import processors, token_loop
from decoding.errors import GenerationError
from decoding.processors import LogitsProcessor, ProcessorContext
from decoding.records import DecodeResult, TokenRecord, token_stats
from decoding.settings import Penalties, Sampled, check_int, check_real, settings
from decoding.strategy import Strategy
from models.kv_cache import KVCache

Array = jax.Array
NEG = -1.0e9  # HF's score for "cannot be chosen" (initial extra beams, finished candidates)
EARLY_STOPPING = {False: 0, True: 1, "never": 2}  # traced codes, so one compile serves all


@flax.struct.dataclass
class Beams:
  """Running and finished hypotheses of each prompt: [B, M, ...] with M = K (all beams)
  or K/G (one group's)."""
  sequences: Array  # [B, M, S] int32: prompt then generated tokens of the running beams
  scores: Array  # [B, M] fp32: cumulative processed (for G > 1 augmented) running scores
  running: TokenRecord  # [B, M, N]; processed_logprobs: the token's beam-score increment
  finished: TokenRecord  # [B, M, N]
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
  base = token_loop.init_state(lm, params, prompts, prompt_len, N, cache_len, row_keys, pad_id)
  rows = jnp.repeat(jnp.arange(B), K)
  first = (jnp.arange(K) % (K // num_beam_groups)) == 0  # the first beam of each group
  empty = TokenRecord.empty((B, K, N), pad_id)
  beams = Beams(sequences=jnp.repeat(base.sequences[:, None], K, axis=1),
                scores=jnp.broadcast_to(jnp.where(first, 0.0, NEG), (B, K)).astype(jnp.float32),
                running=empty, finished=empty, fin_scores=jnp.full((B, K), -jnp.inf, jnp.float32),
                fin_valid=jnp.zeros((B, K), bool), fin_eos=jnp.zeros((B, K), bool),
                fin_len=jnp.zeros((B, K), jnp.int32))
  return BeamState(step=jnp.zeros((), jnp.int32), logits=base.logits[rows],
                   cache=base.cache.take_rows(rows), prompt_len=prompt_len,
                   row_keys=row_keys, beams=beams, done=jnp.zeros((B, num_beam_groups), bool))


def _merge_finished(b: Beams, new: TokenRecord, new_scores: Array, eligible: Array, new_eos: Array,
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


def _group_step(b: Beams, done: Array, counts: Array, raw: Array, step: Array,
                prompt_len: Array, row_keys: Array,
                eos_ids: Array, length_penalty: Array, early_stopping: Array,
                diversity_penalty: Array, *, processor: LogitsProcessor, num_beam_groups: int,
                do_sample: bool, max_new_tokens: int) -> tuple[Array, Array, Beams, Array]:
  """One beam step of one group of M = K/G beams.

  b: the group's beams [B, M, ...]; done [B]; counts [B, V]: how many beams of earlier
  groups chose each token at this step; raw [B, M, V]: the raw model log-probs. Returns the parents (within the group) [B, M]
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
    keys = token_loop.step_keys(row_keys, step)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (M * V,), jnp.float32))(keys)
    idx = jax.lax.top_k(acc + noise, C)[1]
    cand = jnp.take_along_axis(acc, idx, axis=1)
  else:
    cand, idx = jax.lax.top_k(acc, C)  # [B, C], best first
  parent, token = idx // V, (idx % V).astype(jnp.int32)
  is_eos = jnp.any(token[..., None] == eos_ids, axis=-1)
  prev = jax.tree.map(lambda x: _take(x, parent), b.running)
  stats = token_stats(token, _take(raw, parent), _take(proc, parent))  # [B, C]
  cands = prev.write(step, jax.tree.map(lambda x: x[..., None], stats))

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
  split = lambda x: jnp.moveaxis(x.reshape((B, G, M) + x.shape[2:]), 1, 0)  # [G, B, M, ...]
  join = lambda x: jnp.moveaxis(x, 0, 1).reshape((B, K) + x.shape[3:])

  def group(counts, xs):
    b, was_done, raw_g = xs
    parent, token, b, done = _group_step(
        b, was_done, counts, raw_g, s.step, s.prompt_len, s.row_keys, eos_ids,
        length_penalty, early_stopping, diversity_penalty, processor=processor,
        num_beam_groups=G, do_sample=do_sample, max_new_tokens=max_new_tokens)
    chosen = jnp.where(was_done[:, None], pad_id, token)  # a group already done "chooses" pad
    counts = counts.at[jnp.arange(B)[:, None], chosen].add(1.0)
    return counts, (parent, token, b, done)

  xs = (jax.tree.map(split, s.beams), s.done.T, split(raw))
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


def finalize(s: BeamState) -> DecodeResult:
  """All K finished hypotheses of each prompt, best first: fields [B, K, ...]."""
  b = s.beams
  order = jax.lax.top_k(b.fin_scores, b.fin_scores.shape[1])[1]
  return DecodeResult(record=jax.tree.map(lambda x: _take(x, order), b.finished),
                      lengths=_take(b.fin_len, order), scores=_take(b.fin_scores, order),
                      finished=_take(b.fin_eos, order))


@functools.partial(jax.jit, static_argnames=(
    "lm", "processor", "num_beams", "num_beam_groups", "do_sample", "pad_id", "max_new_tokens",
    "cache_len"))
def _search(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, eos_ids: Array,
            length_penalty: Array, early_stopping: Array, diversity_penalty: Array, *,
            processor: LogitsProcessor, num_beams: int, num_beam_groups: int, do_sample: bool,
            pad_id: int, max_new_tokens: int, cache_len: int) -> DecodeResult:
  s = init_state(lm, params, prompts, prompt_len, row_keys, num_beams=num_beams,
                 num_beam_groups=num_beam_groups, pad_id=pad_id, max_new_tokens=max_new_tokens,
                 cache_len=cache_len)

  def body(st):
    return beam_step(lm, params, st, eos_ids, length_penalty, early_stopping, diversity_penalty,
                     processor=processor, num_beam_groups=num_beam_groups, do_sample=do_sample,
                     pad_id=pad_id, max_new_tokens=max_new_tokens)

  s = jax.lax.while_loop(lambda st: (st.step < max_new_tokens) & ~jnp.all(st.done), body, s)
  return finalize(s)


def beam_search(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, eos_ids: Array,
                *, num_beams: int, max_new_tokens: int, cache_len: int, pad_id: int,
                num_return_sequences: int = 1, length_penalty: float = 1.0,
                early_stopping=False, num_beam_groups: int = 1, diversity_penalty: float = 0.0,
                do_sample: bool = False,
                processor: LogitsProcessor = processors.IDENTITY) -> DecodeResult:
  """Beam search / beam sampling / diverse beam search (see the module docstring).

  prompts [B, P] int32 right-padded, prompt_len [B], row_keys [B, 2] uint32 (used only
  with do_sample), eos_ids [E] int32. `processor` (default: none) acts on log-probs (the
  strategies pass their settings' processors). Arguments are checked by the settings types
  (`Beam`, `DiverseBeam`), which the strategies construct. Returns a DecodeResult with
  fields [B, R, ...] (R = num_return_sequences, best first); `scores` is HF's
  `sequences_scores`. One compile serves every length_penalty, early_stopping,
  diversity_penalty and R for given shapes, K, G and do_sample.
  """
  res = _search(lm, params, prompts, prompt_len, row_keys, eos_ids,
                jnp.float32(length_penalty), jnp.int32(EARLY_STOPPING[early_stopping]),
                jnp.float32(diversity_penalty), processor=processor,
                num_beams=num_beams, num_beam_groups=num_beam_groups, do_sample=bool(do_sample),
                pad_id=pad_id, max_new_tokens=max_new_tokens, cache_len=cache_len)
  return jax.tree.map(lambda x: x[:, :num_return_sequences], res)


# ---------------------------------------------------------------------------- strategies


@settings
class _BeamCommon(Penalties):
  """Fields of both beam strategies (Hugging Face GenerationConfig names and semantics)."""
  num_beams: int = 4
  num_return_sequences: int = 1  # <= num_beams, best first
  length_penalty: float = 1.0  # finished score = sum of log-probs / generated_length ** alpha
  early_stopping: Union[bool, str] = False  # True | False | "never" (HF's values and default)

  def validate(self) -> None:
    super().validate()
    check_int("num_beams", self.num_beams, 1)
    if self.num_beams < 2:
      raise GenerationError(f"beam search needs num_beams >= 2, got {self.num_beams} "
                            "(num_beams=1 is greedy decoding: use strategy='greedy')")
    check_int("num_return_sequences", self.num_return_sequences, 1)
    if self.num_return_sequences > self.num_beams:
      raise GenerationError(f"num_return_sequences ({self.num_return_sequences}) must be <= "
                            f"num_beams ({self.num_beams})")
    check_real("length_penalty", self.length_penalty)
    if not (isinstance(self.early_stopping, (bool, np.bool_)) or self.early_stopping == "never"):
      raise GenerationError(f"early_stopping must be True, False or 'never', got "
                            f"{self.early_stopping!r}")


@settings
class Beam(_BeamCommon, Sampled):
  """Beam search; with do_sample=True, Hugging Face's beam sampling (the warpers keep at
  least max(2, 1 + number of EOS ids) tokens per beam, as HF's do)."""

  def search_args(self) -> dict:
    return dict(num_beam_groups=1, diversity_penalty=0.0, do_sample=self.do_sample)

  def logits_processor(self, eos_ids) -> processors.Chain:
    if not self.do_sample:
      return self.penalty_processors(eos_ids)
    return processors.chain(self.penalty_processors(eos_ids),
                            self.warper_processors(max(2, len(eos_ids) + 1)))


@settings
class DiverseBeam(_BeamCommon):
  """Diverse beam search with Hamming diversity: num_beam_groups groups of
  num_beams / num_beam_groups beams, each penalized by diversity_penalty for every earlier
  group's choice of the same token (the reference code's lambda = 0.5). 3 groups of 2 beams
  and all 6 hypotheses returned is our choice of a small budget (the reference code's
  default is 2 beams in 2 groups)."""
  num_beams: int = 6
  num_beam_groups: int = 3
  diversity_penalty: float = 0.5
  num_return_sequences: int = 6

  def validate(self) -> None:
    super().validate()
    check_int("num_beam_groups", self.num_beam_groups, 1)
    if self.num_beams % self.num_beam_groups:
      raise GenerationError(f"num_beams ({self.num_beams}) must be divisible by "
                            f"num_beam_groups ({self.num_beam_groups})")
    check_real("diversity_penalty", self.diversity_penalty, 0.0)

  def search_args(self) -> dict:
    return dict(num_beam_groups=self.num_beam_groups, diversity_penalty=self.diversity_penalty,
                do_sample=False)

  def logits_processor(self, eos_ids) -> processors.Chain:
    return self.penalty_processors(eos_ids)


def prepare(s, target, resources):
  proc = s.logits_processor(target.eos_ids)

  def run(batch):
    return beam_search(target.lm, target.params, batch.prompts, batch.prompt_len, batch.row_keys,
                       target.eos_array, num_beams=s.num_beams, max_new_tokens=s.max_new_tokens,
                       cache_len=batch.cache_len, pad_id=target.pad_id,
                       num_return_sequences=s.num_return_sequences,
                       length_penalty=s.length_penalty, early_stopping=s.early_stopping,
                       processor=proc, **s.search_args())
  return run


BEAM = Strategy("beam", Beam, "beam search (Hugging Face semantics), beam sampling with "
                "do_sample=True", prepare=prepare, score_kind="beam_score", speech=True)
DIVERSE_BEAM = Strategy("diverse_beam", DiverseBeam, "diverse beam search with Hamming "
                        "diversity; groups advance together, as in Hugging Face",
                        prepare=prepare, score_kind="beam_score")

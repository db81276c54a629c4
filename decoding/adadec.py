"""AdaDec: greedy decoding that pauses to look ahead where the model is uncertain ("Towards
Better Code Generation: Adaptive Decoding with Uncertainty Guidance", He et al., 2025, arXiv
2506.08980; reference code github.com/SYSUSELab/AdaDec, `llm/generator.py`).

At each step t, with p the raw next-token distribution (before any logits processor):

  1. H_t = -sum_v p(v) log p(v), in nats over the full vocabulary (`step_entropy`);
  2. H_t < tau (`entropy_threshold`): the greedy token, argmax of the processed logits;
  3. H_t >= tau: the top B (`lookahead_candidates`) tokens c by log p(c) are each rolled out
     greedily for up to L (`lookahead_steps`) further tokens from prefix + c, and the row takes

       argmax_c  lambda * (log p(c) + S_c) / (l_c + 1)      (lambda = `lookahead_weight`)

     where S_c is the sum of the raw log-probs of the rollout's tokens and l_c the rollout
     steps taken; ties go to the higher-probability candidate. log p(c) is read after the
     penalties (`min_new_tokens`, `repetition_penalty`, `no_repeat_ngram_size`; without them it
     is the raw model's), the rollouts are plain greedy on the raw model. With one main beam
     (the paper's setting) the reference's lookahead "beam" of B is this: B candidates, each
     continued greedily. lambda > 0 scales every candidate's score alike, so it does not change
     the choice here; it is kept because the paper's score carries it.

A rollout stops early after a token that is EOS (a candidate that is EOS itself has l_c = 0),
and, with `code_stops` and a tokenizer, when the text stops looking like the body of a Python
function, the reference's heuristics: 4 consecutive blank lines, or a non-empty line whose
first character is not a space or a tab. The check runs after each rollout token on the
generated text so far, so a candidate that itself starts an unindented line still takes one
rollout step (as in the reference). Lines the main loop wrote are not checked again: only
lines whose first character comes from the candidate or the rollout count (the reference
stops the main loop at such a line, so it never has one; here the main loop does not stop, and
an earlier unindented line, e.g. a chat model's prose, would otherwise end every rollout at
once). Blank lines are counted across the whole generated text.

Score after an early stop (the card's open point): once a rollout row has stopped it adds
nothing more, so S_c sums exactly the l_c tokens it counts. The reference keeps adding the
log-probs of the tokens a stopped row goes on generating while l_c stops counting, which
scores a candidate by tokens past its own stop (text after EOS or after the end of the
function) and penalizes early stops by an amount that depends on what the model writes
there; we take the stated score instead.

Code stops on device: each token's decoded text (once, on the host, `code_tables`) is a
transition of a small per-row state, (fresh: the current line has no character yet, blank:
trailing blank lines, the current one included, saturated at 4); a token is summarized by
whether its first part begins a fresh line unindented, whether a line it starts inside itself
is unindented, how it leaves `fresh` (true, false or unchanged) and how it updates `blank`
(kept plus an added count, or reset to a base count). The main loop carries the state of the
text generated so far; the rollouts continue it.

Jit layout: the shared token loop (`decoding.token_loop`) with a `StepHook`; the lookahead is
one fixed-shape computation over batch x B rows: the cache rows are copied (`take_rows`), the
candidates fed, then a `lax.while_loop` of at most L greedy steps (ending once every rollout
row has stopped). The copies are discarded, so the main cache is untouched; the loop allocates
L extra cache slots for them. A `lax.cond` runs it only at steps where some active row is at
or above tau; tau itself is a traced value of the loop state, so a new threshold does not
recompile. Each output carries `lookahead_steps_taken` (steps that looked ahead) and
`lookahead_share` (that over the generated tokens). tau = inf is greedy decoding, token for
token; tau = -inf looks ahead at every step.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decoding import processors, records, token_loop
from decoding.errors import GenerationError
from decoding.records import DecodeResult
from decoding.settings import Penalties, check_bool, check_int, check_real, settings
from decoding.strategy import Strategy

Array = jax.Array


@settings
class AdaDec(Penalties):
  """AdaDec (see the module docstring). Defaults are the reference code's (B = 3, L = 5,
  lambda = 1, one main beam)."""
  # Nats. The paper learns it per model (0.6 to 1.3 for its models): fit it with
  # `python -m train.adadec_threshold`. inf: plain greedy; -inf: look ahead at every step.
  entropy_threshold: float = 1.0
  lookahead_candidates: int = 3  # B: candidates rolled out
  lookahead_steps: int = 5  # L: greedy rollout tokens per candidate
  lookahead_weight: float = 1.0  # lambda (> 0)
  code_stops: bool = True  # stop rollouts on the reference's code-structure heuristics

  def validate(self) -> None:
    super().validate()
    tau = self.entropy_threshold
    if (not isinstance(tau, (int, float, np.integer, np.floating))
        or isinstance(tau, (bool, np.bool_)) or math.isnan(tau)):
      raise GenerationError(f"entropy_threshold must be a number of nats (inf: plain greedy, "
                            f"-inf: look ahead at every step), got {tau!r}")
    check_int("lookahead_candidates", self.lookahead_candidates, 1)
    check_int("lookahead_steps", self.lookahead_steps, 1)
    check_real("lookahead_weight", self.lookahead_weight, 0.0, low_open=True)
    check_bool("code_stops", self.code_stops)


def step_entropy(logits: Array, invariant: bool = False) -> Array:
  """H = -sum_v p(v) log p(v) in nats of softmax(logits [B, V]) -> [B] fp32 (the records'
  entropy, `records.distribution_stats`)."""
  return records.distribution_stats(records.log_softmax(logits, invariant), invariant)[0]


# ------------------------------------------------------------------------ code stops

# Rows of the per-token transition table [6, V] (module docstring).
HEAD_BAD, INNER_BAD, FRESH, CARRY, ADD, BASE = range(6)
KEEP = 2  # FRESH: the token leaves `fresh` as it was (an empty token)
MAX_BLANK = 4  # 4 consecutive blank lines stop a rollout


def token_transition(text: str) -> tuple[int, int, int, int, int, int]:
  """The row of `code_tables` for one token's decoded text."""
  head, *rest = text.split("\n")
  n = len(rest)
  unindented = lambda line: bool(line) and line[0] not in " \t"
  blank = lambda line: line.strip() == ""
  trailing = 0
  for line in reversed(rest):
    if not blank(line):
      break
    trailing += 1
  if n == 0:  # the current line goes on: fresh only while nothing is written
    fresh = KEEP if head == "" else 0
    carry, add, base = int(blank(head)), 0, 0
  else:
    fresh = int(rest[-1] == "")
    if trailing < n:  # a non-blank line inside the token: count from its end
      carry, add, base = 0, 0, min(trailing, MAX_BLANK)
    elif blank(head):  # the current line stays blank and n more blank ones follow
      carry, add, base = 1, min(n, MAX_BLANK), 0
    else:
      carry, add, base = 0, 0, min(n, MAX_BLANK)
  return (int(unindented(head)), int(any(unindented(line) for line in rest)), fresh, carry, add,
          base)


def code_tables(texts: Sequence[str]) -> np.ndarray:
  """[6, V] uint8: the transition of each token's decoded text (`token_transition`)."""
  return np.asarray([token_transition(t) for t in texts], np.uint8).T.copy()


def token_texts(tokenizer, vocab_size: int) -> list[str]:
  """Each id's text decoded alone, special tokens as "" (the reference decodes with
  skip_special_tokens=True); ids past the tokenizer's vocabulary are ""."""
  n = min(vocab_size, len(tokenizer)) if hasattr(tokenizer, "__len__") else vocab_size
  return ([tokenizer.decode([i], skip_special_tokens=True) for i in range(n)]
          + [""] * (vocab_size - n))


def code_start(shape: tuple[int, ...]) -> tuple[Array, Array]:
  """(fresh, blank) of the empty generated text: one blank line with nothing written yet."""
  return jnp.ones(shape, bool), jnp.ones(shape, jnp.int32)


def code_step(table: Array, fresh: Array, blank: Array, tokens: Array
              ) -> tuple[Array, Array, Array]:
  """One token per row through the code-stop state: table [6, V], fresh [N] bool, blank [N]
  int32, tokens [N] -> (fresh, blank, violated [N]: the token began an unindented line)."""
  t = table[:, tokens].astype(jnp.int32)  # [6, N]
  violated = (fresh & (t[HEAD_BAD] == 1)) | (t[INNER_BAD] == 1)
  fresh = jnp.where(t[FRESH] == KEEP, fresh, t[FRESH] == 1)
  blank = jnp.where(t[CARRY] == 1, jnp.minimum(blank + t[ADD], MAX_BLANK), t[BASE])
  return fresh, blank, violated


@dataclasses.dataclass(frozen=True, eq=True)
class CodeTables:
  """`code_tables` as a hashable value (the hook is a static argument of the jitted loop)."""
  data: bytes
  vocab_size: int

  @classmethod
  def of(cls, table: np.ndarray) -> "CodeTables":
    return cls(np.ascontiguousarray(table, np.uint8).tobytes(), int(table.shape[1]))

  def array(self) -> Array:
    return jnp.asarray(np.frombuffer(self.data, np.uint8).reshape(6, self.vocab_size))


# ------------------------------------------------------------------------ lookahead


@flax.struct.dataclass
class Rollout:
  """The greedy rollouts of one lookahead: rows [B * K], row b * K + k continues candidate k
  of row b."""
  cache: object  # KVCache: copies of the main rows, discarded afterwards
  token: Array  # [B*K] int32: the token fed next
  position: Array  # [B*K] int32: its position
  logp_sum: Array  # [B*K] fp32: S_c
  steps: Array  # [B*K] int32: l_c
  stopped: Array  # [B*K] bool
  fresh: Array  # [B*K] bool: code-stop state (module docstring)
  blank: Array  # [B*K] int32
  violated: Array  # [B*K] bool: an unindented line began in the candidate or the rollout


@dataclasses.dataclass(frozen=True)
class AdaDecHook(token_loop.StepHook):
  """The token loop's hook: entropy gate, lookahead rerank, per-row counters. The threshold
  is not a field: it is a traced value in the loop state (`aux["threshold"]`), so a new
  threshold (a per-model value, a sweep) does not recompile."""
  candidates: int
  steps: int
  weight: float
  eos_ids: tuple[int, ...]
  code: Optional[CodeTables]  # None: rollouts stop at EOS only

  def init(self, state, threshold: Array = jnp.inf) -> dict:
    B = state.done.shape[0]
    fresh, blank = code_start((B,))
    return {"threshold": jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (B,)),
            "lookahead": jnp.zeros((B,), jnp.int32), "fresh": fresh, "blank": blank}

  def choose(self, lm, params, state, processed: Array, keys: Array):
    del keys  # deterministic
    aux = state.aux
    invariant = records.is_batch_invariant(lm)
    table = None if self.code is None else self.code.array()  # [6, V] constant
    greedy = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    look = (step_entropy(state.logits, invariant) >= aux["threshold"]) & ~state.done
    tokens = jax.lax.cond(
        jnp.any(look),
        lambda: jnp.where(look, self.rerank(lm, params, state, processed, invariant, table),
                          greedy),
        lambda: greedy)
    fresh, blank = aux["fresh"], aux["blank"]
    if table is not None:
      fresh, blank, _ = code_step(table, fresh, blank, tokens)
    aux = {**aux, "lookahead": aux["lookahead"] + look, "fresh": fresh, "blank": blank}
    return tokens, processed, None, aux

  def rerank(self, lm, params, state, processed: Array, invariant: bool,
             table: Optional[Array]) -> Array:
    """[B] the best-scoring candidate of each row (module docstring), whatever its entropy;
    processed: [B, V] logits after the penalties; table: the code-stop transitions or None."""
    B, K = processed.shape[0], self.candidates
    cand_logp, cand = jax.lax.top_k(records.log_softmax(processed, invariant), K)  # [B, K]
    rows = jnp.repeat(jnp.arange(B), K)
    tokens = cand.reshape(-1).astype(jnp.int32)
    eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
    is_eos = lambda t: jnp.any(t[:, None] == eos[None, :], axis=-1)
    fresh, blank = state.aux["fresh"][rows], state.aux["blank"][rows]
    violated = jnp.zeros_like(fresh)
    if table is not None:
      fresh, blank, violated = code_step(table, fresh, blank, tokens)
    zeros = jnp.zeros((B * K,), jnp.int32)
    start = Rollout(cache=state.cache.take_rows(rows), token=tokens,
                    position=state.seq_len[rows], logp_sum=jnp.zeros((B * K,), jnp.float32),
                    steps=zeros, stopped=is_eos(tokens), fresh=fresh, blank=blank,
                    violated=violated)

    def cond(carry):
      j, r = carry
      return (j < self.steps) & ~jnp.all(r.stopped)

    def body(carry):
      j, r = carry
      out = lm(params, r.token[:, None], r.position[:, None], r.cache)
      logits = out.logits[:, 0]
      nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # greedy on the raw model
      logp = jnp.take_along_axis(records.log_softmax(logits, invariant), nxt[:, None],
                                 axis=1)[:, 0]
      alive = ~r.stopped
      fresh, blank, violated = r.fresh, r.blank, r.violated
      stop = is_eos(nxt)
      if table is not None:
        fresh, blank, v = code_step(table, fresh, blank, nxt)
        violated = violated | v
        stop = stop | violated | (blank >= MAX_BLANK)
      r = r.replace(cache=out.cache, token=nxt, position=r.position + 1,
                    logp_sum=r.logp_sum + jnp.where(alive, logp, 0.0), steps=r.steps + alive,
                    stopped=r.stopped | stop, fresh=fresh, blank=blank, violated=violated)
      return j + 1, r

    _, r = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), start))
    score = self.weight * (cand_logp + r.logp_sum.reshape(B, K)) / (
        r.steps.reshape(B, K) + 1).astype(jnp.float32)
    best = jnp.argmax(score, axis=-1)  # first maximum: the higher-probability candidate
    return jnp.take_along_axis(cand, best[:, None], axis=1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("lm", "processor", "hook", "pad_id",
                                             "max_new_tokens", "cache_len"))
def decode(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, eos_ids: Array,
           threshold: Array, *, processor: processors.Chain, hook: AdaDecHook, pad_id: int,
           max_new_tokens: int, cache_len: int) -> DecodeResult:
  """Prefill + the token loop with the AdaDec hook, jitted (shapes as in `token_loop.decode`:
  prompts [B, P], prompt_len [B], row_keys [B, 2]; threshold [] fp32, in nats). The cache gets
  L extra slots for the rollouts, which write up to L - 1 positions past the main sequence."""
  state = token_loop.init_state(lm, params, prompts, prompt_len, max_new_tokens,
                                cache_len + hook.steps, row_keys, pad_id)
  state = state.replace(aux=hook.init(state, threshold))
  state = token_loop.decode_loop(lm, params, state, processor, token_loop.greedy_select,
                                 eos_ids, pad_id, max_new_tokens, hook)
  res = token_loop.finalize(state, pad_id)
  return res.replace(extras={"lookahead_steps_taken": state.aux["lookahead"]})


def make_hook(s: AdaDec, target, resources) -> AdaDecHook:
  V = target.lm.vocab_size
  if s.lookahead_candidates > V:
    raise GenerationError(f"lookahead_candidates={s.lookahead_candidates} exceeds the "
                          f"vocabulary of {V} tokens")
  code = None
  if s.code_stops and target.tokenizer is not None:
    tok = target.tokenizer
    code = resources.get(("adadec_code_tables", target.name, target.sha256, V),
                         lambda: CodeTables.of(code_tables(token_texts(tok, V))),
                         depends_on=(tok,))
  return AdaDecHook(candidates=int(s.lookahead_candidates), steps=int(s.lookahead_steps),
                    weight=float(s.lookahead_weight),
                    eos_ids=tuple(int(e) for e in target.eos_ids), code=code)


def prepare(s: AdaDec, target, resources):
  hook = make_hook(s, target, resources)
  processor = s.penalty_processors(target.eos_ids)
  threshold = jnp.asarray(s.entropy_threshold, jnp.float32)

  def run(batch) -> DecodeResult:
    return decode(target.lm, target.params, batch.prompts, batch.prompt_len, batch.row_keys,
                  target.eos_array, threshold, processor=processor, hook=hook,
                  pad_id=target.pad_id, max_new_tokens=s.max_new_tokens,
                  cache_len=batch.cache_len)
  return run


def _add_share(generations: list) -> None:
  """`lookahead_share`: the steps that looked ahead over the output's tokens (host float64,
  so 29 of 40 reads 0.725)."""
  for g in generations:
    g.extras["lookahead_share"] = g.extras["lookahead_steps_taken"] / max(len(g.output_ids), 1)


STRATEGY = Strategy("adadec", AdaDec, "greedy, with a lookahead rerank of the top candidates "
                    "at high-entropy steps (AdaDec)", prepare=prepare,
                    greedy_equivalent=lambda s: s.entropy_threshold == math.inf,
                    postprocess=_add_share)

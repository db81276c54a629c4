"""Stochastic soft thinking ("LLMs are Single-threaded Reasoners: Demystifying the Working
Mechanism of Soft Thinking", Wu et al., ICLR 2026, arXiv 2508.03440; reference code
github.com/WJMacro/Randomized-Soft-Thinking, an SGLang fork).

Inside the thinking segment no token is fed back. Each thinking step forms the soft
distribution p of the next token and feeds the model a *soft token*, the embedding mixture
e = sum_i w_i E[idx_i] over a few candidate tokens, through the model's `embeds` input:

  1. p: the raw logits after the penalties, divided by `soft_temperature`, softmax, kept to
     the top `soft_top_k`, then to the top-p `soft_top_p` nucleus, renormalized (Hugging
     Face's warpers, `decoding.processors`);
  2. weights w over the survivors, by `soft_variant`:
       vanilla    w = p (Soft Thinking as first proposed, which the paper shows acts like
                  greedy decoding: the model follows the top-1 component, the "Greedy
                  Pitfall");
       dirichlet  w ~ Dirichlet(dirichlet_alpha * p) over the survivors, then the top
                  `soft_max_topk` weights renormalized (larger alpha: closer to p);
       gumbel     the top `soft_max_topk` of p renormalized, then
                  w = softmax((log p + g) / gumbel_temperature), g_v ~ Gumbel(0, 1) i.i.d.
                  (tau -> 0: a one-hot categorical sample; larger tau: smoother mixtures);
     vanilla keeps the top `soft_max_topk` of p renormalized;
  3. the recorded token is argmax_i w_i (for gumbel a Gumbel-max sample from p, for vanilla
     the top-1 token);
  4. thinking ends when the recorded tokens end with the `think_end` marker, or after
     `max_think_tokens` soft steps, in which case the marker is emitted (forced, as discrete
     tokens); an optional `think_start` marker is emitted first (for prompts that do not
     already end with it). The answer is then sampled discretely with the ordinary warpers
     (`temperature`, `top_k`, `top_p`, `min_p`). EOS ends a row in any phase.

Defaults are the reference code's run scripts (`scripts/st/*.sh`): temperature 0.6, top-k 30,
top-p 0.95, min-p 0 for both the thinking steps and the answer, 10 kept components
(`--max_topk 10`; 15 for AIME/AMC), Dirichlet alpha 4.0, Gumbel tau 0.5 (0.6 for
MATH500/GPQA), `</think>` as the end marker. Min-p is not applied to the soft distribution
(the reference runs use 0). The Gumbel variant is the paper's recommendation and the default.

PRNG: every step uses the row's key folded with the step (`token_loop.step_keys`), like
sampling. The Gumbel noise of a thinking step is `jax.random.gumbel(key, (V,))` over the
whole vocabulary, exactly the noise `jax.random.categorical(key, logits)` adds, and the
scores are the processed logits themselves (log p up to a constant), so with every survivor
kept (`soft_max_topk >= soft_top_k`) the recorded token is the token ancestral sampling with
the soft warpers draws from the same key; as tau -> 0 the weights become that token's
one-hot vector and the fed embedding is exactly its embedding, so the run reproduces
`Sample` token for token. Dirichlet draws use the same step key (log-gamma draws, stable for
small concentrations); answer tokens are `categorical(key, processed logits)` as in `Sample`.

Jit layout: one `lax.while_loop` (the shared token loop, `decoding.token_loop`) with a
`StepHook` that keeps each row's phase (start marker, thinking, end marker, answer) and
chooses tokens and inputs per row, so rows of a ragged batch end thinking at different steps.
Discrete steps feed the one-hot mixture of their token, which is exactly its embedding.
The record's processed log-prob is log p over the kept components at a thinking step, 0 for
a forced marker token and the answer warpers' log-prob in the answer. Each output carries
the extras `think_tokens` (soft steps taken) and `think_ended` (the model wrote the end
marker itself, rather than the budget forcing it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Sequence, Union

import jax
import jax.numpy as jnp

from decoding import processors, token_loop
from decoding.errors import GenerationError
from decoding.records import DecodeResult
from decoding.settings import (Penalties, Warpers, check_choice, check_int, check_real, is_int,
                               settings)
from decoding.strategy import Strategy

Array = jax.Array
VARIANTS = ("vanilla", "dirichlet", "gumbel")
Marker = Union[str, Sequence[int]]

# Row phases.
START, THINK, END, ANSWER = 0, 1, 2, 3


def check_marker(name: str, v: Any) -> None:
  if isinstance(v, str):
    return
  if isinstance(v, (list, tuple)) and all(is_int(i) and i >= 0 for i in v):
    return
  raise GenerationError(f"{name} must be a string or a list of token ids >= 0, got {v!r}")


@settings
class SoftThinking(Penalties, Warpers):
  """Stochastic soft thinking (see the module docstring); the warpers (`temperature`,
  `top_k`, `top_p`, `min_p`) are the answer phase's, the `soft_*` fields the thinking
  steps'. `max_new_tokens` counts every output token: markers, thinking and answer."""
  max_new_tokens: int = 256
  temperature: float = 0.6
  top_k: int = 30
  top_p: float = 0.95
  num_return_sequences: int = 1
  soft_variant: str = "gumbel"  # vanilla | dirichlet | gumbel
  soft_temperature: float = 0.6
  soft_top_k: int = 30  # 0: the whole vocabulary
  soft_top_p: float = 0.95
  soft_max_topk: int = 10  # components of the soft token (the reference's max_topk)
  dirichlet_alpha: float = 4.0
  gumbel_temperature: float = 0.5
  think_start: Any = ""  # text or token ids emitted before thinking ("": none)
  think_end: Any = "</think>"  # text or token ids that end thinking ("": the budget only)
  max_think_tokens: int = 192
  sampling: ClassVar[bool] = True

  def validate(self) -> None:
    super().validate()
    check_int("num_return_sequences", self.num_return_sequences, 1)
    check_choice("soft_variant", self.soft_variant, VARIANTS)
    check_real("soft_temperature", self.soft_temperature, 0.0, low_open=True)
    check_int("soft_top_k", self.soft_top_k, 0)
    check_real("soft_top_p", self.soft_top_p, 0.0, 1.0, low_open=True)
    check_int("soft_max_topk", self.soft_max_topk, 1)
    check_real("dirichlet_alpha", self.dirichlet_alpha, 0.0, low_open=True)
    check_real("gumbel_temperature", self.gumbel_temperature, 0.0, low_open=True)
    check_marker("think_start", self.think_start)
    check_marker("think_end", self.think_end)
    check_int("max_think_tokens", self.max_think_tokens, 1, self.max_new_tokens - 1)

  def logits_processor(self, eos_ids) -> processors.Chain:
    """The answer phase's chain: the penalties, then the warpers."""
    return processors.chain(self.penalty_processors(eos_ids), self.warper_processors())

  def soft_processor(self, eos_ids) -> processors.Chain:
    """The thinking steps' chain: the penalties, then the soft warpers (no min-p)."""
    return processors.chain(self.penalty_processors(eos_ids), processors.warpers(
        self.soft_temperature, self.soft_top_k, self.soft_top_p, 0.0))


# ----------------------------------------------------------------------- soft tokens


def softmax_kept(s: Array, tau: float = 1.0) -> Array:
  """softmax(s / tau) over the last axis [..., K], -inf entries weighing exactly 0.

  The maximum is subtracted before dividing by tau, so the top weight is exp(0) = 1 and a
  tiny tau gives an exact one-hot vector (whose mixture is exactly one embedding);
  `jax.nn.softmax(s / tau)` gave NaN inside the jitted loop at tau = 1e-8 here.
  """
  e = jnp.where(s > -jnp.inf, jnp.exp((s - jnp.max(s, axis=-1, keepdims=True)) / tau), 0.0)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def soft_weights(z: Array, keys: Array, variant: str, max_topk: int, work: int,
                 alpha: float, tau: float) -> tuple[Array, Array, Array, Array]:
  """The soft token of one thinking step (steps 2 and 3 of the module docstring).

  z: [B, V] processed logits of the soft distribution (-inf outside the survivors);
  keys: [B, 2] step keys; work: candidates looked at (>= every survivor; V for all).
  Returns (ids [B, K], weights [B, K] summing to 1, the recorded token [B], kept logits
  [B, K]: z at ids, -inf where the weight is structurally 0), K = min(max_topk, work).
  """
  B, V = z.shape
  work = min(work, V)
  K = min(max_topk, work)
  zw, idw = jax.lax.top_k(z, work)  # [B, W], decreasing
  alive = zw > -jnp.inf
  if variant == "dirichlet":
    # w ~ Dir(alpha * p) over the survivors as normalized log-gamma draws (stable when
    # alpha * p is small, where gamma draws underflow to 0).
    p = jax.nn.softmax(zw, axis=-1)
    conc = jnp.where(alive, alpha * p, 1.0)
    logg = jax.vmap(lambda k, c: jax.random.loggamma(k, c))(keys, conc)
    score = jnp.where(alive & (conc > 0), logg, -jnp.inf)
  else:
    score = zw  # log p up to a constant
  top_score, pos = jax.lax.top_k(score, K)  # [B, K]
  ids = jnp.take_along_axis(idw, pos, axis=1)
  zk = jnp.where(top_score > -jnp.inf, jnp.take_along_axis(zw, pos, axis=1), -jnp.inf)
  if variant == "gumbel":
    # The noise categorical(key, z) would add, read at the kept ids (see the docstring).
    g = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)
    s = zk + jnp.take_along_axis(g, ids, axis=1)
    weights = softmax_kept(s, tau)
    token = jnp.take_along_axis(ids, jnp.argmax(s, axis=-1)[:, None], axis=1)[:, 0]
  else:
    weights = softmax_kept(top_score)  # top-K of w (or p), renormalized
    token = ids[:, 0]  # argmax of the weights (top_k sorts them)
  return ids, weights, token, zk


def mixture_embedding(lm, params, ids: Array, weights: Array) -> Array:
  """sum_i weights_i E[ids_i]: [B, K] ids and weights -> [B, D] fp32; a one-hot weight vector
  gives exactly its token's embedding."""
  rows = lm.embed(params, ids).astype(jnp.float32)  # [B, K, D]
  return jnp.einsum("bk,bkd->bd", weights.astype(jnp.float32), rows,
                    precision=jax.lax.Precision.HIGHEST)


def ends_with(sequences: Array, seq_len: Array, prompt_len: Array, token: Array,
              marker: tuple[int, ...]) -> Array:
  """[B] bool: the generated tokens followed by `token` end with `marker` (non-empty)."""
  m = len(marker)
  ok = token == marker[-1]
  for j in range(m - 1):  # marker[j] sits m - 1 - j tokens before the new one
    at = seq_len - (m - 1 - j)
    tok = jnp.take_along_axis(sequences, jnp.clip(at, 0, sequences.shape[1] - 1)[:, None],
                              axis=1)[:, 0]
    ok &= (at >= prompt_len) & (tok == marker[j])
  return ok


@dataclasses.dataclass(frozen=True)
class SoftThinkingHook(token_loop.StepHook):
  """The token loop's hook: per-row phases and soft tokens (module docstring)."""
  soft_processor: processors.Chain
  variant: str
  max_topk: int
  work: int
  alpha: float
  tau: float
  start_ids: tuple[int, ...]
  end_ids: tuple[int, ...]
  max_think: int

  def init(self, state) -> dict:
    B = state.done.shape[0]
    zeros = jnp.zeros((B,), jnp.int32)
    return {"phase": jnp.full((B,), START if self.start_ids else THINK, jnp.int32),
            "count": zeros, "think_len": zeros, "think_ended": jnp.zeros((B,), bool)}

  def choose(self, lm, params, state, processed: Array, keys: Array):
    aux = state.aux
    phase, count = aux["phase"], aux["count"]
    B, V = processed.shape
    soft_z = self.soft_processor(state.logits, state.processor_context)
    ids, weights, soft_tok, zk = soft_weights(soft_z, keys, self.variant, self.max_topk,
                                              self.work, self.alpha, self.tau)
    answer_tok = token_loop.sample_select(processed, keys)
    forced = lambda marker: jnp.asarray(marker or (0,), jnp.int32)[
        jnp.clip(count, 0, max(len(marker), 1) - 1)]
    thinking = phase == THINK
    tokens = jnp.select([phase == START, thinking, phase == END],
                        [forced(self.start_ids), soft_tok, forced(self.end_ids)],
                        answer_tok).astype(jnp.int32)

    # Phase transitions.
    nxt = count + 1
    think_len = aux["think_len"] + thinking
    natural = thinking & (ends_with(state.sequences, state.seq_len, state.prompt_len, tokens,
                                    self.end_ids) if self.end_ids else False)
    out_of_budget = thinking & ~natural & (think_len >= self.max_think)
    start_done = (phase == START) & (nxt >= len(self.start_ids))
    end_done = (phase == END) & (nxt >= len(self.end_ids))
    new_phase = jnp.where(start_done, THINK, phase)
    new_phase = jnp.where(natural | end_done, ANSWER, new_phase)
    new_phase = jnp.where(out_of_budget, END if self.end_ids else ANSWER, new_phase)
    new_count = jnp.where(new_phase != phase, 0, jnp.where(phase == THINK, 0, nxt))
    aux = {"phase": new_phase, "count": new_count, "think_len": think_len,
           "think_ended": aux["think_ended"] | natural}

    # The next input: the soft token while thinking, else the one-hot of the chosen token.
    K = ids.shape[1]
    one_hot = jnp.zeros((B, K), jnp.float32).at[:, 0].set(1.0)
    in_ids = jnp.where(thinking[:, None], ids, tokens[:, None])
    in_w = jnp.where(thinking[:, None], weights, one_hot)
    embeds = mixture_embedding(lm, params, in_ids, in_w)

    # What the record's processed log-prob is read from (module docstring).
    rows = jnp.arange(B)[:, None]
    soft_logits = jnp.full((B, V), -jnp.inf, jnp.float32).at[rows, ids].set(zk)
    forced_logits = jnp.where(jnp.arange(V)[None] == tokens[:, None], 0.0, -jnp.inf)
    record_logits = jnp.where(thinking[:, None], soft_logits,
                              jnp.where((phase == ANSWER)[:, None], processed, forced_logits))
    return tokens, record_logits, embeds, aux


@functools.partial(jax.jit, static_argnames=("lm", "processor", "hook", "pad_id",
                                             "max_new_tokens", "cache_len"))
def decode(lm, params, prompts: Array, prompt_len: Array, row_keys: Array, eos_ids: Array, *,
           processor: processors.Chain, hook: SoftThinkingHook, pad_id: int,
           max_new_tokens: int, cache_len: int) -> DecodeResult:
  """Prefill + the token loop with the soft-thinking hook, jitted (shapes as in
  `token_loop.decode`: prompts [B, P], prompt_len [B], row_keys [B * R, 2])."""
  state = token_loop.init_state(lm, params, prompts, prompt_len, max_new_tokens, cache_len,
                                row_keys, pad_id)
  state = state.replace(aux=hook.init(state))
  state = token_loop.decode_loop(lm, params, state, processor, token_loop.sample_select,
                                 eos_ids, pad_id, max_new_tokens, hook)
  res = token_loop.finalize(state, pad_id)
  return res.replace(extras={"think_tokens": state.aux["think_len"],
                             "think_ended": state.aux["think_ended"]})


def marker_ids(name: str, marker: Marker, target) -> tuple[int, ...]:
  """A marker's token ids: text through the target's tokenizer (no special tokens added)."""
  if isinstance(marker, str):
    if not marker:
      return ()
    if target.tokenizer is None:
      raise GenerationError(f"{name}={marker!r} is text: the model needs a tokenizer (or give "
                            "token ids)")
    ids = tuple(int(i) for i in target.tokenizer.encode(marker, add_special_tokens=False))
  else:
    ids = tuple(int(i) for i in marker)
  bad = [i for i in ids if not 0 <= i < target.lm.vocab_size]
  if bad:
    raise GenerationError(f"{name} has token id {bad[0]} outside the vocabulary "
                          f"[0, {target.lm.vocab_size})")
  return ids


def make_hook(s: SoftThinking, target) -> SoftThinkingHook:
  start = marker_ids("think_start", s.think_start, target)
  end = marker_ids("think_end", s.think_end, target)
  need = len(start) + s.max_think_tokens + len(end)
  if need >= s.max_new_tokens:
    raise GenerationError(
        f"max_new_tokens={s.max_new_tokens} leaves no answer: the markers ({len(start)} + "
        f"{len(end)} tokens) and max_think_tokens={s.max_think_tokens} take {need}")
  V = target.lm.vocab_size
  return SoftThinkingHook(
      soft_processor=s.soft_processor(target.eos_ids), variant=str(s.soft_variant),
      max_topk=int(s.soft_max_topk), work=int(s.soft_top_k) or V,
      alpha=float(s.dirichlet_alpha), tau=float(s.gumbel_temperature), start_ids=start,
      end_ids=end, max_think=int(s.max_think_tokens))


def prepare(s: SoftThinking, target, resources):
  hook = make_hook(s, target)
  processor = s.logits_processor(target.eos_ids)

  def run(batch) -> DecodeResult:
    return decode(target.lm, target.params, batch.prompts, batch.prompt_len, batch.row_keys,
                  target.eos_array, processor=processor, hook=hook, pad_id=target.pad_id,
                  max_new_tokens=s.max_new_tokens, cache_len=batch.cache_len)
  return run


STRATEGY = Strategy("soft_thinking", SoftThinking, "stochastic soft thinking: embedding "
                    "mixtures (vanilla, Dirichlet or Gumbel-softmax weights) while thinking, "
                    "then a sampled answer", prepare=prepare,
                    rows_per_prompt=lambda s: s.num_return_sequences)

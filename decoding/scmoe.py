"""SCMoE: self-contrast decoding of a Mixture-of-Experts model.

"Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by Self-Contrast" (Shi et
al., NeurIPS 2024). At every step the same MoE model runs under two routings of its experts,
each with its own KV cache: the strong activation (its usual top-k routing, k = 2) gives
logits z_s, the weak activation (rank-k routing: in every MoE layer only the expert at rank
r of the sorted router probabilities, weight 1) gives z_w. The next token is chosen from

    score(v) = (1 + beta) z_s(v) - beta z_w(v)   for v in V_head,   -inf elsewhere,
    V_head = {v : z_s(v) >= log(alpha) + max_u z_s(u)}   (p_s(v) >= alpha * max p_s),

greedily (argmax) or, with do_sample=True, by sampling softmax(score) after the warpers.
Logits and log-probabilities give the same argmax (per-row constants), as in the reference
code. beta = 0 is greedy decoding under the strong routing.

Choices (the reference code, github.com/DavidFanzz/SCMoE, `decodingmethod/moe_utils.py`):
`scmoe_weak_rank` is 0-based over the experts sorted by router probability, as in the code
(its README's `student_routed_tok 2` is the third-ranked expert); our default is 2, that
setting. The reference masks EOS unless `--early_stop` and stops on stop strings; here EOS is
an ordinary token (it is chosen when it wins the contrast inside V_head), since decodax stops
on EOS everywhere. Both temperatures are 1.

`ContrastLM` wraps both routings of one model behind the `TransformerLM` boundary: one call
runs the strong and the weak rows together (`models.moe` routing ``contrast``), each with its
own cache rows, and the strategy sees the contrast scores as its logits, so the ordinary
greedy and sampling loops run it. The per-token log-probabilities
an output carries are those of softmax(score), the distribution SCMoE decodes from.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from decoding import processors, token_loop
from decoding.errors import GenerationError
from decoding.settings import Penalties, Sampled, check_int, check_real, settings
from decoding.strategy import Strategy
from decoding.guidance import GuidedCache, TwoStreamLM
from models.moe import Routing
from models.transformer import ForwardOutput

Array = jax.Array


def contrast_scores(strong: Array, weak: Array, alpha: float, beta: float) -> Array:
  """(1 + beta) z_s - beta z_w on the plausible set of the strong logits, -inf elsewhere
  ([..., V] float32)."""
  zs, zw = strong.astype(jnp.float32), weak.astype(jnp.float32)
  head = zs >= jnp.max(zs, axis=-1, keepdims=True) + math.log(alpha)
  return jnp.where(head, (1.0 + beta) * zs - beta * zw, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class ContrastLM(TwoStreamLM):
  """An MoE model decoded by SCMoE. `lm` has `Routing("contrast", k, weak_rank)`: it runs
  each call on 2B rows, rows 0..B-1 under the strong routing and B..2B-1 under the weak one,
  in one batched call (the weights are read once for both), with a 2B-row cache presented
  as B rows (`GuidedCache`: lengths, rollback and row moves act on both halves). Calls
  return the contrast scores as logits and the strong rows' hidden states."""
  alpha: float
  beta: float

  def __call__(self, params, tokens: Optional[Array], positions: Array, cache: GuidedCache,
               attn_mask: Optional[Array] = None, embeds: Optional[Array] = None,
               logits_at: Optional[Array] = None,
               cache_mask: Optional[Array] = None) -> ForwardOutput:
    x = tokens if tokens is not None else embeds
    B = x.shape[0]

    def pair(a):  # per-row inputs go to both halves
      return None if a is None else (jnp.concatenate([a, a]) if a.ndim >= 1 and a.shape[0] == B
                                     else a)

    kw = {} if cache_mask is None else {"cache_mask": pair(cache_mask)}
    out = self.lm(params, pair(tokens), pair(positions), None if cache is None else cache.inner,
                  pair(attn_mask), pair(embeds), pair(logits_at), **kw)
    return ForwardOutput(logits=contrast_scores(out.logits[:B], out.logits[B:], self.alpha,
                                                self.beta),
                         hidden=out.hidden[:B], penultimate=out.penultimate[:B],
                         cache=None if out.cache is None else GuidedCache(out.cache))


@settings
class SCMoE(Penalties, Sampled):
  """SCMoE (see the module docstring). Defaults: the reference code's (beta 0.5, alpha 0.1,
  weak expert at 0-based rank 2, strong top-2)."""
  scmoe_beta: float = 0.5
  scmoe_alpha: float = 0.1
  scmoe_weak_rank: int = 2
  scmoe_strong_top_k: int = 2
  num_return_sequences: int = 1  # with do_sample: samples per prompt (maj@k)

  def validate(self) -> None:
    super().validate()
    check_real("scmoe_beta", self.scmoe_beta, 0.0)
    check_real("scmoe_alpha", self.scmoe_alpha, 0.0, 1.0, low_open=True)
    check_int("scmoe_weak_rank", self.scmoe_weak_rank, 0)
    check_int("scmoe_strong_top_k", self.scmoe_strong_top_k, 1)
    check_int("num_return_sequences", self.num_return_sequences, 1)
    if self.num_return_sequences > 1 and not self.do_sample:
      raise GenerationError("num_return_sequences > 1 needs do_sample=True (greedy SCMoE "
                            "gives one output per prompt)")


def contrast_lm(s: SCMoE, lm) -> ContrastLM:
  """The strong and weak routings of `lm` (an MoE `TransformerLM`) under SCMoE settings `s`;
  a clear error when `lm` is not an MoE model or the ranks do not fit its experts."""
  cfg = getattr(lm, "config", None)
  experts = getattr(cfg, "moe_experts", 0)
  if not experts:
    raise GenerationError("strategy scmoe contrasts two routings of a Mixture-of-Experts "
                          "model; this model has no experts (e.g. model=smollm2-135m-moe)")
  strong, weak = Routing("top_k", s.scmoe_strong_top_k), Routing("rank_k", s.scmoe_weak_rank)
  for name, r in (("scmoe_strong_top_k", strong), ("scmoe_weak_rank", weak)):
    try:
      r.check(experts)
    except ValueError as e:
      raise GenerationError(f"{name}: {e}") from None
  routing = Routing("contrast", s.scmoe_strong_top_k, weak_rank=s.scmoe_weak_rank)
  return ContrastLM(dataclasses.replace(lm, config=cfg.replace(moe_routing=routing)),
                    float(s.scmoe_alpha), float(s.scmoe_beta))


def prepare(s: SCMoE, target, resources):
  lm = contrast_lm(s, target.lm)
  proc = s.penalty_processors(target.eos_ids)
  if s.do_sample:
    proc = processors.chain(proc, s.warper_processors())
  select = token_loop.sample_select if s.do_sample else token_loop.greedy_select
  return token_loop.make_run(dataclasses.replace(target, lm=lm), proc, select, s.max_new_tokens)


STRATEGY = Strategy("scmoe", SCMoE, "self-contrast of an MoE model's strong (top-k) and weak "
                    "(rank-k) routings, in a plausible set (SCMoE); greedy or sampled",
                    prepare=prepare, rows_per_prompt=lambda s: s.num_return_sequences)

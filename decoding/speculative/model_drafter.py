"""Draft language models for speculative decoding: a separate draft model, or self-drafting.

They follow the drafter protocol (`decoding.speculative.protocol.Drafter`) and are verified
by the shared verifier (`decoding.speculative.verify`); none decides acceptance itself.

* `ModelDrafter`: a smaller language model with its own KV cache proposes K tokens
  autoregressively ("Fast Inference from Transformers via Speculative Decoding",
  Leviathan et al., 2023). With `self_layers=k` the draft is the target's own first k
  layers plus its final norm and head (an early-exit self-draft, nothing to train: see
  `TransformerLM.truncated`; the idea of "Draft & Verify: Lossless Large Language Model
  Acceleration via Self-Speculative Decoding", Zhang et al., 2024, with layers skipped
  at the top). Greedy mode drafts the argmax of the processed draft logits; sampling mode
  draws each draft from q = softmax(processed draft logits) and hands q to the verifier.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from decoding.errors import GenerationError
from decoding.prefill import new_cache, prefill
from decoding.settings import Validated, check_int, settings
from decoding.speculative import verify
from decoding.speculative.protocol import (ChainDraft, DraftView, Drafter, PrefillInfo,
                                           require_checksum, write_at)

from models import lm as lm_lib
from models import registry

Array = jax.Array


def draft_chain(view: DraftView, processor, sample: bool, K: int, state, logits_of, advance):
  """Autoregressive chain drafting shared by draft models and feature heads.

  logits_of(state) -> [B, V] raw draft logits for the next position; advance(state, tok,
  j) -> state after feeding draft j (tok [B]). Each draft is the argmax of the processed
  draft logits (context: the row plus the drafts so far) or, in sampling mode, a draw
  from q = softmax(processed) with the draft key of its position. Returns
  (ChainDraft(tokens [B, K], probs [B, K, V] when sampling), final state).
  """
  pkeys = verify.position_keys(view.row_keys, view.num_generated, K)  # [B, K, 2]

  def choose(state, seqs, j):
    processed = processor(logits_of(state), view.replace(sequences=seqs).context(j))
    if sample:
      keys = jax.vmap(verify.draft_key)(pkeys[:, j])
      tok = jax.vmap(jax.random.categorical)(keys, processed).astype(jnp.int32)
    else:
      tok = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return tok, jax.nn.softmax(processed, axis=-1)

  def body(carry, j):
    state, seqs = carry
    tok, q = choose(state, seqs, j)
    return (advance(state, tok, j), write_at(seqs, view.seq_len + j, tok)), (tok, q)

  (state, seqs), (toks, qs) = jax.lax.scan(body, (state, view.sequences), jnp.arange(K - 1))
  last_tok, last_q = choose(state, seqs, K - 1)
  tokens = jnp.concatenate([jnp.moveaxis(toks, 0, 1), last_tok[:, None]], axis=1)
  probs = None
  if sample:
    probs = jnp.concatenate([jnp.moveaxis(qs, 0, 1), last_q[:, None]], axis=1)
  return ChainDraft(tokens=tokens, probs=probs), state


class DraftModelMixin:
  """A draft language model (`draft_lm`, or the target's first `self_layers` layers) with
  its own KV cache, prefilled with the prompts."""

  def _model(self, dparams, tparams):
    if self.self_layers is not None:
      return self.draft_lm.truncated(tparams, self.self_layers)
    return self.draft_lm, dparams

  def init(self, dparams, tparams, prompts, prompt_len, first, info: PrefillInfo, cache_len):
    lm, p = self._model(dparams, tparams)
    _, cache = prefill(lm, p, prompts, prompt_len, new_cache(lm, prompts.shape[0], cache_len))
    return cache

  def _root(self, lm, p, cache, view: DraftView):
    """Rolls the cache back to seq_len - 2 and feeds the row's last two tokens: returns
    the draft's output after the last token (logits [B, 1, V]) and its cache."""
    B = view.seq_len.shape[0]
    L = view.seq_len
    rows = jnp.arange(B)
    two = jnp.stack([view.sequences[rows, L - 2], view.sequences[rows, L - 1]], axis=1)
    return lm(p, two, jnp.stack([L - 2, L - 1], axis=1), cache.with_lengths(L - 2),
              logits_at=jnp.ones((B, 1), jnp.int32))


@dataclasses.dataclass(frozen=True)
class ModelDrafter(DraftModelMixin, Drafter):
  """K tokens from a draft language model (any object with the TransformerLM boundary).

  Its cache holds the row's tokens; before proposing, it is rolled back to
  seq_len - 2 and the row's last two tokens are fed (one call of 2 tokens, then K - 1
  one-token calls). The rollback point is always covered: after the previous proposal
  the draft cache held the old row plus K - 1 drafts, and a row grows by at most K + 1.
  `self_layers=k`: the draft is `target.truncated(tparams, k)` and `dparams` is unused.
  """
  draft_lm: Any = None
  num_draft: int = 4
  self_layers: Optional[int] = None
  kind: str = "chain"

  def propose(self, dparams, tparams, cache, view: DraftView, processor, sample: bool):
    lm, p = self._model(dparams, tparams)
    out = self._root(lm, p, cache, view)

    def advance(state, tok, j):
      o = lm(p, tok[:, None], (view.seq_len + j)[:, None], state[1])
      return o.logits[:, 0], o.cache

    draft, (_, cache) = draft_chain(view, processor, sample, self.num_draft,
                                    (out.logits[:, 0], out.cache), lambda s: s[0], advance)
    return draft, cache




# ------------------------------------------------------------------------------ settings


def load_draft_model(name_or_path: str, target, resources) -> tuple[Any, Any]:
  """A separate draft language model by registered name or path, for `target` (a
  `decoding.strategy.Target`), kept in `resources`: (lm, params).

  A trained self-draft artifact (DistillSpec) is rebuilt from the target and its trained
  layers, after checking it was trained for this target; any other language model is
  loaded in the target's numerics (compute and storage dtypes, dot precision) and layer layout
  (per-layer weights decode faster on CPU, see `models.lm.load_model`) and must share the
  target's vocabulary.
  """
  lm = target.lm
  try:
    if registry.kind_of(name_or_path) == "self_draft":
      require_checksum(target, f"the self-draft {name_or_path!r}")
      return resources.get(("self_draft", name_or_path, target.sha256),
                           lambda: lm_lib.load_self_draft(name_or_path, target),
                           depends_on=(target.params,))
    layout = dict(scan_layers=lm.config.scan_layers,
                  fused_projections=lm.config.fused_projections,
                  matmul_kernel=lm.config.matmul_kernel)  # the target's layout
    c = lm.config  # and the target's numerics
    numerics = dict(dtype=c.dtype, param_dtype=c.param_dtype, proj_dtype=c.proj_dtype,
                    matmul_precision=c.matmul_precision)
    m = resources.get(("lm", name_or_path, str(tuple(numerics.values())), tuple(layout.values())),
                      lambda: lm_lib.load_model(name_or_path, **numerics, **layout))
  except (ValueError, FileNotFoundError) as e:
    raise GenerationError(f"cannot load draft_model {name_or_path!r}: {e}") from e
  if m.lm.vocab_size != lm.vocab_size:
    raise GenerationError(f"draft_model {name_or_path!r} has vocabulary size {m.lm.vocab_size}, "
                          f"the target {lm.vocab_size}: drafts must use the target's tokenizer")
  return m.lm, m.params


def self_layers(k: int, target) -> int:
  """`k`, checked to leave at least one of the target's layers out of the self-draft."""
  L = target.lm.config.num_layers
  if not 1 <= k < L:
    raise GenerationError(f"draft_layers must be in [1, {L - 1}] for a {L}-layer target, got {k}")
  return k


@settings
class SelfDraft(Validated):
  """Early-exit self-drafting: the target's first `draft_layers` layers + its head."""
  num_draft_tokens: int = 4
  draft_layers: int = 4

  def validate(self) -> None:
    check_int("num_draft_tokens", self.num_draft_tokens, 1)
    check_int("draft_layers", self.draft_layers, 1)

  def build(self, target, resources):
    return ModelDrafter(target.lm, self.num_draft_tokens,
                        self_layers=self_layers(self.draft_layers, target)), None


@settings
class ModelDraft(Validated):
  """A separate draft model with the target's vocabulary (a registered name or a path,
  e.g. the Qwen2.5-Coder 0.5B for the 1.5B target, or a DistillSpec-trained self-draft)."""
  draft_model: str
  num_draft_tokens: int = 4

  def validate(self) -> None:
    if not self.draft_model:
      raise GenerationError("drafter='model' needs draft_model (a registered name or a path)")
    check_int("num_draft_tokens", self.num_draft_tokens, 1)

  def build(self, target, resources):
    dlm, dparams = load_draft_model(self.draft_model, target, resources)
    return ModelDrafter(dlm, self.num_draft_tokens), dparams

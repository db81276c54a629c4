"""Chain drafters for speculative decoding: draft models, self-drafting, prompt lookup (IAD).

All of them follow `decoding.speculative.Drafter` and are verified by `decoding.verify`;
none decides acceptance itself.

* `ModelDrafter`: a smaller language model with its own KV cache proposes K tokens
  autoregressively ("Fast Inference from Transformers via Speculative Decoding",
  Leviathan et al., 2023). With `self_layers=k` the draft is the target's own first k
  layers plus its final norm and head (an early-exit self-draft, nothing to train: see
  `TransformerLM.truncated`; the idea of "Draft & Verify: Lossless Large Language Model
  Acceleration via Self-Speculative Decoding", Zhang et al., 2024, with layers skipped
  at the top). Greedy mode drafts the argmax of the processed draft logits; sampling mode
  draws each draft from q = softmax(processed draft logits) and hands q to the verifier.
* `PromptLookupDrafter`: drafts copied from the prompt (input-guided aggressive decoding,
  IAD, "Lossless Acceleration for Seq2seq Generation with Aggressive Decoding", Ge et al.,
  2022; Hugging Face's prompt lookup decoding is the same idea).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from decoding import core, verify
from decoding.speculative import ChainDraft, DraftView, Drafter, PrefillInfo, Verified

Array = jax.Array


def _write(sequences: Array, pos: Array, tok: Array) -> Array:
  """sequences[b, pos[b]] = tok[b] (out-of-range positions dropped)."""
  return sequences.at[jnp.arange(sequences.shape[0]), pos].set(tok, mode="drop")


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
    return (advance(state, tok, j), _write(seqs, view.seq_len + j, tok)), (tok, q)

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

  def init(self, dparams, tparams, prompts, prompt_len, first, prefill: PrefillInfo, cache_len):
    lm, p = self._model(dparams, tparams)
    cache = jax.lax.optimization_barrier(lm.init_cache(prompts.shape[0], cache_len))
    _, cache = core.prefill(lm, p, prompts, prompt_len, cache)
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


@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter(Drafter):
  """Copies K tokens from the prompt (input-guided aggressive decoding).

  Re-alignment rule (stated here because the IAD paper leaves it open): let g be the
  longest n-gram, n from `max_ngram` down to `min_ngram`, that ends the row's current
  sequence and occurs in the prompt with at least one prompt token after it. Among its
  occurrences take the first one that ends at or after the alignment point a (the prompt
  position just after the last copied token that was accepted), else the last one
  before a, so copying moves forward through the input as an edit does. The draft is the
  K prompt tokens after it (past the prompt's end: the prompt's last token, which the
  target will simply reject). After verification a = end of the occurrence + accepted
  drafts. With no occurrence of any n-gram, the draft continues from a, and the draft is
  marked unmatched: when no active row of the batch has a match, the loop verifies no
  drafts at all that iteration (a plain one-token target call, as Hugging Face's prompt
  lookup does when it finds no candidates), so text with nothing to copy does not pay for
  K + 1 verified positions per token.
  """
  num_draft: int = 10
  max_ngram: int = 3
  min_ngram: int = 1
  kind: str = "chain"
  plain_when_unmatched: bool = True

  def init(self, dparams, tparams, prompts, prompt_len, first, prefill, cache_len):
    B = prompts.shape[0]
    return {"align": jnp.zeros((B,), jnp.int32), "start": jnp.zeros((B,), jnp.int32)}

  def match_start(self, sequences: Array, seq_len: Array, prompt_len: Array,
                  align: Array) -> Array:
    """[B] prompt index where the draft starts (the rule above)."""
    return self.match(sequences, seq_len, prompt_len, align)[0]

  def match(self, sequences: Array, seq_len: Array, prompt_len: Array,
            align: Array) -> tuple[Array, Array]:
    """([B] prompt index where the draft starts, [B] bool: some n-gram occurred)."""
    B, S = sequences.shape
    P = S  # candidate end positions e: the n-gram is sequences[e-n:e], e < prompt_len
    e = jnp.arange(P)[None]  # [1, P]
    found = jnp.zeros((B,), bool)
    start = align
    for n in range(self.max_ngram, self.min_ngram - 1, -1):
      tail_idx = jnp.clip(seq_len[:, None] - n + jnp.arange(n)[None], 0, S - 1)
      tail = jnp.take_along_axis(sequences, tail_idx, axis=1)  # [B, n]
      ok = (e >= n) & (e < prompt_len[:, None]) & (seq_len[:, None] >= n)
      for i in range(n):
        idx = jnp.clip(e - n + i, 0, S - 1)
        ok &= jnp.take_along_axis(sequences, jnp.broadcast_to(idx, (B, P)), axis=1) == tail[:, i:i + 1]
      after = ok & (e >= align[:, None])
      first_after = jnp.min(jnp.where(after, e, P), axis=1)
      last_before = jnp.max(jnp.where(ok & (e < align[:, None]), e, -1), axis=1)
      pick = jnp.where(first_after < P, first_after, last_before)
      take = ~found & jnp.any(ok, axis=1)
      start = jnp.where(take, pick, start)
      found = found | take
    return start, found

  def propose(self, dparams, tparams, state, view: DraftView, processor, sample: bool):
    start, found = self.match(view.sequences, view.seq_len, view.prompt_len, state["align"])
    idx = start[:, None] + jnp.arange(self.num_draft)[None]
    idx = jnp.minimum(idx, view.prompt_len[:, None] - 1)
    tokens = jnp.take_along_axis(view.sequences, idx, axis=1).astype(jnp.int32)
    return ChainDraft(tokens=tokens, matched=found), dict(state, start=start)

  def update(self, dparams, tparams, state, view, verified: Verified):
    accepted = jnp.minimum(verified.num_accepted, verified.count)
    return dict(state, align=jnp.where(view.active | (verified.count > 0),
                                       state["start"] + accepted, state["align"]))


# ----------------------------------------------------------------- registry and strategy

from decoding import generation, processors  # noqa: E402
from decoding.generation import GenerationError, Strategy, _get, register_strategy  # noqa: E402

# name -> builder(cfg, lm, params) -> (drafter, dparams). Builders check their config
# values against the target model and raise GenerationError before anything compiles.
DRAFTERS: dict = {}


def register_drafter(name: str, builder) -> None:
  DRAFTERS[name] = builder


def _positive(cfg, key: str, default: int) -> int:
  v = _get(cfg, key, default)
  if not isinstance(v, (int,)) or isinstance(v, bool) or v < 1:
    raise GenerationError(f"{key} must be an integer >= 1, got {v!r}")
  return int(v)


def _self_layers(cfg, lm) -> int:
  k = _positive(cfg, "draft_layers", 4)
  L = lm.config.num_layers
  if k >= L:
    raise GenerationError(f"draft_layers must be in [1, {L - 1}] for a {L}-layer target, got {k}")
  return k


def load_draft_model(name_or_path: str, lm, params=None, target_name: str = ""):
  """A separate draft language model by registered name or path, checked to share the
  target's vocabulary (same size; token ids must mean the same tokens). DistillSpec drafts
  (`train.distillspec.DRAFTS` names or folders with a draft manifest) are rebuilt from the
  target and their trained layers."""
  import os
  import types
  if not name_or_path:
    raise GenerationError("drafter='model' needs draft_model (a registered name or a path)")
  from train import distillspec
  if name_or_path in distillspec.DRAFTS or os.path.isfile(
      os.path.join(name_or_path, distillspec.DRAFT_MANIFEST)):
    key = (name_or_path, id(params))
    if key not in _MODEL_CACHE:
      target = types.SimpleNamespace(lm=lm, params=params, name=target_name)
      try:
        _MODEL_CACHE[key] = distillspec.load_draft(name_or_path, target)
      except (ValueError, FileNotFoundError) as e:
        raise GenerationError(f"cannot load draft_model {name_or_path!r}: {e}") from e
    return _MODEL_CACHE[key]
  try:
    m = _cached_model(name_or_path, lm.config.dtype, lm.config.scan_layers)
  except (ValueError, FileNotFoundError) as e:
    raise GenerationError(f"cannot load draft_model {name_or_path!r}: {e}") from e
  if m.lm.vocab_size != lm.vocab_size:
    raise GenerationError(f"draft_model {name_or_path!r} has vocabulary size {m.lm.vocab_size}, "
                          f"the target {lm.vocab_size}: drafts must use the target's tokenizer")
  return m.lm, m.params


_MODEL_CACHE: dict = {}


def _cached_model(name: str, dtype, scan_layers: bool = True):
  """A registered model loaded once per (name, compute dtype, layer layout); the layout
  follows the target's (per-layer weights decode faster on CPU, see `load_model`)."""
  from models.lm import load_model
  key = (name, str(dtype), bool(scan_layers))
  if key not in _MODEL_CACHE:
    _MODEL_CACHE[key] = load_model(name, dtype=dtype, scan_layers=scan_layers)
  return _MODEL_CACHE[key]


def _build_self(cfg, lm, params):
  return ModelDrafter(lm, _positive(cfg, "num_draft_tokens", 4), self_layers=_self_layers(cfg, lm)), None


def _build_model(cfg, lm, params):
  dlm, dparams = load_draft_model(_get(cfg, "draft_model", ""), lm, params, _get(cfg, "model", ""))
  return ModelDrafter(dlm, _positive(cfg, "num_draft_tokens", 4)), dparams


def _build_lookup(cfg, lm, params):
  hi = _positive(cfg, "prompt_lookup_max_ngram", 3)
  lo = _positive(cfg, "prompt_lookup_min_ngram", 1)
  if lo > hi:
    raise GenerationError(f"prompt_lookup_min_ngram ({lo}) must be <= prompt_lookup_max_ngram ({hi})")
  return PromptLookupDrafter(_positive(cfg, "num_draft_tokens", 4), hi, lo), None


def _tree_args(cfg) -> dict:
  return dict(tree_budget=_positive(cfg, "tree_budget", 16),
              max_depth=_positive(cfg, "tree_depth", 6),
              max_children=_positive(cfg, "tree_children", 4))


def _build_dyspec(cfg, lm, params):
  from decoding.trees import DySpecDrafter
  name = _get(cfg, "draft_model", "")
  if name:
    dlm, dparams = load_draft_model(name, lm, params, _get(cfg, "model", ""))
    return DySpecDrafter(dlm, **_tree_args(cfg)), dparams
  return DySpecDrafter(lm, self_layers=_self_layers(cfg, lm), **_tree_args(cfg)), None


_HEAD_CACHE: dict = {}


def _build_eagle(cfg, lm, params):
  from decoding.eagle import EagleDrafter
  from models import eagle_head
  name = _get(cfg, "eagle_head", "eagle-smollm2-135m")
  key = (name, str(lm.config.dtype))
  if key not in _HEAD_CACHE:
    try:
      _HEAD_CACHE[key] = eagle_head.load_head(name, target_sha256=_target_sha(cfg),
                                              dtype=lm.config.dtype)
    except (ValueError, FileNotFoundError) as e:
      raise GenerationError(f"cannot load EAGLE head {name!r}: {e}") from e
  head, hparams = _HEAD_CACHE[key]
  if head.config.target.hidden_size != lm.config.hidden_size or head.vocab_size != lm.vocab_size:
    raise GenerationError(f"EAGLE head {name!r} was trained for another target architecture")
  tree = bool(_get(cfg, "eagle_tree", False))
  return EagleDrafter(head, _positive(cfg, "num_draft_tokens", 4), tree=tree,
                      **_tree_args(cfg)), hparams


def _build_gad(cfg, lm, params):
  from train import gad as train_gad
  name = _get(cfg, "gad_drafter", "gad-smollm2")
  key = ("gad", name, id(params))
  if key not in _MODEL_CACHE:
    try:
      _MODEL_CACHE[key] = train_gad.load_gad_drafter(name, lm, params,
                                                     target_name=_get(cfg, "model", None))
    except (ValueError, FileNotFoundError) as e:
      raise GenerationError(f"cannot load GAD drafter {name!r}: {e}") from e
  return _MODEL_CACHE[key]


def _target_sha(cfg):
  from models import registry
  name = _get(cfg, "model", registry.DEFAULT_MODEL)
  return registry.MODELS[name].sha256 if name in registry.MODELS else None


register_drafter("self", _build_self)
register_drafter("eagle", _build_eagle)
register_drafter("gad", _build_gad)
register_drafter("model", _build_model)
register_drafter("prompt_lookup", _build_lookup)
register_drafter("dyspec", _build_dyspec)


def build_drafter(cfg, lm, params):
  name = _get(cfg, "drafter", "self")
  if name not in DRAFTERS:
    raise GenerationError(f"unknown drafter {name!r}; available: {sorted(DRAFTERS)}")
  return DRAFTERS[name](cfg, lm, params)


def _validate(cfg) -> None:
  name = _get(cfg, "drafter", "self")
  if name not in DRAFTERS:
    raise GenerationError(f"unknown drafter {name!r}; available: {sorted(DRAFTERS)}")
  if _get(cfg, "do_sample", False) and not _get(cfg, "temperature", 1.0) > 0:
    raise GenerationError(f"temperature must be > 0 for sampling, got {_get(cfg, 'temperature')}")
  for key in ("num_draft_tokens", "tree_budget", "tree_depth", "tree_children"):
    _positive(cfg, key, 1)
  eps = _get(cfg, "lenience", 1.0)
  if not 0 < eps <= 1:
    raise GenerationError(f"lenience must be in (0, 1] (1 = lossless), got {eps}")
  if eps < 1 and not _get(cfg, "do_sample", False):
    raise GenerationError("lenience < 1 relaxes sampling verification: set do_sample=True")
  if _relaxation(cfg) and _relaxation(cfg)[0] == "gad_plus" and _get(cfg, "do_sample", False):
    raise GenerationError("GAD++ (gad_beta > 1 and gad_tau > 0) relaxes greedy verification: "
                          "set do_sample=False")


def _relaxation(cfg) -> tuple:
  """The LOSSY acceptance rule the config asks for, () for lossless verification."""
  beta, tau = int(_get(cfg, "gad_beta", 1)), float(_get(cfg, "gad_tau", 0.0))
  if beta > 1 and tau > 0:
    return ("gad_plus", beta, tau)
  eps = float(_get(cfg, "lenience", 1.0))
  return ("lenient", eps) if eps < 1 else ()


def _run(lm, params, prompts, prompt_len, row_keys, eos_ids, cfg, pad_id, max_new_tokens,
         cache_len):
  from decoding.speculative import speculative_decode
  drafter, dparams = build_drafter(cfg, lm, params)
  sample = bool(_get(cfg, "do_sample", False))
  relaxation = _relaxation(cfg)
  if relaxation and drafter.kind != "chain":
    raise GenerationError(f"{relaxation[0]} acceptance applies to chain drafters, not "
                          f"{_get(cfg, 'drafter')!r} trees")
  eos = [int(e) for e in jax.device_get(eos_ids) if e >= 0]
  proc = processors.build(cfg, eos, sampling=sample)
  return speculative_decode(lm, params, drafter, dparams, prompts, prompt_len, row_keys, eos_ids,
                            processor=proc, reads_context=processors.reads_context(cfg),
                            sample=sample, pad_id=pad_id, max_new_tokens=max_new_tokens,
                            cache_len=cache_len + drafter.block, relaxation=relaxation)


register_strategy(Strategy("speculative", _run, sampling=False, validate=_validate))

"""GAD: generalized aggressive decoding with a block non-autoregressive drafter.

"Lossless Acceleration for Seq2seq Generation with Aggressive Decoding" (Ge, Xia, Sun,
Chen, Wei, 2022) and "Speculative Decoding: Exploiting Speculative Execution for
Accelerating Seq2seq Generation" (Xia et al., 2023; first titled "Lossless Speedup of
Autoregressive Translation with Generalized Aggressive Decoding"). The papers pair an
autoregressive (AR) verifier with a separately trained non-autoregressive (NAR) drafter
that fills k [MASK] placeholders after the output prefix in one parallel pass:

  1. draft:   the drafter reads the prefix followed by k mask inputs and predicts the k
              next tokens d_1..d_k at once (one forward pass, not k sequential steps);
  2. verify:  the AR model scores [x, d_1..d_k] in one pass (x = last emitted token);
  3. accept:  vanilla GAD keeps d_j while it equals the AR argmax (exactly greedy
              decoding); GAD++ (lossy) keeps d_j while it is among the AR model's top-beta
              tokens at j and within tau of the top-1 log-probability;
  4. commit:  after the first failure at j the AR top-1 at j is appended, and the next
              k positions are masked again.

Here the verifier is a decoder-only LM and steps 2-4 are the shared speculative loop
(`decoding.speculative.loop`) with the shared verification core
(`decoding.speculative.verify`): the drafter below only proposes a chain of k tokens, so
vanilla GAD is greedy chain verification (`speculative_decode(..., sample=False)`), and
GAD++ is the same loop with the `GadPlus(beta, tau)` acceptance rule
(`verify.verify_chain_relaxed`; the released settings are beta = 5, tau = 3.0; beta = 1 or
tau = 0 is vanilla GAD).

The drafter ("block drafter") is a small decoder built from the target itself: the
target's first `num_layers` layers, its final norm and its output head
(`TransformerLM.truncated`), with trainable copies of the layers and the norm, plus a
learned mask input embedding and k learned slot embeddings (added to the mask embedding
of slot j). Inputs are [prefix tokens; k masks]; RoPE positions continue the prefix (mask
j sits at position L + j and predicts the token that goes there); prefix tokens attend
causally to the prefix, masks attend to the whole prefix and to all k masks
(bidirectional among the masks), and nothing attends to the masks but the masks. The
embedding / head are the target's and are not trained (see `train.gad`).

Drafter KV cache bookkeeping (`GadDrafter.propose`). The drafter keeps its own cache over
the committed prefix. Between two proposals a row grows by at most k + 1 tokens (k
accepted drafts plus the target's token), and after a proposal the cache holds exactly
the row's committed tokens at that time (length L_prev). Each proposal for a row of
length L therefore:
  * rolls the cache back to start = max(L - (k + 1), 0) <= L_prev (so everything before
    `start` is valid; slots in [start, L_prev) are recomputed, with identical values);
  * feeds 2k + 1 inputs: the k + 1 tokens at positions start..start + k (the last k + 1
    tokens of the row; when `start` was clamped to 0, the slots at or beyond L are
    padding that no mask sees) followed by the k masks at positions L..L + k - 1;
  * sets the cache length to L: the prefix stays cached, the masks' (and padding) entries
    beyond L are discarded and overwritten by the next proposal.
So each proposal runs 2k + 1 inputs through the drafter, whatever the row's length.
The drafter's cache needs L + k slots at most; `init` allocates `cache_len + k`. (With
`num_masks = m > k`, a drafter trained with block m proposing only its first k slots, the
m masks follow the same k + 1 tokens: k + 1 + m inputs, L + m slots.)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from decoding.errors import GenerationError
from decoding.prefill import new_cache, prefill
from decoding.settings import Validated, check_int, settings
from decoding.speculative.protocol import (ChainDraft, DraftView, Drafter, PrefillInfo,
                                           require_checksum, write_at)
from models import artifacts, transformer
from models.lm import TransformerLM

Array = jax.Array

SHARED = ("embed", "lm_head")  # target parameters the drafter reads and never trains


# ------------------------------------------------------------------------------ parameters


def draft_model(target_lm: TransformerLM, num_layers: int) -> TransformerLM:
  """The drafter's network: the target's architecture cut to its first `num_layers` layers
  (the parameters come from `model_params`)."""
  n = int(num_layers)
  if not 1 <= n <= target_lm.config.num_layers:
    raise ValueError(f"num_layers must be in [1, {target_lm.config.num_layers}], got {num_layers}")
  return TransformerLM(target_lm.config.replace(num_layers=n), target_lm.mesh)


def init_params(target_lm: TransformerLM, target_params: Any, num_layers: int, block: int,
                slot_embeddings: bool = True) -> dict:
  """Initial trainable drafter parameters:
  {"body": copies of the target's first `num_layers` layers and its final norm,
   "mask": [D] the mean of the target's input embeddings,
   "slots": [block, D] zeros (only with `slot_embeddings`)}."""
  _, tp = target_lm.truncated(target_params, num_layers)
  body = jax.tree.map(jnp.array, {k: v for k, v in tp.items() if k not in SHARED})
  table = transformer.head_matrix({"embed": target_params["embed"]})  # [D, V], unpacked
  out = {"body": body, "mask": jnp.mean(table.astype(jnp.float32), axis=1)}
  if slot_embeddings:
    out["slots"] = jnp.zeros((int(block), table.shape[0]), jnp.float32)
  return out


def model_params(dparams: dict, target_params: Any) -> dict:
  """Parameters of `draft_model`: the trained body plus the target's embedding / head."""
  return {**{k: target_params[k] for k in SHARED if k in target_params}, **dparams["body"]}


def mask_embeddings(dparams: dict, block: int, dtype) -> Array:
  """Inputs of the k mask slots: mask embedding (+ slot embedding j). -> [block, D]."""
  m = jnp.broadcast_to(dparams["mask"][None], (block, dparams["mask"].shape[0]))
  if "slots" in dparams:
    m = m + dparams["slots"][:block]
  return m.astype(dtype)


# ------------------------------------------------------------------------------ full pass


def cut_attention(tokens_len: int, cuts: Array, block: int) -> Array:
  """Attention mask of a cache-free pass over [tokens (T); C blocks of `block` masks].

  cuts: [B, C] prefix lengths (mask block c sits at positions cuts[b, c] + j). Token
  queries are causal over the tokens; mask queries of block c see the tokens before
  cuts[b, c] and the masks of block c (all of them). -> [B, S, S] bool, S = T + C * block.
  """
  B, C = cuts.shape
  T, S = tokens_len, tokens_len + C * block
  s = jnp.arange(S)
  is_tok = s < T
  blk = jnp.where(is_tok, -1, (s - T) // block)  # [S] mask block of each input, -1 for tokens
  tok_tok = is_tok[:, None] & is_tok[None, :] & (s[None, :] <= s[:, None])  # [S, S]
  cut_of = jnp.take_along_axis(cuts, jnp.clip(blk, 0, C - 1)[None].repeat(B, 0), axis=1)
  mask_tok = (~is_tok)[None, :, None] & is_tok[None, None, :] & (
      s[None, None, :] < cut_of[:, :, None])  # [B, S, S]
  mask_mask = (~is_tok[:, None]) & (blk[:, None] == blk[None, :])
  return tok_tok[None] | mask_tok | mask_mask[None]


def cut_logits(lm: TransformerLM, params: Any, mask_embeds: Array, tokens: Array,
               cuts: Array) -> Array:
  """Block predictions at several cut points of each row, in one cache-free pass.

  lm/params: the drafter network (`draft_model`, `model_params`); mask_embeds: [k, D];
  tokens: [B, T]; cuts: [B, C] prefix lengths (0 <= cut <= T). Mask slot j of cut c
  predicts tokens[b, cuts[b, c] + j] from tokens[b, :cuts[b, c]]. -> [B, C, k, V] float32.
  The C blocks see the same prefix keys/values the incremental drafter computes, so this
  is the training forward pass and the reference of `GadDrafter.propose`.
  """
  B, T = tokens.shape
  C = cuts.shape[1]
  K = mask_embeds.shape[0]
  cfg = lm.config
  tok_embeds = transformer.embed(params, cfg, tokens)  # [B, T, D]
  masks = jnp.broadcast_to(mask_embeds[None, None].astype(tok_embeds.dtype),
                           (B, C, K, tok_embeds.shape[-1])).reshape(B, C * K, -1)
  embeds = jnp.concatenate([tok_embeds, masks], axis=1)
  positions = jnp.concatenate([
      jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
      (cuts[:, :, None] + jnp.arange(K, dtype=jnp.int32)[None, None]).reshape(B, C * K)],
      axis=1)
  attn = cut_attention(T, cuts, K)
  at = jnp.broadcast_to(T + jnp.arange(C * K, dtype=jnp.int32), (B, C * K))
  out = lm(params, None, positions, None, attn, embeds=embeds, logits_at=at)
  return out.logits.reshape(B, C, K, -1)


# ------------------------------------------------------------------------------ the drafter


def choose_drafts(logits: Array, view: DraftView, processor) -> Array:
  """Greedy drafts from block logits [B, k, V]: slot j is the argmax of its logits after the
  logits processors, applied with the context of position L + j (the row followed by the
  drafts of slots < j). -> [B, k] int32."""
  L = view.seq_len

  def body(seqs, xs):
    lg, j = xs
    processed = processor(lg, view.replace(sequences=seqs).context(j))
    tok = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return write_at(seqs, L + j, tok), tok

  K = logits.shape[1]
  _, toks = jax.lax.scan(body, view.sequences, (jnp.moveaxis(logits, 1, 0), jnp.arange(K)))
  return jnp.moveaxis(toks, 0, 1)


@dataclasses.dataclass(frozen=True)
class GadDrafter(Drafter):
  """The GAD block drafter as a chain drafter: `num_draft` (= the GAD block size k) tokens
  per call from one parallel pass over [prefix; k masks] (see the module docstring).

  `target_lm`: the target's TransformerLM (the drafter is its first `num_layers` layers).
  `dparams`: `init_params(...)` or a trained drafter (`drafter_from_artifact`);
  `tparams`: the target's parameters (embedding / head). Drafts are deterministic (the
  argmax of the processed draft logits) in greedy and sampling mode alike; in sampling
  mode they are verified losslessly as point-mass proposals (`probs=None`).
  """
  target_lm: Any = None
  num_layers: int = 4
  num_draft: int = 6
  num_masks: int = 0  # masks fed per proposal (0: num_draft); more than num_draft runs a
  # drafter trained with a larger block and keeps only its first num_draft slots
  kind: str = "chain"

  def __post_init__(self):
    if self.num_masks and self.num_masks < self.num_draft:
      raise ValueError(f"num_masks ({self.num_masks}) must be >= num_draft ({self.num_draft})")

  @property
  def lm(self) -> TransformerLM:
    return draft_model(self.target_lm, self.num_layers)

  @property
  def masks(self) -> int:
    return self.num_masks or self.num_draft

  def init(self, dparams, tparams, prompts, prompt_len, first, info: PrefillInfo,
           cache_len):
    """The drafter's cache over the prompt (length prompt_len; `first` is fed at the first
    proposal, as part of its last k + 1 tokens)."""
    lm = self.lm
    _, cache = prefill(lm, model_params(dparams, tparams), prompts, prompt_len,
                       new_cache(lm, prompts.shape[0], cache_len + self.masks))
    return cache

  def block_logits(self, dparams, tparams, cache, view: DraftView) -> tuple[Array, Any]:
    """Logits of the first k = num_draft mask slots [B, k, V] and the cache of the
    committed prefix (the rollback / refeed / truncate bookkeeping of the module
    docstring; with num_masks = m > k, 2k + 1 becomes k + 1 + m inputs)."""
    lm = self.lm
    params = model_params(dparams, tparams)
    K, W = self.masks, self.num_draft + 1
    B = view.seq_len.shape[0]
    L = view.seq_len
    start = jnp.maximum(L - W, 0)
    idx = start[:, None] + jnp.arange(W)[None]  # [B, W] positions of the refed tokens
    S = view.sequences.shape[1]
    toks = jnp.take_along_axis(view.sequences, jnp.clip(idx, 0, S - 1), axis=1)
    valid = idx < L[:, None]  # False only for padding when start was clamped to 0
    embeds = jnp.concatenate([
        transformer.embed(params, lm.config, toks),
        jnp.broadcast_to(mask_embeddings(dparams, K, lm.config.dtype)[None],
                         (B, K, dparams["mask"].shape[0]))], axis=1)
    positions = jnp.concatenate([idx, L[:, None] + jnp.arange(K)[None]], axis=1)
    n = W + K
    i = jnp.arange(n)
    causal = (i[None, :] <= i[:, None]) & (i[:, None] < W) & (i[None, :] < W)  # tokens
    to_tok = (i[:, None] >= W)[None] & (i[None, None, :] < W) & jnp.pad(
        valid, ((0, 0), (0, K)))[:, None, :]  # masks see the real tokens
    among = (i[:, None] >= W) & (i[None, :] >= W)  # masks see every mask
    attn = causal[None] | to_tok | among[None]
    out = lm(params, None, positions, cache.with_lengths(start), attn, embeds=embeds,
             logits_at=jnp.broadcast_to(W + jnp.arange(self.num_draft), (B, self.num_draft)))
    return out.logits, out.cache.with_lengths(L)

  def propose(self, dparams, tparams, cache, view: DraftView, processor, sample: bool):
    del sample  # argmax drafts in both modes (see the class docstring)
    logits, cache = self.block_logits(dparams, tparams, cache, view)
    return ChainDraft(tokens=choose_drafts(logits, view, processor)), cache


def propose_from_scratch(drafter: GadDrafter, dparams, tparams, view: DraftView,
                         processor) -> Array:
  """What `GadDrafter.propose` drafts, from one cache-free pass over the whole prefix
  (`cut_logits` with the cut at the row's length): the reference of the incremental
  bookkeeping. -> [B, k] int32."""
  lm = drafter.lm
  params = model_params(dparams, tparams)
  logits = cut_logits(lm, params, mask_embeddings(dparams, drafter.masks, lm.config.dtype),
                      view.sequences, view.seq_len[:, None])
  return choose_drafts(logits[:, 0, :drafter.num_draft], view, processor)


def drafter_from_artifact(manifest: dict, trained: dict, target_lm: TransformerLM,
                          target_params: Any, num_draft: Optional[int] = None
                          ) -> tuple[GadDrafter, dict]:
  """(GadDrafter, dparams) for `target_lm` from a loaded `gad_drafter` artifact (written by
  `python -m train.gad`; `models.artifacts.load_artifact`).

  `num_draft`: drafts per call (default: the trained block size k; a smaller value still
  feeds the k trained masks and keeps the first `num_draft` slots). The body comes back in
  the target's layer layout and every leaf in the dtype of a freshly initialized drafter's.
  """
  cfg = manifest["config"]
  k = int(cfg["num_draft"])
  n = k if num_draft is None else int(num_draft)
  if not 1 <= n <= k:
    raise ValueError(f"num_draft_tokens must be in [1, {k}] (the trained block size), got {n}")
  drafter = GadDrafter(target_lm=target_lm, num_layers=int(cfg["num_layers"]), num_draft=n,
                       num_masks=k if n < k else 0)
  if not drafter.lm.config.scan_layers:  # artifacts store the stacked layout
    trained = {**trained, "body": transformer.unstack_layers(trained["body"], drafter.num_layers)}
  like = init_params(target_lm, target_params, drafter.num_layers, k, bool(cfg["slot_embeddings"]))
  return drafter, jax.tree.map(lambda t, x: jnp.asarray(t, x.dtype), trained, like)


@settings
class GadDraft(Validated):
  """A trained GAD block drafter (`gad_drafter`, a registered name or a folder), proposing
  `num_draft_tokens` per call (default: its trained block size)."""
  gad_drafter: str = "gad-smollm2"
  num_draft_tokens: Optional[int] = None

  def validate(self) -> None:
    if self.num_draft_tokens is not None:
      check_int("num_draft_tokens", self.num_draft_tokens, 1)

  def build(self, target, resources):
    require_checksum(target, "a GAD drafter")

    def load():
      manifest, trained = artifacts.load_artifact(self.gad_drafter, "gad_drafter",
                                                  target_sha256=target.sha256,
                                                  target_config=target.lm.config)
      return drafter_from_artifact(manifest, trained, target.lm, target.params,
                                   self.num_draft_tokens)
    try:
      return resources.get(("gad_drafter", self.gad_drafter, target.sha256, self.num_draft_tokens),
                           load, depends_on=(target.params,))
    except (ValueError, FileNotFoundError) as e:
      raise GenerationError(f"cannot load GAD drafter {self.gad_drafter!r}: {e}") from e

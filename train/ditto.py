"""DITTO: training on pseudo-repetitive data to break the self-reinforcing repetition loop.

"Learning to Break the Loop: Analyzing and Mitigating Repetitions for Neural Text
Generation" (Xu et al., NeurIPS 2022). The paper observes that once a sentence has been
repeated, the probability of repeating it again grows with every copy (self-
reinforcement), which is why greedy decoding gets stuck in sentence loops. DITTO
(pseuDo-repetITion penalizaTiOn) fine-tunes an MLE-trained LM on synthetic sequences

    prefix + s + s + s + ...        (s: one sentence of a document, prefix: the one before)

and, for the l-th token of the n-th copy (n >= 2), pushes its probability p_{n,l} toward
gamma times the probability of the same token in the previous copy, held constant:

    L = mean_{n >= 2, l}  -log(max(1 - |p_{n,l} - gamma * sg(p_{n-1,l})|, 1e-20))

so the probability of a repeat decays like gamma^n instead of rising. Updates alternate at
random with ordinary MLE updates (`ditto_mle_mixture`; rate 0.5 in the authors' script).

Pieces:
  * `sentence_end_ids`: boolean [V] table of the tokens that end a sentence.
  * `repetition_example` / `build_repetition_batch`: the pseudo-repetition data (numpy).
  * `ditto_loss`, `ditto_mle_mixture`: `LossFn`s in the conventions of `train/losses.py`.
  * `self_reinforcement_curve`, `sentence_repetition_rate`: the paper's measurements (mean
    token probability per copy, the "TP" curve; fraction of repeated sentences in greedy
    continuations, which `train.evaluation.greedy_continuations` produces).

Choices that differ from the authors' fairseq code (github.com/Jxu-Thu/DITTO,
`fairseq/custom/repetetion_penalty_accum_loss.py`) are listed where they are made.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from train import losses

Array = jax.Array
VARIANTS = ("nl", "mse", "nl_clip")
_CLOSERS = "\"'”’)]»"


# ----------------------------------------------------------------------- sentence segmentation


def sentence_end_ids(tokenizer: Any, vocab_size: Optional[int] = None) -> np.ndarray:
  """Boolean [V] table: True for the tokens that end a sentence.

  A token ends a sentence when its decoded text, after dropping trailing whitespace and
  closing quotes/brackets, ends with '.', '!' or '?'. This covers '.', '!', '?', '...',
  '".' or '.)' and (in other vocabularies) merged tokens such as '.\\n' or ' end.'.
  The paper's code splits only at the single vocabulary entry '.' (Wikitext-103 with a
  word-level vocabulary, where '.' is always its own token); on a BPE vocabulary that rule
  would miss '!', '?' and every merged form. Abbreviations ('Mr.') and decimal points in
  merged tokens are counted as ends: a false split only makes a shorter "sentence".
  Special tokens (`tokenizer.special_ids`) never end a sentence.

  `tokenizer` needs `decode(ids)` (and optionally `vocab_size` / `special_ids`);
  `vocab_size` (e.g. the model's, when its embedding has padding rows) sets the table
  length; ids the tokenizer does not cover are False.
  """
  n_tok = int(getattr(tokenizer, "vocab_size", None) or len(tokenizer))
  size = n_tok if vocab_size is None else int(vocab_size)
  backend = getattr(tokenizer, "backend", None)
  if backend is not None and hasattr(backend, "decode_batch"):
    texts = backend.decode_batch([[i] for i in range(n_tok)], skip_special_tokens=False)
  else:
    texts = [tokenizer.decode([i]) for i in range(n_tok)]
  table = np.zeros((size,), bool)
  for i, text in enumerate(texts[:size]):
    core = text.rstrip().rstrip(_CLOSERS)
    table[i] = core.endswith((".", "!", "?"))
  for i in getattr(tokenizer, "special_ids", ()) or ():
    if 0 <= i < size:
      table[i] = False
  return table


def split_sentences(tokens: Sequence[int], end_table: np.ndarray) -> np.ndarray:
  """Complete sentences of a token sequence as [S, 2] int64 (start, end) half-open spans.

  A sentence runs from just after the previous end token (or the start) through its own
  end token; trailing tokens with no end token after them are not a sentence.
  """
  tokens = np.asarray(tokens, np.int64).reshape(-1)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= len(end_table)):
    raise ValueError(f"token ids must be in [0, {len(end_table)}) (the end table's length)")
  ends = np.flatnonzero(np.asarray(end_table, bool)[tokens]) + 1
  starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
  return np.stack([starts, ends], axis=1) if ends.size else np.zeros((0, 2), np.int64)


# --------------------------------------------------------------------- pseudo-repetition data


def _candidates(spans: np.ndarray, seq_len: int, min_len: int, max_len: int) -> np.ndarray:
  """Indices i >= 1 of the sentences usable as s, with sentence i - 1 as the prefix."""
  if len(spans) < 2:
    return np.zeros((0,), np.int64)
  lens = spans[:, 1] - spans[:, 0]
  prefix, sent = lens[:-1], lens[1:]
  ok = (sent >= min_len) & (sent <= max_len) & (prefix + 2 * sent <= seq_len)
  return np.flatnonzero(ok) + 1


def _repeat_row(prefix: np.ndarray, sentence: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  P, L = len(prefix), len(sentence)
  reps = -(-(seq_len - P) // L)  # ceil
  tokens = np.concatenate([prefix, np.tile(sentence, reps)])[:seq_len]
  t = np.arange(seq_len)
  copy_index = np.where(t >= P, (t - P) // L + 1, 0)
  prev_index = np.where(copy_index >= 2, t - L, -1)
  return {"tokens": tokens.astype(np.int32), "prev_index": prev_index.astype(np.int32),
          "copy_index": copy_index.astype(np.int32)}


def repetition_example(doc: Sequence[int], end_table: np.ndarray, seq_len: int,
                       rng: Union[np.random.Generator, int, None] = None, *,
                       min_sentence_len: int = 4, max_sentence_len: Optional[int] = None
                       ) -> Optional[dict[str, np.ndarray]]:
  """One pseudo-repetitive row from a tokenized document, or None if no sentence fits.

  Picks, uniformly, a sentence s (index >= 1, so the previous sentence exists) with
  `min_sentence_len <= len(s) <= max_sentence_len` and room for the prefix and two full
  copies (`len(prefix) + 2 len(s) <= seq_len`, so every row has penalized tokens), then
  returns `prefix + s + s + ...` cut to `seq_len` tokens (the last copy may be partial):

    tokens      [T] int32: the sequence.
    prev_index  [T] int32: position of the same token in the previous copy of s
                (t - len(s)) for copies n >= 2; -1 for the prefix and the first copy.
    copy_index  [T] int32: 0 for the prefix, n for the n-th copy (1-based).

  As in the paper, the prefix is the whole previous sentence. The authors' code cuts at
  '.' tokens so that its "sentence" is '. w1 ... wk' (it starts with the previous period);
  here s is 'w1 ... wk .', which repeats the same loop. Deterministic given `rng` (a
  `np.random.Generator`, consumed, or a seed).
  """
  rng = np.random.default_rng(rng)
  doc = np.asarray(doc, np.int64).reshape(-1)
  spans = split_sentences(doc, end_table)
  max_len = seq_len if max_sentence_len is None else int(max_sentence_len)
  cands = _candidates(spans, seq_len, int(min_sentence_len), max_len)
  if cands.size == 0:
    return None
  i = int(cands[rng.integers(cands.size)])
  prefix = doc[spans[i - 1, 0]:spans[i - 1, 1]]
  sentence = doc[spans[i, 0]:spans[i, 1]]
  return _repeat_row(prefix, sentence, seq_len)


def build_repetition_batch(docs: Sequence[Sequence[int]], end_table: np.ndarray, seq_len: int,
                           rng: Union[np.random.Generator, int, None] = None,
                           batch_size: Optional[int] = None, *, min_sentence_len: int = 4,
                           max_sentence_len: Optional[int] = None) -> dict[str, np.ndarray]:
  """A DITTO batch: dict of `tokens`, `prev_index`, `copy_index`, each [B, T] int32.

  Row r uses document `docs[r % len(docs)]` when that document has a usable sentence
  (the authors build one row from each row of the MLE batch); otherwise a document drawn
  at random from those that have one. Raises ValueError when no document has one.
  `batch_size` defaults to `len(docs)`. Deterministic given `rng` (Generator or seed).
  """
  if seq_len < 3:
    raise ValueError(f"seq_len must be >= 3, got {seq_len}")
  rng = np.random.default_rng(rng)
  B = len(docs) if batch_size is None else int(batch_size)
  if B < 1 or not len(docs):
    raise ValueError("need at least one document and batch_size >= 1")
  max_len = seq_len if max_sentence_len is None else int(max_sentence_len)
  docs = [np.asarray(d, np.int64).reshape(-1) for d in docs]
  spans = [split_sentences(d, end_table) for d in docs]
  cands = [_candidates(s, seq_len, int(min_sentence_len), max_len) for s in spans]
  usable = [j for j, c in enumerate(cands) if c.size]
  if not usable:
    raise ValueError(
        f"no document has a sentence of {min_sentence_len}..{max_len} tokens after another "
        f"sentence that fits twice (with its prefix) in seq_len={seq_len}")
  rows = []
  for r in range(B):
    j = r % len(docs)
    if not cands[j].size:
      j = usable[int(rng.integers(len(usable)))]
    i = int(cands[j][rng.integers(cands[j].size)])
    sp = spans[j]
    rows.append(_repeat_row(docs[j][sp[i - 1, 0]:sp[i - 1, 1]], docs[j][sp[i, 0]:sp[i, 1]],
                            seq_len))
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


class RepetitionSampler:
  """Pseudo-repetition rows drawn from a whole tokenized corpus.

  Sentence spans and usable (prefix, sentence) pairs are computed once; each row then
  picks one usable sentence uniformly at random over the corpus, so every training
  sentence can appear (`build_repetition_batch` instead ties row r to `docs[r]`, the
  authors' one-row-per-MLE-row scheme). Deterministic given the rng.
  """

  def __init__(self, docs: Sequence[Sequence[int]], end_table: np.ndarray, seq_len: int, *,
               min_sentence_len: int = 4, max_sentence_len: Optional[int] = None):
    if seq_len < 3:
      raise ValueError(f"seq_len must be >= 3, got {seq_len}")
    max_len = seq_len if max_sentence_len is None else int(max_sentence_len)
    self.seq_len = seq_len
    self.docs = [np.asarray(d, np.int64).reshape(-1) for d in docs]
    self.spans = [split_sentences(d, end_table) for d in self.docs]
    pairs = [(j, int(i)) for j, sp in enumerate(self.spans)
             for i in _candidates(sp, seq_len, int(min_sentence_len), max_len)]
    if not pairs:
      raise ValueError(
          f"no document has a sentence of {min_sentence_len}..{max_len} tokens after another "
          f"sentence that fits twice (with its prefix) in seq_len={seq_len}")
    self.pairs = np.asarray(pairs, np.int64)  # [P, 2] (document, sentence index)

  def __len__(self) -> int:
    return len(self.pairs)

  def batch(self, rng: Union[np.random.Generator, int, None], batch_size: int
            ) -> dict[str, np.ndarray]:
    """`tokens`, `prev_index`, `copy_index`, each [batch_size, seq_len] int32."""
    rng = np.random.default_rng(rng)
    rows = []
    for k in rng.integers(len(self.pairs), size=int(batch_size)):
      j, i = self.pairs[k]
      sp, doc = self.spans[j], self.docs[j]
      rows.append(_repeat_row(doc[sp[i - 1, 0]:sp[i - 1, 1]], doc[sp[i, 0]:sp[i, 1]],
                              self.seq_len))
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------- loss


def _check(gamma: float, variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"unknown DITTO variant {variant!r}; choose from {VARIANTS}")
  if not 0.0 < float(gamma) <= 1.0:
    raise ValueError(f"gamma must be in (0, 1], got {gamma}")


def validate(gamma: float, variant: str, ditto_rate: float) -> None:
  """ValueError for invalid DITTO settings (checked before any model is loaded)."""
  _check(gamma, variant)
  if not 0.0 <= float(ditto_rate) <= 1.0:
    raise ValueError(f"ditto_rate must be in [0, 1], got {ditto_rate}")


def repetition_probs(logits: Array, tokens: Array, prev_index: Array
                     ) -> tuple[Array, Array, Array]:
  """(p, baseline, mask), each [B, T] float32.

  p[b, t] = p(tokens[b, t] | tokens[b, :t]); baseline[b, t] = stop_gradient(p[b,
  prev_index[b, t]]) (0 where prev_index < 0); mask = (prev_index >= 0), i.e. the tokens
  of copies n >= 2. Column 0 is never penalized.
  logits: [B, T, V]; tokens, prev_index: [B, T] int32.
  """
  p = jnp.exp(losses.token_logprobs(logits, tokens))
  valid = prev_index >= 0
  mask = (valid & (jnp.arange(tokens.shape[1]) > 0)[None]).astype(jnp.float32)
  prev_p = jnp.take_along_axis(p, jnp.clip(prev_index, 0, tokens.shape[1] - 1), axis=1)
  baseline = jax.lax.stop_gradient(jnp.where(valid, prev_p, 0.0))
  return p, baseline, mask


def ditto_penalty(p: Array, baseline: Array, gamma: float, variant: str = "nl") -> Array:
  """Per-token DITTO penalty (elementwise; `baseline` should already be stop-gradiented).

  nl:      -log(max(1 - |p - gamma b|, 1e-20))
  mse:     (p - gamma b)^2
  nl_clip: -log(max(1 - max(p - gamma b, 0), 1e-20))   (only p above gamma b is penalized)
  """
  _check(gamma, variant)
  diff = p - gamma * baseline
  if variant == "mse":
    return jnp.square(diff)
  dev = jnp.abs(diff) if variant == "nl" else jnp.maximum(diff, 0.0)
  return -jnp.log(jnp.maximum(1.0 - dev, 1e-20))


def ditto_loss_from_logits(logits: Array, batch: losses.Batch, gamma: float = 0.5,
                           variant: str = "nl") -> tuple[Array, dict]:
  """The DITTO loss of given logits [B, T, V] on a batch from `build_repetition_batch`."""
  p, baseline, mask = repetition_probs(logits, batch["tokens"], batch["prev_index"])
  if batch.get("loss_mask") is not None:
    mask = mask * batch["loss_mask"].astype(jnp.float32)
  loss = losses.masked_mean(ditto_penalty(p, baseline, gamma, variant), mask)
  return loss, {"ditto": loss, "p_repeat": losses.masked_mean(p, mask),
                "p_baseline": losses.masked_mean(baseline, mask), "tokens": jnp.sum(mask)}


def ditto_loss(config: ModelConfig, gamma: float = 0.5, variant: str = "nl") -> losses.LossFn:
  """DITTO sentence-repetition penalty as a `LossFn` (see the module docstring).

  The batch holds `tokens` and `prev_index` [B, T] (from `build_repetition_batch`;
  `copy_index` is ignored) and optionally `positions` and a `loss_mask` that further
  weights the penalized tokens. For each token of a copy n >= 2, p_{n,l} is its
  probability and the baseline sg(p_{n-1,l}) the probability of the same token in the
  previous copy, with no gradient through it. The prefix and the first copy get no loss.
  The loss is the mean penalty over penalized tokens.

  `gamma` is the paper's lambda (`rep_reduce_gamma`; 0.5 in the released training script,
  0.95 its argparse default). Variants are the code's `loss_type`: `nl` (the paper's loss),
  `mse` and `nl_clip`. Differences from the authors' code: every variant is averaged over
  penalized tokens (their `mse` sums over all positions, prefix and first copy included,
  and multiplies by 3), and the first token of the second copy is penalized too (their
  target mask starts one token late).

  Metrics: `ditto` (= loss), `p_repeat` (mean p of penalized tokens), `p_baseline` (mean
  baseline) and `tokens` (number of penalized tokens).
  """
  _check(gamma, variant)
  gamma = float(gamma)

  def loss_fn(params, batch: losses.Batch, key: Array):
    del key
    logits = losses.sequence_logits(params, config, batch["tokens"], batch.get("positions"))
    return ditto_loss_from_logits(logits, batch, gamma, variant)
  return loss_fn


def ditto_mle_mixture(config: ModelConfig, gamma: float = 0.5, variant: str = "nl",
                      ditto_rate: float = 0.5) -> losses.LossFn:
  """Each step: the DITTO loss with probability `ditto_rate`, else MLE (next-token loss).

  The authors' `sequence_level_train_rate` (0.5). The batch holds the sub-batches
  `batch["ditto"]` (from `build_repetition_batch`) and `batch["mle"]` (ordinary text:
  `tokens`, optional `loss_mask`); both must be present every step (fixed shapes for
  `lax.switch`); only the chosen branch runs. Metrics are prefixed `ditto/` and `mle/`,
  plus `branch` (0 = ditto, 1 = mle).
  """
  validate(gamma, variant, ditto_rate)
  return losses.mixture({"mle": losses.next_token_loss(config),
                         "ditto": ditto_loss(config, gamma, variant)},
                        {"ditto": float(ditto_rate), "mle": 1.0 - float(ditto_rate)})


# ------------------------------------------------------------------------------ measurement


def _config(lm_or_config: Any) -> ModelConfig:
  return lm_or_config if isinstance(lm_or_config, ModelConfig) else lm_or_config.config


def copy_probabilities(logits: Array, tokens: Array, copy_index: Array, num_copies: int) -> Array:
  """Mean token probability of each copy in each row: [B, num_copies] float32.

  logits: [B, T, V] of a causal pass over tokens [B, T]; copy_index: [B, T] (0 for the
  prefix and padding, n for the n-th copy). Column 0 (never predicted) is left out.
  Pure and jittable (`num_copies` static).
  """
  p = jnp.exp(losses.token_logprobs(logits, tokens))  # [B, T]
  onehot = copy_index[..., None] == jnp.arange(1, num_copies + 1)  # [B, T, N]
  onehot = onehot & (jnp.arange(tokens.shape[1]) > 0)[None, :, None]
  w = onehot.astype(jnp.float32)
  return jnp.einsum("bt,btn->bn", p, w) / jnp.maximum(w.sum(1), 1.0)


_copy_probabilities = jax.jit(copy_probabilities, static_argnums=3)


def self_reinforcement_curve(lm_or_config: Any, params: Any,
                             sentences: Sequence[Sequence[int]],
                             prefixes: Sequence[Sequence[int]], num_copies: int = 10,
                             batch_size: int = 8) -> np.ndarray:
  """The paper's "TP" curve: mean probability of a sentence's tokens in its n-th copy.

  For each sentence s with its prefix, runs one cache-free forward pass over
  `prefix + s * num_copies` and averages p(token | context) over the tokens of copy n;
  returns the average over sentences, [num_copies] float64, n = 1..num_copies. An MLE
  LM's curve rises with n (self-reinforcement); DITTO makes it fall. Rows are right-
  padded to a multiple of 16 tokens and the batch to `batch_size` (fixed shapes, few
  compilations); padding does not change the causal pass. A prefix may be empty (then the
  first token of copy 1, which nothing predicts, is left out).
  """
  config = _config(lm_or_config)
  if len(sentences) != len(prefixes) or not len(sentences):
    raise ValueError("need as many prefixes as sentences, and at least one sentence")
  if num_copies < 1:
    raise ValueError(f"num_copies must be >= 1, got {num_copies}")
  rows = []
  for s, pre in zip(sentences, prefixes):
    s, pre = np.asarray(s, np.int64).reshape(-1), np.asarray(pre, np.int64).reshape(-1)
    if s.size == 0:
      raise ValueError("empty sentence")
    rows.append((np.concatenate([pre, np.tile(s, num_copies)]),
                 np.concatenate([np.zeros(pre.size, np.int64),
                                 np.repeat(np.arange(1, num_copies + 1), s.size)])))
  longest = max(len(r[0]) for r in rows)
  if longest > config.max_position_embeddings:
    raise ValueError(f"prefix + {num_copies} copies = {longest} tokens exceeds the model's "
                     f"{config.max_position_embeddings} positions")
  T = 16 * math.ceil(longest / 16)
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    tokens = np.zeros((batch_size, T), np.int32)
    copies = np.zeros((batch_size, T), np.int32)
    for i, (tok, cp) in enumerate(chunk):
      tokens[i, :len(tok)], copies[i, :len(cp)] = tok, cp
    tokens, copies = jnp.asarray(tokens), jnp.asarray(copies)
    logits = losses.sequence_logits(params, config, tokens)  # jitted forward, cached by shape
    probs = _copy_probabilities(logits, tokens, copies, num_copies)
    out.append(np.asarray(probs, np.float64)[:len(chunk)])
  return np.concatenate(out).mean(0)


def sentence_repetition_rate(token_rows: Sequence[Sequence[int]], sentence_end_table: np.ndarray
                             ) -> float:
  """Fraction of sentences that repeat an earlier sentence of the same row.

  Each row (e.g. one greedy continuation, without its prompt) is split into complete
  sentences (`split_sentences`; a trailing unfinished sentence is not counted); a sentence
  counts as repeated when the exact same token sequence occurred earlier in that row.
  Returns repeated / total over all rows (0.0 when there is no sentence). Exact token
  match, so ' A cat.' and 'A cat.' (different leading-space tokens) are different.
  """
  repeated = total = 0
  for row in token_rows:
    row = np.asarray(row, np.int64).reshape(-1)
    seen = set()
    for a, b in split_sentences(row, sentence_end_table):
      key = tuple(row[a:b].tolist())
      repeated += key in seen
      total += 1
      seen.add(key)
  return repeated / total if total else 0.0

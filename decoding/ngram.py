"""Exact n-gram count tables on the device, for n-gram smoothing inside jitted decoding.

Superposed Decoding ("Superposed Decoding: Multiple Generations from a Single
Autoregressive Inference Pass", Shen et al., NeurIPS 2024) rescores each draft's
candidate tokens with interpolated n-gram models,

  p_ng(v | x) = sum_{c=1..C} w_c * P_c(v | last c tokens of x),
  P_c(v | h) = count(h, v) / count(h, .)   (maximum likelihood),

where orders whose context is longer than x are skipped, and an n-gram that never
occurs (unseen context, or seen context never followed by v) contributes 0, as in the
reference code (`superposed/ngrams/ngram_models.py`, `superpose.py`). Counts are taken
per document (no n-gram spans two documents), orders n = c + 1 = 2..C+1 (C = 5: bigrams
to 6-grams, the reference's defaults).

Device layout (`NGramModel`, a pytree of arrays passed to jitted code as a traced
argument): every distinct n-gram (h, v) of every order is one row of a single table,
identified by an exact packed key

  key = [c, packed(0, ..., 0, h_1, ..., h_c, v)]   ([W] uint32 words)

with the c + 1 tokens left-padded with zeros to C + 1 and packed, two 16-bit tokens per
word when the vocabulary has at most 2^16 ids (else one per word). Each row holds
count(h, v) and its context's total count(h, .). The rows are grouped by a hash of the
key into 2^b buckets (2^b about N / 2, `offsets` gives each bucket's row range, like a
CSR matrix), and `bucket_size` is the largest bucket. A lookup packs the query the same
way, hashes it, gathers its bucket's (at most `bucket_size`) rows at once and compares
the full keys: no loop, two dependent gathers, and exact, since the hash only chooses
the bucket (colliding n-grams share a bucket and are told apart by their keys; more
collisions only make `bucket_size`, a static shape, larger). Table arrays are
fixed-size, so one compiled program serves any table of the same shapes.

Tables are built on the host with numpy (`build_ngram_model`) from documents tokenized
with the model's tokenizer; `load_ngram_model(corpus, tokenizer)` builds them for a
named corpus once and caches them on disk (`~/.cache/decodax/ngram/` or
`$DECODAX_NGRAM_DIR`, an .npz keyed by corpus, tokenizer fingerprint and table format). The corpus is the project's
offline English prose: Jane Austen's novels (`models.datasets.corpus_texts`, the
`text_corpus` dataset), split `train` by default.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from typing import Iterable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models.datasets import corpus_texts

Array = jax.Array

MAX_CONTEXT = 5  # context lengths 1..5: bigrams .. 6-grams
FORMAT_VERSION = 2  # bump when the table layout or the counting rule changes
CORPORA = ("text_corpus/train", "text_corpus/validation", "text_corpus/test")
DEFAULT_CORPUS = "text_corpus/train"
_SENTINEL = np.uint32(0xFFFFFFFF)  # word 0 of the padding row: no query matches it


@flax.struct.dataclass
class NGramModel:
  """Count tables of n-gram orders 2..max_context+1 (a pytree of arrays)."""
  keys: Array  # [N, W] uint32 n-gram keys, grouped by bucket (see the module docstring)
  counts: Array  # [N] int32 count(h, v)
  totals: Array  # [N] int32 count(h, .) of the row's context
  offsets: Array  # [2^b + 1] int32: bucket j holds rows offsets[j] .. offsets[j+1]-1
  max_context: int = flax.struct.field(pytree_node=False, default=MAX_CONTEXT)
  tokens_per_word: int = flax.struct.field(pytree_node=False, default=2)
  bucket_size: int = flax.struct.field(pytree_node=False, default=1)  # largest bucket

  @property
  def num_rows(self) -> int:
    return int(self.keys.shape[0])


def tokens_per_word(vocab_size: int) -> int:
  return 2 if vocab_size <= 1 << 16 else 1


def _num_words(max_context: int, tpw: int) -> int:
  return 1 + -(-(max_context + 1) // tpw)


def _hash(keys, xp):
  """32-bit hash of [..., W] uint32 keys (murmur3's finalizer after each word), the same
  with xp = numpy on the host and xp = jax.numpy on the device."""
  u32 = xp.uint32

  def fmix(h):
    h = h ^ (h >> u32(16))
    h = h * u32(0x85EBCA6B)
    h = h ^ (h >> u32(13))
    h = h * u32(0xC2B2AE35)
    return h ^ (h >> u32(16))

  h = xp.full(keys.shape[:-1], 0x9747B28C, dtype=xp.uint32)
  for w in range(keys.shape[-1]):
    h = fmix(h ^ keys[..., w])
  return h


# ------------------------------------------------------------------------------ host build


def _pack_host(grams: np.ndarray, c: int, max_context: int, tpw: int) -> np.ndarray:
  """[M, c+1] token ids -> [M, W] uint32 keys."""
  width = -(-(max_context + 1) // tpw) * tpw
  padded = np.zeros((grams.shape[0], width), np.uint64)
  padded[:, width - grams.shape[1]:] = grams
  if tpw == 2:
    words = (padded[:, 0::2] << np.uint64(16)) | padded[:, 1::2]
  else:
    words = padded
  head = np.full((grams.shape[0], 1), c, np.uint64)
  return np.concatenate([head, words], axis=1).astype(np.uint32)


def _count_orders(docs: Sequence[np.ndarray], max_context: int, vocab_size: int):
  """For c = 1..max_context: distinct (c+1)-grams in lexicographic order, their counts and
  context totals.

  Every n-gram gets its lexicographic rank among the distinct n-grams of its length,
  extended one token at a time (rank * V + next token is exact in int64), so one sort per
  length replaces a multi-column lexicographic sort. No n-gram spans two documents.
  """
  stream = np.concatenate(docs + [np.zeros(0, np.int64)]).astype(np.int64)
  doc_end = np.repeat(np.cumsum([len(d) for d in docs]), [len(d) for d in docs])
  pos = np.arange(len(stream))
  rank, out = stream, []
  for c in range(1, max_context + 1):
    ok = pos + c < doc_end  # an n-gram of c + 1 tokens starts here
    context_rank = rank[ok]
    _, first, new_rank = np.unique(context_rank * vocab_size + stream[pos[ok] + c],
                                   return_index=True, return_inverse=True)
    new_rank = new_rank.reshape(-1)
    starts = pos[ok][first]
    grams = stream[starts[:, None] + np.arange(c + 1)]
    counts = np.bincount(new_rank)
    totals = np.bincount(context_rank)[context_rank[first]]
    out.append((grams, counts, totals))
    rank = np.full(len(stream), -1, np.int64)
    rank[ok] = new_rank
  return out


def build_tables(docs: Iterable[Sequence[int]], vocab_size: int,
                 max_context: int = MAX_CONTEXT) -> dict[str, np.ndarray]:
  """Host (numpy) tables {keys, counts, totals, offsets, meta} from tokenized documents."""
  docs = [np.asarray(d, np.int64) for d in docs]
  for d in docs:
    if d.size and (d.min() < 0 or d.max() >= vocab_size):
      raise ValueError(f"token id outside [0, {vocab_size}) in the n-gram corpus")
  tpw = tokens_per_word(vocab_size)
  keys, counts, totals = [], [], []
  for c, (uniq, cnt, tot) in enumerate(_count_orders(docs, max_context, vocab_size), 1):
    keys.append(_pack_host(uniq, c, max_context, tpw))
    counts.append(cnt)
    totals.append(tot)
  keys.append(np.full((1, _num_words(max_context, tpw)), _SENTINEL, np.uint32))
  counts.append(np.zeros(1, np.int64))
  totals.append(np.ones(1, np.int64))
  keys, counts, totals = np.concatenate(keys), np.concatenate(counts), np.concatenate(totals)
  if counts.max() >= 2**31 or totals.max() >= 2**31:
    raise ValueError("n-gram counts do not fit in int32")
  num_buckets = max(1, (1 << (len(keys) - 1).bit_length()) // 2)
  with np.errstate(over="ignore"):
    bucket = (_hash(keys, np) & np.uint32(num_buckets - 1)).astype(np.int64)
  order = np.argsort(bucket, kind="stable")
  sizes = np.bincount(bucket, minlength=num_buckets)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
  return dict(keys=keys[order], counts=counts[order].astype(np.int32),
              totals=totals[order].astype(np.int32), offsets=offsets,
              meta=np.asarray([max_context, tpw, FORMAT_VERSION, sizes.max()], np.int64))


def model_from_tables(tables: dict[str, np.ndarray]) -> NGramModel:
  """Puts host tables on the default device."""
  max_context, tpw, version, bucket_size = (int(x) for x in tables["meta"])
  if version != FORMAT_VERSION:
    raise ValueError(f"n-gram table format {version}, expected {FORMAT_VERSION}")
  return NGramModel(keys=jnp.asarray(tables["keys"]), counts=jnp.asarray(tables["counts"]),
                    totals=jnp.asarray(tables["totals"]), offsets=jnp.asarray(tables["offsets"]),
                    max_context=max_context, tokens_per_word=tpw, bucket_size=bucket_size)


def build_ngram_model(docs: Iterable[Sequence[int]], vocab_size: int,
                      max_context: int = MAX_CONTEXT) -> NGramModel:
  """Count tables of orders 2..max_context+1 from token-id documents, on the device."""
  return model_from_tables(build_tables(docs, vocab_size, max_context))


# ---------------------------------------------------------------------------- device lookup


def _pack_device(seq: Array, order: Array, max_context: int, tpw: int) -> Array:
  """[..., max_context+1] tokens (already zero-padded on the left) -> [..., W] uint32."""
  seq = seq.astype(jnp.uint32)
  width = -(-(max_context + 1) // tpw) * tpw
  pad = width - seq.shape[-1]
  if pad:
    seq = jnp.concatenate([jnp.zeros(seq.shape[:-1] + (pad,), jnp.uint32), seq], axis=-1)
  words = (seq[..., 0::2] << 16) | seq[..., 1::2] if tpw == 2 else seq
  head = jnp.broadcast_to(order.astype(jnp.uint32), seq.shape[:-1])[..., None]
  return jnp.concatenate([head, words], axis=-1)


def _find(model: NGramModel, queries: Array) -> tuple[Array, Array]:
  """(found [Q] bool, row [Q] int32) of [Q, W] query keys: scan each query's bucket."""
  n, num_buckets = model.num_rows, model.offsets.shape[0] - 1
  bucket = (_hash(queries, jnp) & jnp.uint32(num_buckets - 1)).astype(jnp.int32)
  start, end = model.offsets[bucket], model.offsets[bucket + 1]
  rows = start[:, None] + jnp.arange(model.bucket_size, dtype=jnp.int32)[None]  # [Q, S]
  match = (rows < end[:, None]) & jnp.all(
      model.keys[jnp.minimum(rows, n - 1)] == queries[:, None, :], axis=-1)
  row = jnp.take_along_axis(rows, jnp.argmax(match, axis=-1)[:, None], axis=1)[:, 0]
  return jnp.any(match, axis=-1), jnp.minimum(row, n - 1)


@jax.jit
def order_probs(model: NGramModel, history: Array, available: Array, candidates: Array) -> Array:
  """P_c(v | last c tokens) for every candidate v and context length c = 1..C.

  history: [..., H] int32, the last H >= C tokens of each context, most recent last;
  available: [...] int32, how many tokens each context has (orders with c > available
  are skipped: probability 0); candidates: [..., M] int32.
  Returns [..., M, C] float32; 0 where the n-gram never occurs in the corpus. Jitted (a
  no-op inside an outer jit).
  """
  C, tpw = model.max_context, model.tokens_per_word
  if history.shape[-1] < C:
    raise ValueError(f"history holds {history.shape[-1]} tokens, the tables need {C}")
  lead, M = candidates.shape[:-1], candidates.shape[-1]
  ctx = jnp.broadcast_to(history[..., None, history.shape[-1] - C:], lead + (M, C))
  seq = jnp.concatenate([ctx, candidates[..., None]], axis=-1)  # [..., M, C+1]
  orders = jnp.arange(1, C + 1, dtype=jnp.int32)  # [C]
  keep = jnp.arange(C + 1)[None, :] >= (C - orders)[:, None]  # [C, C+1]: last c+1 tokens
  seq = jnp.where(keep, seq[..., None, :], 0)  # [..., M, C, C+1]
  queries = _pack_device(seq, orders, C, tpw)  # [..., M, C, W]
  found, idx = _find(model, queries.reshape(-1, queries.shape[-1]))
  found, idx = found.reshape(queries.shape[:-1]), idx.reshape(queries.shape[:-1])
  prob = model.counts[idx].astype(jnp.float32) / model.totals[idx].astype(jnp.float32)
  usable = found & (orders <= jnp.asarray(available)[..., None, None])
  return jnp.where(usable, prob, 0.0)


@jax.jit
def interpolated_prob(model: NGramModel, history: Array, available: Array, candidates: Array,
                      weights: Array) -> Array:
  """p_ng(v) = sum_c w_c P_c(v | last c tokens) ([..., M]); weights [<= C] for c = 1, 2, ..."""
  weights = jnp.asarray(weights, jnp.float32)
  weights = jnp.pad(weights, (0, model.max_context - weights.shape[0]))
  return order_probs(model, history, available, candidates) @ weights


# ------------------------------------------------------------------------ corpora and caches


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 of what determines the token ids: the serialized tokenizer where there is one
  (the vocabulary otherwise), the vocabulary size and the ids of a probe text."""
  h = hashlib.sha256()
  h.update(type(tokenizer).__name__.encode())
  backend = getattr(tokenizer, "backend", None)
  if backend is not None and hasattr(backend, "to_str"):
    h.update(backend.to_str().encode())
  elif getattr(tokenizer, "tokens", None) is not None:
    h.update("\n".join(tokenizer.tokens).encode())
  h.update(str(_vocab_size(tokenizer)).encode())
  probe = "The quick brown fox, Mr. Darcy's 12,345 -- \"naïve\" café; Élise\n\tend."
  h.update(json.dumps(_encode(tokenizer, [probe])).encode())
  return h.hexdigest()


def _vocab_size(tokenizer) -> int:
  size = getattr(tokenizer, "vocab_size", None)
  return int(len(tokenizer) if size is None else size)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
  batch = getattr(tokenizer, "encode_batch", None)
  if batch is not None:
    return [list(ids) for ids in batch(texts, add_special_tokens=False)]
  return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def corpus_documents(corpus: str) -> list[str]:
  """The documents of a named corpus (`CORPORA`)."""
  if corpus not in CORPORA:
    raise ValueError(f"unknown n-gram corpus {corpus!r}; available: {list(CORPORA)}")
  return corpus_texts(corpus.split("/", 1)[1])


def cache_dir() -> str:
  return os.environ.get("DECODAX_NGRAM_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "decodax", "ngram"))


def cache_path(corpus: str, fingerprint: str, max_context: int = MAX_CONTEXT) -> str:
  name = f"{corpus.replace('/', '-')}_tok-{fingerprint[:16]}_c{max_context}_v{FORMAT_VERSION}.npz"
  return os.path.join(cache_dir(), name)


def load_tables(corpus: str, tokenizer, max_context: int = MAX_CONTEXT
                ) -> tuple[dict[str, np.ndarray], Optional[float]]:
  """Host tables of `corpus` tokenized with `tokenizer`, and the seconds it took to build
  them (None when read from the disk cache, `cache_path`).

  Otherwise they are built (every document tokenized without special tokens, then
  counted) and saved. The Austen train split with SmolLM2's tokenizer (0.82M tokens)
  gives 2.95M n-grams, 79 MB on disk and on the device; building took 5.5 s on 2 shared
  CPU cores (tokenizing about 3.5 s, counting about 2 s), loading the .npz 0.1-0.2 s.
  """
  path = cache_path(corpus, tokenizer_fingerprint(tokenizer), max_context)
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        tables = {k: f[k] for k in f.files}
      if int(tables["meta"][2]) == FORMAT_VERSION:
        return tables, None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # unreadable: rebuild
      pass
  start = time.perf_counter()
  docs = _encode(tokenizer, corpus_documents(corpus))
  tables = build_tables(docs, _vocab_size(tokenizer), max_context)
  seconds = time.perf_counter() - start
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **tables)
  os.replace(tmp, path)  # atomic: concurrent builders never read a partial file
  return tables, seconds


def load_ngram_model(corpus: str, tokenizer, max_context: int = MAX_CONTEXT) -> NGramModel:
  """The count tables of `corpus` tokenized with `tokenizer`, on the device (built or read
  from the disk cache by `load_tables`; callers keep the result, e.g. in a
  `decoding.strategy.Resources`)."""
  return model_from_tables(load_tables(corpus, tokenizer, max_context)[0])

"""Language-model training rows from text: tokenize documents and pack them into fixed-length rows.

Packing (``tokenize_to_sequences``) is the standard one for causal-LM training: every document
is encoded without BOS, an end-of-sequence id is appended after it, the documents are
concatenated in order into one token stream, and the stream is cut into consecutive,
non-overlapping rows of ``seq_len`` tokens.  Rows may therefore start or end in the middle of a
document and may span a document boundary (the EOS marks it).  The final partial row (fewer than
``seq_len`` tokens left) is dropped, so at most ``seq_len - 1`` tokens of the whole stream are
unused; nothing else is cut.  This is for training corpora, not for prompts: a prompt that must
be kept whole is never passed through here.

``load_text_sequences`` does this for a split of the ``text_corpus`` dataset (Jane Austen's
novels, one chapter per document; see ``models/datasets/text_corpus.py``).
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Iterable, Iterator

import numpy as np

from models.datasets import corpus_texts

__all__ = ["tokenize_to_sequences", "load_text_sequences"]

_ENCODE_BATCH = 64  # documents per encode_batch call


def _encoder(tokenizer):
  """A function ``list[str] -> list[list[int]]`` encoding texts without BOS/EOS.

  Uses ``encode_batch`` when the tokenizer has it, and passes ``add_special_tokens=False`` when
  its ``encode`` / ``encode_batch`` accepts that argument (the project's ``Tokenizer`` does).
  """
  def accepts_flag(fn) -> bool:
    try:
      return "add_special_tokens" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
      return False

  batch = getattr(tokenizer, "encode_batch", None)
  if batch is not None:
    kwargs = {"add_special_tokens": False} if accepts_flag(batch) else {}
    return lambda texts: [list(ids) for ids in batch(list(texts), **kwargs)]
  kwargs = {"add_special_tokens": False} if accepts_flag(tokenizer.encode) else {}
  return lambda texts: [list(tokenizer.encode(t, **kwargs)) for t in texts]


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
  chunk = []
  for text in texts:
    if not isinstance(text, str):
      raise TypeError(f"documents must be str, got {type(text).__name__}")
    chunk.append(text)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def tokenize_to_sequences(texts: Iterable[str], tokenizer: Any, seq_len: int, *,
                          eos_id: int | None = None,
                          max_sequences: int | None = None) -> np.ndarray:
  """Pack ``texts`` into an ``int32`` array ``[N, seq_len]`` of consecutive token rows.

  Each document is encoded with ``tokenizer`` (no BOS) and followed by ``eos_id``; the
  documents are concatenated in the given order and cut into non-overlapping rows of ``seq_len``
  tokens.  The trailing partial row is dropped (see the module docstring).  ``eos_id=None``
  uses ``tokenizer.eos_id``; if that is missing or None too, documents are concatenated with no
  separator.  With ``max_sequences``, only the first ``max_sequences`` rows are built and the
  documents after them are not encoded.  Deterministic: the same inputs give the same array.
  """
  if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
  if max_sequences is not None and (not isinstance(max_sequences, (int, np.integer))
                                    or isinstance(max_sequences, bool) or max_sequences < 0):
    raise ValueError(f"max_sequences must be a non-negative int or None, got {max_sequences!r}")
  if isinstance(texts, str):
    raise TypeError("texts must be an iterable of documents, not a single str")
  if eos_id is None:
    eos_id = getattr(tokenizer, "eos_id", None)
  separator = [] if eos_id is None else [int(eos_id)]
  encode = _encoder(tokenizer)
  needed = None if max_sequences is None else int(max_sequences) * int(seq_len)

  stream: list[int] = []
  if needed != 0:
    for chunk in _chunks(texts, _ENCODE_BATCH):
      for ids in encode(chunk):
        stream.extend(ids)
        stream.extend(separator)
      if needed is not None and len(stream) >= needed:
        break
  n_rows = len(stream) // seq_len
  if needed is not None:
    n_rows = min(n_rows, int(max_sequences))
  rows = np.asarray(stream[:n_rows * seq_len], dtype=np.int64)
  if rows.size and (rows.min() < np.iinfo(np.int32).min or rows.max() > np.iinfo(np.int32).max):
    raise ValueError("token ids do not fit in int32")
  return rows.astype(np.int32).reshape(n_rows, seq_len)


def load_text_sequences(split: str, tokenizer: Any, seq_len: int,
                        max_sequences: int | None = None,
                        data_dir: str | os.PathLike | None = None, *,
                        eos_id: int | None = None) -> np.ndarray:
  """``tokenize_to_sequences`` of the ``text_corpus`` split ``split`` (``train``,
  ``validation`` or ``test``): ``int32 [N, seq_len]`` rows of Jane Austen chapters, documents in
  record order, each followed by ``eos_id`` (default ``tokenizer.eos_id``)."""
  return tokenize_to_sequences(corpus_texts(split, data_dir), tokenizer, seq_len,
                               eos_id=eos_id, max_sequences=max_sequences)

"""Caption metrics: CIDEr-D against reference captions, and caption-to-image retrieval by the
attributes a caption names.

CIDEr-D ("CIDEr: Consensus-based Image Description Evaluation", Vedantam et al., CVPR 2015,
in the form the COCO caption evaluation computes). For n = 1..4, a sentence becomes a vector
of its n-gram counts weighted by inverse document frequency, where an n-gram's document
frequency is the number of images whose reference set contains it:

    g_n(s)[w] = count_s(w) * (log |I| - log max(1, df(w)))

For candidate c and each reference r of its image, with l(.) the sentence's number of
bigrams (the COCO code's length) and sigma = 6:

    sim_n(c, r) = sum_w min(g_n(c)[w], g_n(r)[w]) g_n(r)[w] / (|g_n(c)| |g_n(r)|)
                  * exp(-(l(c) - l(r))^2 / (2 sigma^2))

CIDEr-D(c) = 10 * mean_r mean_n sim_n(c, r). The clipping (min) and the length penalty are
the "-D" that stops gaming by repetition and length. Sentences are lower-cased and split on
anything but letters, digits and hyphens (the COCO tokenizer needs Java; our captions have
no punctuation to disagree on). The document frequencies come from the references of the
images being scored, as in the COCO code.

Retrieval recall@1: each caption is parsed into the attribute values it names
(`models.datasets.fashion_captions.parse`); a gallery image scores (named values it has) -
(named values it contradicts); the caption's own image is retrieved if it has the top score,
and a tie among t images counts 1/t (the expected recall under random tie-breaking).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Callable, Mapping, Sequence

import numpy as np

SIGMA = 6.0
MAX_N = 4


def tokenize(sentence: str) -> list[str]:
  return re.findall(r"[a-z0-9-]+", sentence.lower())


def _ngrams(words: list[str]) -> collections.Counter:
  out = collections.Counter()
  for n in range(1, MAX_N + 1):
    for i in range(len(words) - n + 1):
      out[tuple(words[i:i + n])] += 1
  return out


def _vector(counts: collections.Counter, df: Mapping, log_images: float):
  """(per-order tf-idf dicts, per-order norms, length = number of bigrams)."""
  vec = [dict() for _ in range(MAX_N)]
  for gram, tf in counts.items():
    vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df.get(gram, 0.0))))
  norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
  length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
  return vec, norms, length


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
  """(corpus CIDEr-D, per-image scores [N]) of one candidate per image against its references."""
  if len(candidates) != len(references) or not candidates:
    raise ValueError("one candidate per image and at least one image")
  ref_counts = [[_ngrams(tokenize(r)) for r in refs] for refs in references]
  df = collections.Counter()
  for counts in ref_counts:
    df.update(set().union(*[set(c) for c in counts]))
  log_images = math.log(float(len(candidates)))
  scores = []
  for cand, counts in zip(candidates, ref_counts):
    c_vec, c_norm, c_len = _vector(_ngrams(tokenize(cand)), df, log_images)
    total = 0.0
    for rc in counts:
      r_vec, r_norm, r_len = _vector(rc, df, log_images)
      penalty = math.exp(-((c_len - r_len) ** 2) / (2 * SIGMA ** 2))
      sims = []
      for n in range(MAX_N):
        dot = sum(min(v, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0)
                  for g, v in c_vec[n].items())
        if c_norm[n] and r_norm[n]:
          dot /= c_norm[n] * r_norm[n]
        sims.append(dot * penalty)
      total += float(np.mean(sims))
    scores.append(10.0 * total / len(counts))
  scores = np.asarray(scores)
  return float(scores.mean()), scores


def retrieval_recall_at_1(captions: Sequence[str], attributes: Sequence[Mapping[str, str]],
                          parse: Callable[[str], Mapping[str, str]]) -> tuple[float, np.ndarray]:
  """(recall@1, per-caption credit [N]) of caption i retrieving image i among all N images
  (`attributes[j]`: image j's true attribute values), scored as in the module docstring."""
  if len(captions) != len(attributes):
    raise ValueError("one caption per gallery image")
  credit = []
  for i, text in enumerate(captions):
    named = parse(text)
    scores = np.asarray([sum(1 if a.get(k) == v else -1 for k, v in named.items())
                         for a in attributes])
    top = np.flatnonzero(scores == scores.max())
    credit.append(1.0 / len(top) if i in top else 0.0)
  credit = np.asarray(credit)
  return float(credit.mean()), credit

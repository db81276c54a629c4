"""Test helpers: run a flat, Hugging Face-named config (as the command line does) on any model;
per-row PRNG keys; a chi-square p-value; brute-force n-gram counts."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from decoding.cli import as_dict, settings_from_config
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.sampling import Sample
from decoding.strategy import Target

RUN_OPTIONS = ("seed", "batch_size", "max_cache_len")


def target(lm, params, eos_ids=(), pad_id=0, tokenizer=None, **kw) -> Target:
  return Target(lm, params, eos_ids=tuple(int(e) for e in eos_ids if int(e) >= 0),
                pad_id=int(pad_id), tokenizer=tokenizer, **kw)


def run_config(lm, params, prompts, cfg, eos_ids=(), pad_id=0, tokenizer=None, sha256=None,
               **kw):
  """`decoding.generate` with the settings a flat config maps to (`decoding.cli`); the config's
  seed, batch_size and max_cache_len are the run options."""
  flat = as_dict(cfg)
  options = {k: flat.pop(k) for k in RUN_OPTIONS if flat.get(k) is not None}
  return generate(target(lm, params, eos_ids, pad_id, tokenizer, sha256=sha256), prompts,
                  settings_from_config(flat), **{**options, **kw})


def processor_of(fields: dict, eos_ids, sampling: bool = False):
  """The processors a strategy builds from flat fields: the penalties, and with sampling the
  warpers (`Sample`'s chain); greedy strategies take the penalties only."""
  if sampling:
    return Sample(**fields).logits_processor(eos_ids)
  return Greedy(**fields).penalty_processors(eos_ids)


def row_keys(n: int, seed: int = 0):
  """[n, 2] keys fold_in(PRNGKey(seed), i), one per row."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))


def chi2_pvalue(obs, exp) -> float:
  """Pearson's chi-square p-value of counts `obs` against expected counts or probabilities
  `exp` (rescaled to the total of `obs`)."""
  exp = np.asarray(exp, np.float64) * obs.sum() / np.sum(exp)
  return float(stats.chi2.sf(np.sum((obs - exp) ** 2 / exp), len(obs) - 1))


def ngram_counts(docs, max_context):
  """{c: {context tuple: Counter(next token)}} counted per document, by brute force."""
  table = {c: collections.defaultdict(collections.Counter) for c in range(1, max_context + 1)}
  for d in docs:
    for c in range(1, max_context + 1):
      for i in range(len(d) - c):
        table[c][tuple(d[i:i + c])][d[i + c]] += 1
  return table

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


# ------------------------------------------------------------------- a tiny random Whisper

def tiny_whisper_config():
  from models import whisper
  return whisper.WhisperConfig(n_mels=8, d_model=16, encoder_heads=2, decoder_heads=2,
                               encoder_layers=2, decoder_layers=2, vocab_size=40,
                               audio_positions=1500, text_positions=64)


class TinyWhisperTokens:
  """The tokenizer surface the speech commands use, for a 40-token vocabulary: end of text
  35, start sequence (36, 37)."""
  eot = 35

  def start_sequence(self, language="en", task="transcribe"):
    return (36, 37)

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def tiny_whisper(seed: int = 0):
  """A random 2+2-layer Whisper (`models.speech.SpeechModel`) whose cross-attention output is
  scaled up, so that different audio gives different text."""
  from models import speech, whisper
  config = tiny_whisper_config()
  params = whisper.full_params(config, jax.random.PRNGKey(seed))
  for i in range(config.decoder_layers):
    out = params["decoder"][f"layers_{i}"]["cross_attn"]["out_proj"]
    out["kernel"] = out["kernel"] * 30.0
  return speech.SpeechModel(name="tiny-random", config=config, params=params,
                            tokenizer=TinyWhisperTokens(), suppress=(36, 37, 38, 39),
                            suppress_at_start=(35,), sha256="0" * 64)


def tone(seconds: float, seed: int = 0) -> np.ndarray:
  """A modulated tone plus noise at 16 kHz, its pitch set by `seed`."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * 16000)) / 16000
  return (0.3 * np.sin(2 * np.pi * (440 + 900 * seed) * t) * np.sin(2 * np.pi * 1.5 * t)
          + 0.02 * rng.normal(size=t.shape)).astype(np.float32)

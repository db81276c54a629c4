"""Test helpers: run a flat, Hugging Face-named config (as the command line does) on any model."""
from __future__ import annotations

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

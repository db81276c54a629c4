"""The command line's flat, Hugging Face-named config, mapped to settings objects once.

`python -m decoding.generate` and `python -m decoding.generate_images` read an ml_collections
config whose fields live at the top level (`--config.top_p=0.9`, as transformers users
expect). Fields the strategy does not set are None in the config files, so every default
lives in the strategy's settings type and a strategy behaves the same whichever config file
selected it. `settings_from_config` maps such a config to the chosen strategy's settings,
rejecting a field the strategy does not read (it names the strategies that do) and a field
no strategy has (it names the nearest valid one); the run fields (the model, the seed,
batching, ...) are the command's own. `parse_flags` turns flag errors into one line.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app, flags
from ml_collections import config_flags

from decoding import registry
from decoding.errors import GenerationError, nearest, unknown
from models.numerics import NUMERICS

# Fields of the commands themselves, not of a strategy.
TEXT_RUN_FIELDS = ("model", "numerics", "batch_invariant", "scan_layers",
                   "fused_projections", "matmul_kernel", "seed",
                   "batch_size", "max_cache_len", "chat_template", "system_prompt", "mesh")
IMAGE_RUN_FIELDS = ("model", "numerics", "classes", "per_class", "seed", "batch_size", "out_dir")
CAPTION_RUN_FIELDS = ("model", "numerics", "images", "output", "batch_size")
SPEECH_RUN_FIELDS = ("model", "language", "task", "suppress_tokens", "streaming", "seed",
                     "batch_size")
RUN_FIELDS = {"text": TEXT_RUN_FIELDS, "image": IMAGE_RUN_FIELDS, "caption": CAPTION_RUN_FIELDS,
              "speech": SPEECH_RUN_FIELDS}
# What to say when a Hugging Face habit does not apply to the chosen strategy.
HINTS = {"do_sample": " (for ancestral sampling use strategy='sample')"}
DEFAULT_STRATEGY = {"text": "greedy", "image": "ar", "caption": "guided_caption",
                    "speech": "greedy"}


def as_dict(cfg: Any) -> dict:
  return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def strategy_fields(modality: str) -> dict[str, list[str]]:
  """Every flat field a strategy of `modality` reads -> the strategies that read it."""
  users: dict[str, list[str]] = {}
  for name in registry.names(modality):
    for f in registry.STRATEGIES[name].settings.flat_fields():
      users.setdefault(f, []).append(name)
  return users


def settings_from_config(cfg: Mapping, modality: str = "text"):
  """The chosen strategy's settings object from a flat config (a ConfigDict or a mapping).

  `strategy` names the strategy (default: greedy / ar); run fields are skipped; None means
  "the strategy's default". Raises GenerationError for an unknown strategy, a field the
  strategy does not read and a misspelled field, before anything is loaded or compiled.
  """
  flat = as_dict(cfg)
  strategy = registry.get(flat.pop("strategy", None) or DEFAULT_STRATEGY[modality], modality)
  if "numerics" in flat and flat["numerics"] not in NUMERICS:
    raise unknown("numerics", flat["numerics"], NUMERICS)
  users = strategy_fields(modality)
  run = RUN_FIELDS[modality]
  mine = set(strategy.settings.flat_fields())
  fields = {}
  for key, value in flat.items():
    if key in run or value is None:
      continue
    if key not in users:
      raise GenerationError(f"unknown field {key!r}{nearest(key, list(users) + list(run))}")
    if key not in mine:
      raise GenerationError(f"{key} does not apply to strategy {strategy.name!r} (it is a "
                            f"field of {', '.join(users[key])}){HINTS.get(key, '')}")
    fields[key] = value
  return strategy.settings.from_flat(fields)


def check_config_fields(cfg: Mapping, modality: str = "text") -> None:
  """Every field of a config file is a run field or some strategy's (the config and the
  settings types agree)."""
  known = set(strategy_fields(modality)) | set(RUN_FIELDS[modality]) | {"strategy"}
  extra = sorted(set(as_dict(cfg)) - known)
  if extra:
    raise GenerationError(f"config fields no strategy reads: {', '.join(extra)}")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing with every error as one line on stderr (exit status 2); a
  misspelled `--config.NAME` names the nearest config field."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = _one_line(str(e))
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    message = _unknown_field(_one_line(str(e)))
  except (ValueError, TypeError) as e:  # an override that does not parse as the field's type
    message = _one_line(str(e))
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _one_line(text: str) -> str:
  """A flag error's message on one line (ml_collections puts its message in repr quotes)."""
  text = text.strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" and "\\n" in text:
    text = text[1:-1].replace("\\n", "\n").replace("\\'", "'")
  return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _unknown_field(text: str) -> str:
  """"'top_pp' Did you mean "top_p" instead of "top_pp"?" -> "unknown config field 'top_pp'
  (did you mean 'top_p'?)"."""
  found = re.match(r"""^'([^']+)'(?:.*?Did you mean "([^"]+)")?""", text.strip('"'))
  if not found:
    return text
  hint = f" (did you mean {found.group(2)!r}?)" if found.group(2) else ""
  return f"unknown config field {found.group(1)!r}{hint}"


def main_with_config(default_config: str, help_text: str, run: Callable[[Any], dict],
                     show: Callable[[dict], dict] = lambda summary: summary) -> None:
  """The `main` of a config-file command: defines `--config` (at call time, so importing a
  command never collides with another's flag), runs `run(config)`, prints `show(summary)`
  as JSON, and turns a bad setting or input into one line on stderr with exit status 2."""
  config = config_flags.DEFINE_config_file("config", default_config, help_text)

  def _main(argv):
    del argv
    try:
      summary = run(config.value)
    except (GenerationError, ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps(show(summary), indent=1))

  app.run(_main, flags_parser=parse_flags)

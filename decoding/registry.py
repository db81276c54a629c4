"""Every decoding strategy by name, text, image and speech alike: the one registry table.

A strategy is one module (its settings type and how it runs, `decoding.strategy.Strategy`)
plus one line below. `python -m decoding.generate`, `python -m decoding.generate_images`
and the Python API all look strategies up here, and a settings object names its strategy
(`strategy_of`), so `generate(model, prompts, Sample(top_p=0.9))` needs no name at all.
"""
from __future__ import annotations

from decoding import (adadec, beam_search, best_of_n, captioning, exact_extract, greedy,
                      image_strategies, momentum, sampling, scmoe, self_agreement, soft_thinking,
                      stream_beam, streaming, superposed)
from decoding.errors import GenerationError, unknown
from decoding.speculative import strategy as speculative
from decoding.strategy import Strategy

STRATEGIES: dict[str, Strategy] = {
    # text
    "greedy": greedy.STRATEGY,
    "sample": sampling.STRATEGY,
    "beam": beam_search.BEAM,
    "diverse_beam": beam_search.DIVERSE_BEAM,
    "momentum": momentum.STRATEGY,
    "superposed": superposed.STRATEGY,
    "best_of_n": best_of_n.STRATEGY,
    "self_agreement": self_agreement.STRATEGY,
    "speculative": speculative.STRATEGY,
    "soft_thinking": soft_thinking.STRATEGY,
    "exact_extract": exact_extract.STRATEGY,
    "adadec": adadec.STRATEGY,
    "scmoe": scmoe.STRATEGY,
    # images (class-conditional image tokens, `models.image_ar`)
    "ar": image_strategies.AR,
    "sjd": image_strategies.SJD,
    "eagle": image_strategies.EAGLE,
    # captions (image -> text, `models.captioner`)
    "guided_caption": captioning.STRATEGY,
    # speech (Whisper, `models.whisper`); greedy, sample and beam above transcribe too
    "stream_greedy": streaming.STRATEGY,
    "stream_beam": stream_beam.STRATEGY,
}

_BY_SETTINGS = {s.settings: s for s in STRATEGIES.values()}


def get(name: str, modality: str = "text") -> Strategy:
  """The strategy called `name`, which must decode `modality` (`decoding.strategy.MODALITIES`)."""
  if name not in STRATEGIES:
    raise unknown("strategy", name, names(modality))
  strategy = STRATEGIES[name]
  if not strategy.decodes(modality):
    cli = {"text": "decoding.generate", "image": "decoding.generate_images",
           "caption": "decoding.caption_images", "speech": "decoding.transcribe"
           }[strategy.modality]
    noun = {"text": "text", "image": "images", "caption": "captions", "speech": "transcripts"}
    raise GenerationError(f"strategy {name!r} generates {noun[strategy.modality]}, not "
                          f"{noun[modality]}: use python -m {cli} (strategies for "
                          f"{noun[modality]}: {', '.join(names(modality))})")
  return strategy


def names(modality: str) -> list[str]:
  return [n for n, s in STRATEGIES.items() if s.decodes(modality)]


def strategy_of(settings) -> Strategy:
  """The strategy a settings object belongs to."""
  if type(settings) not in _BY_SETTINGS:
    raise GenerationError(f"not the settings of a registered strategy: {settings!r}")
  return _BY_SETTINGS[type(settings)]

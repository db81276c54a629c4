"""The `speculative` strategy: a drafter by name, its settings, and the acceptance rule.

Greedy mode gives exactly the tokens of the `greedy` strategy with the same processors;
`do_sample=True` samples exactly the distribution of `sample` (lossless verification). The
LOSSY rules are opt-in: GAD++ (`gad_beta` > 1 and `gad_tau` > 0, greedy) and DistillSpec's
lenience (`lenience` < 1, sampling); see `decoding.speculative.acceptance`.

`DRAFTERS` names every drafter with its settings type; a drafter's settings build it
(`build(target, resources) -> (drafter, draft params)`), loading and checking whatever it
needs against the target before anything is compiled. A new drafter is one module (its
`Drafter` and settings) plus one line here.
"""
from __future__ import annotations

from typing import Any, Union

from decoding import processors
from decoding.errors import GenerationError, unknown
from decoding.settings import Penalties, Sampled, check_int, check_real, field_names, settings
from decoding.speculative.acceptance import Acceptance, GadPlus, Lenient, Strict
from decoding.speculative.dyspec import DySpec
from decoding.speculative.eagle import EagleDraft
from decoding.speculative.gad_drafter import GadDraft
from decoding.speculative.loop import speculative_decode
from decoding.speculative.model_drafter import ModelDraft, SelfDraft
from decoding.speculative.prompt_lookup import PromptLookup
from decoding.strategy import Strategy

DRAFTERS: dict[str, type] = {
    "self": SelfDraft,  # the target's first draft_layers layers + its head
    "model": ModelDraft,  # a separate draft model with the target's vocabulary
    "prompt_lookup": PromptLookup,  # copies from the prompt (IAD)
    "dyspec": DySpec,  # a DySpec tree from the self-draft or a draft model
    "eagle": EagleDraft,  # a trained EAGLE/FSPAD feature head, chain or EAGLE-2 tree
    "gad": GadDraft,  # a trained non-autoregressive block drafter (GAD)
}


def drafter_name(drafter_settings) -> str:
  return next(name for name, t in DRAFTERS.items() if isinstance(drafter_settings, t))


@settings
class Speculative(Penalties, Sampled):
  """Speculative decoding with `drafter` (a drafter's settings object, or its name for its
  default settings)."""
  drafter: Union[Any, str] = SelfDraft()
  gad_beta: int = 1  # GAD++ top-beta (LOSSY when > 1 with gad_tau > 0; greedy)
  gad_tau: float = 0.0  # GAD++ log-probability gap
  lenience: float = 1.0  # DistillSpec lenience epsilon (LOSSY when < 1; sampling)

  def __post_init__(self):
    if isinstance(self.drafter, str):
      if self.drafter not in DRAFTERS:
        raise unknown("drafter", self.drafter, DRAFTERS)
      object.__setattr__(self, "drafter", DRAFTERS[self.drafter]())
    super().__post_init__()

  def validate(self) -> None:
    super().validate()
    if not isinstance(self.drafter, tuple(DRAFTERS.values())):
      raise GenerationError(f"drafter must be the settings of one of {', '.join(DRAFTERS)}, got "
                            f"{self.drafter!r}")
    check_int("gad_beta", self.gad_beta, 1)
    check_real("gad_tau", self.gad_tau, 0.0)
    check_real("lenience", self.lenience, 0.0, 1.0, low_open=True)
    if self.lenience < 1 and self.gad_beta > 1 and self.gad_tau > 0:
      raise GenerationError("choose one relaxed acceptance rule: GAD++ (gad_beta, gad_tau) or "
                            "lenience")
    self.acceptance.check(self.do_sample, "chain")  # trees: checked with the drafter

  @classmethod
  def flat_fields(cls) -> tuple[str, ...]:
    drafter_fields = [f for t in DRAFTERS.values() for f in field_names(t)]
    return tuple(dict.fromkeys(field_names(cls) + tuple(drafter_fields)))

  @classmethod
  def from_flat(cls, fields: dict) -> "Speculative":
    """`drafter` is a name; the fields of that drafter's settings type go to it, and a field
    of another drafter is an error."""
    fields = dict(fields)
    name = fields.pop("drafter", "self")
    if name not in DRAFTERS:
      raise unknown("drafter", name, DRAFTERS)
    mine = field_names(DRAFTERS[name])
    drafter = DRAFTERS[name](**{k: fields.pop(k) for k in list(fields) if k in mine})
    for k in fields:
      if k not in field_names(cls):
        users = [n for n, t in DRAFTERS.items() if k in field_names(t)]
        raise GenerationError(f"{k} does not apply to drafter {name!r} (it is a field of "
                              f"drafter {', '.join(users)})")
    return cls(drafter=drafter, **fields)

  def to_flat(self) -> dict:
    out = {k: v for k, v in super().to_flat().items() if k != "drafter"}
    return {"drafter": drafter_name(self.drafter), **self.drafter.to_flat(), **out}

  @property
  def acceptance(self) -> Acceptance:
    """The acceptance rule these settings ask for (`Strict()` unless a LOSSY one is set)."""
    if self.gad_beta > 1 and self.gad_tau > 0:
      return GadPlus(beta=int(self.gad_beta), tau=float(self.gad_tau))
    if self.lenience < 1:
      return Lenient(epsilon=float(self.lenience))
    return Strict()

  def logits_processor(self, eos_ids) -> processors.Chain:
    if not self.do_sample:
      return self.penalty_processors(eos_ids)
    return processors.chain(self.penalty_processors(eos_ids), self.warper_processors())


def prepare(s: Speculative, target, resources):
  drafter, dparams = s.drafter.build(target, resources)
  acceptance = s.acceptance
  acceptance.check(s.do_sample, drafter.kind)
  proc = s.logits_processor(target.eos_ids)

  def run(batch):
    return speculative_decode(target.lm, target.params, drafter, dparams, batch.prompts,
                              batch.prompt_len, batch.row_keys, target.eos_array, processor=proc,
                              sample=s.do_sample, pad_id=target.pad_id,
                              max_new_tokens=s.max_new_tokens, cache_len=batch.cache_len,
                              acceptance=acceptance)
  return run


STRATEGY = Strategy("speculative", Speculative, "speculative decoding with a drafter: "
                    "greedy mode gives exactly greedy's tokens, do_sample=True samples "
                    "exactly the sampling distribution", prepare=prepare,
                    greedy_equivalent=lambda s: not s.do_sample and s.acceptance.lossless)

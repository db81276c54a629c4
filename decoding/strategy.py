"""What a strategy is: the protocol every entry of the registry table (`decoding.registry`) follows.

A strategy owns a settings type (`decoding.settings`) and one of two ways to run:

* an array strategy gives `prepare(settings, target, resources) -> run`, done once per
  request: it builds its logits processors, loads what it needs (a draft model, a head,
  n-gram tables; through `resources`) and checks it against the target, raising
  `GenerationError` before anything is compiled. `run(batch) -> DecodeResult` is then the
  jitted computation on one bucketed batch (`Batch`);
* a pipeline strategy (several decoding stages with host work in between, such as best-of-N
  with answer extraction, or self-agreement) gives `pipeline(settings, target, prompts,
  generate) -> list[Generation]`, where `generate(prompts, settings)` runs another
  strategy with the request's seed, row ids, batching and resources.

`Target` is the model a text strategy decodes with; image strategies take the image model
(`models.image_ar.ImageModel`) instead. `Resources` holds loaded artifacts across calls: the
caller creates one and passes it explicitly (the command line keeps one per run), so
nothing is cached in module state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp

from decoding.records import DecodeResult

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Target:
  """The model a text strategy decodes with, and what identifies it."""
  lm: Any  # the `TransformerLM` boundary (or a fake with the same call)
  params: Any
  eos_ids: tuple[int, ...] = ()  # token ids (no padding)
  pad_id: int = 0
  tokenizer: Any = None  # needed by strategies that work on text
  name: Optional[str] = None  # registered name or path of the checkpoint, if known
  sha256: Optional[str] = None  # checksum of its weights, if known (drafters check it)

  @classmethod
  def of(cls, model) -> "Target":
    """The target of a loaded model (`models.lm.LoadedModel`): its tokenizer's EOS id, its pad
    id (EOS when it has none, else 0), its name and checksum."""
    tok = model.tokenizer
    eos = (tok.eos_id,) if tok is not None and tok.eos_id is not None else ()
    pad = tok.pad_id if tok is not None and tok.pad_id is not None else (eos[0] if eos else 0)
    return cls(lm=model.lm, params=model.params, eos_ids=eos, pad_id=int(pad), tokenizer=tok,
               name=model.name, sha256=model.sha256)

  @property
  def eos_array(self) -> Array:
    """[E] int32 EOS ids for the loops, [-1] (matches nothing) when there is none."""
    return jnp.asarray(list(self.eos_ids) or [-1], jnp.int32)


@dataclasses.dataclass(frozen=True)
class Batch:
  """One bucketed batch: prompts [B, P] right-padded, prompt_len [B] (>= 1), row_keys
  [B * R, 2] (R rows per prompt, see `Strategy.rows_per_prompt`), the KV-cache length and
  the prompt tokens every row starts with, to prefill once (0: none; only strategies with
  `Strategy.shares_prefix` get a nonzero one, see `decoding.prefill.shared_prefix_len`)."""
  prompts: Array
  prompt_len: Array
  row_keys: Array
  cache_len: int
  shared_len: int = 0


class Resources:
  """Artifacts loaded for decoding (draft models, heads, n-gram tables), kept by key.

  Keys are values (names, dtypes, target checksums), never object identities. An entry
  may hold objects the loaded value depends on (`depends_on`): it is only reused while
  they are the very same objects (e.g. a draft that shares the target's embedding arrays).
  """

  def __init__(self):
    self._items: dict = {}

  def get(self, key: Hashable, load: Callable[[], Any], depends_on: Sequence[Any] = ()) -> Any:
    hit = self._items.get(key)
    if hit is not None and len(hit[0]) == len(depends_on) and all(
        a is b for a, b in zip(hit[0], depends_on)):
      return hit[1]
    value = load()
    self._items[key] = (tuple(depends_on), value)
    return value

  def clear(self) -> None:
    self._items.clear()


Run = Callable[[Batch], DecodeResult]
MODALITIES = ("text", "image", "caption", "speech")


def one_row(settings) -> int:
  return 1


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A named decoding strategy (see the module docstring)."""
  name: str
  settings: type  # its settings type; a settings object names its strategy
  summary: str  # one line: what it does
  modality: str = "text"  # "text" | "image" | "caption" (image -> text) | "speech"
  prepare: Optional[Callable[..., Run]] = None  # array strategies
  pipeline: Optional[Callable[..., list]] = None  # pipeline strategies
  # Rows decoded per prompt from one prefill (sampling with num_return_sequences > 1); the
  # result then has B * R rows, prompt b's in rows b*R .. b*R+R-1.
  rows_per_prompt: Callable[[Any], int] = one_row
  needs_tokenizer: bool = False
  # What `Generation.score` holds: "log_likelihood" (sum of the raw model's token
  # log-probs), "beam_score" (the length-penalized search score), "draft_score" (superposed
  # decoding's smoothed draft score).
  score_kind: str = "log_likelihood"
  # Whether the output is greedy decoding's for the settings (its G-NLL is then reported).
  greedy_equivalent: Callable[[Any], bool] = lambda s: False
  postprocess: Optional[Callable[[list], None]] = None  # adds extras to the Generations
  # Pipeline strategies whose input is not a token-id prompt (exact-extract: passage and
  # question): check_inputs(inputs) -> inputs raises GenerationError for bad ones and
  # replaces `generate`'s prompt validation; the pipeline receives them as given.
  check_inputs: Optional[Callable[[Sequence[Any]], list]] = None
  # Whether it can prefill a prompt prefix common to a batch once (`generate(...,
  # share_prefix=True)`): array strategies through `Batch.shared_len`, pipelines through
  # the `share_prefix` option of their stage.
  shares_prefix: bool = False
  # Whether it also transcribes speech: a text strategy that reads the model only through
  # the decoder boundary runs unchanged on Whisper's decoder (`decoding.transcribe`).
  speech: bool = False

  def decodes(self, modality: str) -> bool:
    return self.modality == modality or (modality == "speech" and self.speech)

  def __post_init__(self):
    if (self.prepare is None) == (self.pipeline is None):
      raise ValueError(f"strategy {self.name!r}: give exactly one of prepare or pipeline")
    if self.modality not in MODALITIES:
      raise ValueError(f"strategy {self.name!r}: unknown modality {self.modality!r}")
    if self.check_inputs is not None and self.pipeline is None:
      raise ValueError(f"strategy {self.name!r}: check_inputs needs a pipeline")

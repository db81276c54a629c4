"""decodax decoding: every strategy, one call.

  from models.lm import load_model
  from decoding import Sample
    m = load_model()
  ids = m.tokenizer.encode_chat([{"role": "user", "content": "Hi!"}])
  out = generate(m, [ids], Sample(max_new_tokens=32, top_p=0.9), seed=0)

A settings object names its strategy (`decoding.registry.STRATEGIES`); images go through
`decoding.image_strategies.generate_images` with `ImageAR`, `ImageSJD` or `ImageEagle`.
`decoding.eval_runner.evaluate` runs a strategy over a dataset (resumable, sharded over devices
and processes, streamed to JSONL). (`decoding.generate`, `decoding.generate_images` and
`decoding.evaluate` are the command-line modules.)
"""
from decoding.adadec import AdaDec
from decoding.beam_search import Beam, DiverseBeam
from decoding.best_of_n import BestOfN
from decoding.errors import GenerationError
from decoding.exact_extract import ExactExtract
from decoding.greedy import Greedy
from decoding.image_strategies import ImageAR, ImageEagle, ImageSJD
from decoding.momentum import Momentum
from decoding.registry import STRATEGIES, strategy_of
from decoding.results import Generation
from decoding.sampling import Sample
from decoding.scmoe import SCMoE
from decoding.self_agreement import SelfAgreement
from decoding.soft_thinking import SoftThinking
from decoding.speculative.dyspec import DySpec
from decoding.speculative.eagle import EagleDraft
from decoding.speculative.gad_drafter import GadDraft
from decoding.speculative.model_drafter import ModelDraft, SelfDraft
from decoding.speculative.prompt_lookup import PromptLookup
from decoding.speculative.strategy import Speculative
from decoding.strategy import Resources, Target
from decoding.superposed import Superposed

__all__ = ["AdaDec", "Beam", "BestOfN", "DiverseBeam", "DySpec", "EagleDraft", "ExactExtract",
           "GadDraft", "Generation",
           "GenerationError", "Greedy", "ImageAR", "ImageEagle", "ImageSJD", "ModelDraft",
           "Momentum", "PromptLookup", "Resources", "SCMoE", "STRATEGIES", "Sample", "SelfAgreement",
           "SelfDraft", "SoftThinking", "Speculative", "Superposed", "Target", "strategy_of"]

"""Beam search (decoding/beam_search.py) for `python -m decoding.generate --config=configs/beam.py`.

  python -m decoding.generate --config=configs/beam.py --prompt="Translate to French: cat"
  python -m decoding.generate --config=configs/beam.py --config.num_return_sequences=4

Hugging Face GenerationConfig names and semantics. The defaults live in `Beam`
(decoding/beam_search.py): num_beams = 4 (HF's own default is 1, which is greedy decoding),
num_return_sequences = 1, length_penalty = 1.0 and early_stopping = False (HF's defaults).
`--config.do_sample=True` turns it into HF's beam sampling, with the sampling warpers
(temperature, top_k, top_p, min_p) applied to the log-probs.
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "beam"
  return c

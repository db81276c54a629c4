"""Beam search (decoding/beam.py) for `python -m decoding.generate --config=configs/beam.py`.

  python -m decoding.generate --config=configs/beam.py --prompt="Translate to French: cat"
  python -m decoding.generate --config=configs/beam.py --config.num_return_sequences=4

Hugging Face GenerationConfig names and semantics. num_beams = 4 is the usual small beam
(HF's own default is 1, which is greedy decoding); length_penalty = 1.0 and
early_stopping = False are HF's defaults. `do_sample=True` turns it into HF's beam
sampling, with the sampling warpers (temperature, top_k, top_p, min_p) applied to the
log-probs.
"""

from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "beam"
  c.num_beams = 4
  c.num_return_sequences = 1  # <= num_beams, best first
  c.length_penalty = 1.0  # finished score = sum of log-probs / generated_length ** length_penalty
  c.early_stopping = False  # True | False | "never" (HF's values and default)
  c.do_sample = False  # True: beam sampling
  return c

"""Diverse beam search (card 18; "Diverse Beam Search: Decoding Diverse Solutions from
Neural Sequence Models", Vijayakumar et al., AAAI 2018) for
`python -m decoding.generate --config=configs/diverse_beam.py --prompt=...`.

num_beam_groups = G groups of num_beams / G beams; each group's log-probs are lowered by
diversity_penalty (lambda) for every beam of an earlier group that chose the same token at
this step (Hamming diversity). lambda = 0.5 is the reference code's default. G = 3 groups
of 2 beams is our choice of a small budget (the reference code's default is B = 2, G = 2,
its README example B = 10, G = 5; the paper's best G is not confirmed). All 6 hypotheses
are returned, best first, so the groups' different answers are visible.
"""

from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "diverse_beam"
  c.num_beams = 6
  c.num_beam_groups = 3
  c.diversity_penalty = 0.5
  c.num_return_sequences = 6  # <= num_beams
  c.length_penalty = 1.0  # HF's default
  c.early_stopping = False  # True | False | "never" (HF's values and default)
  c.do_sample = False  # diverse beam search does not sample
  return c

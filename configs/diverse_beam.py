"""Diverse beam search ("Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence
Models", Vijayakumar et al., AAAI 2018) for
`python -m decoding.generate --config=configs/diverse_beam.py --prompt=...`.

num_beam_groups = G groups of num_beams / G beams; each group's log-probs are lowered by
diversity_penalty (lambda) for every beam of an earlier group that chose the same token at
this step (Hamming diversity). The defaults live in `DiverseBeam` (decoding/beam_search.py):
lambda = 0.5 (the reference code's default), G = 3 groups of 2 beams (our choice of a small
budget), all 6 hypotheses returned best first so the groups' different answers are visible.
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "diverse_beam"
  return c

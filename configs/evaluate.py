"""Evaluation config for `python -m decoding.evaluate --config=configs/evaluate.py`.

Everything of configs/generate.py (the model, the strategy and its fields, seed, batch_size,
the device mesh) plus what to evaluate, where the results go and the processes of a
multi-process run:

  python -m decoding.evaluate --config=configs/evaluate.py --config.output=arith.jsonl
  python -m decoding.evaluate --config=configs/evaluate.py --config.dataset=prompts.jsonl \
      --config.output=out.jsonl --config.strategy=sample --config.mesh.data=8
"""
import ml_collections

from configs import generate


def get_config() -> ml_collections.ConfigDict:
  c = generate.get_config()
  # "arithmetic" (models/datasets/arithmetic.py word problems) or a JSONL file of
  # {"prompt": str} / {"prompt_ids": [int]} lines, each with an optional integer "id"
  c.dataset = "arithmetic"
  c.dataset_seed = 0  # arithmetic: the problems' seed
  c.limit = 0  # the first `limit` rows (0: the whole file; arithmetic: 64 problems)
  c.output = ""  # the JSONL results (required); a rerun resumes it
  c.progress = True  # a progress bar on stderr
  # prefill the prompt tokens a batch's rows all start with (few-shot examples) once per
  # batch: greedy, sample and exact_extract; the same function, not bit-identical floats
  c.share_prefix = False
  # Several processes (jax.distributed): coordinator "" = one process; "auto" = detected
  # (TPU pod slices, SLURM); "host:port" = process `process_id` of `num_processes`, process 0
  # serving at that address. Each process runs its share of the rows on its own devices.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator = ""
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.cpu_collectives = "gloo"  # how CPU devices of different processes talk
  return c

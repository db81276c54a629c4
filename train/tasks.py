"""Training tasks, chosen by name from the config (`config.task`).

A task turns (config, model) into what the trainer needs: the loss, the batch source,
evaluation batches, the number of steps in an epoch, and `report(params) -> dict`, the
task's own measurement run before and after training (e.g. hyperfitting's perplexity,
entropy, TTR and copying; DITTO's self-reinforcement curve).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from train import data as data_lib
from train import losses


@dataclasses.dataclass
class Task:
  loss_fn: Callable
  train_data: Any  # .batch(step)
  eval_batches: list
  steps_per_epoch: int
  report: Optional[Callable[[Any], dict]] = None
  train_sequences: Optional[np.ndarray] = None


def synthetic_sequences(num: int, seq_len: int, vocab: int, seed: int) -> np.ndarray:
  """Token rows from a fixed random sparse bigram chain (each token has 3 successors).

  A learnable, deterministic corpus for tiny-model runs and tests: the next-token entropy
  of the source is log(3), so a model can fit it well but not perfectly until it
  memorizes the rows.
  """
  rng = np.random.default_rng([seed, 7])
  succ = rng.integers(0, vocab, (vocab, 3))
  rows = np.empty((num, seq_len), np.int32)
  rows[:, 0] = rng.integers(0, vocab, num)
  for t in range(1, seq_len):
    rows[:, t] = succ[rows[:, t - 1], rng.integers(0, 3, num)]
  return rows


def text_sequences(dcfg: Any, tokenizer, split: str, num: int, seed: int) -> np.ndarray:
  """`num` fixed-length rows (seq_len tokens) of the text corpus split, tokenized and packed."""
  if dcfg.source == "synthetic":
    vocab = int(dcfg.get("vocab_size", 0)) or 32
    salt = {"train": 0, "validation": 1, "test": 2}.get(split, 3)
    return synthetic_sequences(num, dcfg.seq_len, vocab, seed * 10 + salt)
  if dcfg.source != "text_corpus":
    raise ValueError(f"unknown data.source {dcfg.source!r}; choose 'text_corpus' or 'synthetic'")
  if tokenizer is None:
    raise ValueError("data.source='text_corpus' needs a model with a tokenizer")
  from train import text_data
  rows = text_data.load_text_sequences(split, tokenizer, dcfg.seq_len,
                                       max_sequences=int(dcfg.get("skip", 0)) + num,
                                       data_dir=dcfg.get("data_dir") or None)
  rows = rows[int(dcfg.get("skip", 0)):]
  if len(rows) < num:
    raise ValueError(f"the {split!r} split yields only {len(rows)} sequences of "
                     f"{dcfg.seq_len} tokens, {num} requested")
  return np.asarray(rows[:num], np.int32)


def lm_task(config: Any, model) -> Task:
  """Next-token (maximum likelihood) fine-tuning on fixed-length sequences; with
  `config.evaluate.enabled` it reports hyperfitting's before/after metrics."""
  dcfg = config.data
  if dcfg.source == "synthetic":
    dcfg.vocab_size = model.config.vocab_size
  train = text_sequences(dcfg, model.tokenizer, dcfg.split, dcfg.num_train, config.seed)
  heldout = text_sequences(dcfg, model.tokenizer, dcfg.eval_split, dcfg.num_eval, config.seed)
  source = data_lib.ArrayData({"tokens": train}, config.batch_size, seed=config.seed)
  report = None
  if config.evaluate.get("enabled", False):
    from train import evaluation
    ecfg = config.evaluate

    def report(params):
      return evaluation.evaluate_lm(
          model.lm, params, heldout, train, context_len=ecfg.context_len,
          gen_len=ecfg.gen_len, num_generations=ecfg.num_generations,
          batch_size=ecfg.get("batch_size", 8))
  return Task(loss_fn=losses.next_token_loss(model.config), train_data=source,
              eval_batches=data_lib.eval_batches({"tokens": heldout}, config.eval_batch_size),
              steps_per_epoch=source.batches_per_epoch, report=report, train_sequences=train)


TASKS: dict[str, Callable[[Any, Any], Task]] = {"lm": lm_task}


def register(name: str, builder: Callable[[Any, Any], Task]) -> None:
  TASKS[name] = builder


def build(config: Any, model) -> Task:
  if config.task not in TASKS:
    raise ValueError(f"unknown task {config.task!r}; choose from {sorted(TASKS)}")
  return TASKS[config.task](config, model)

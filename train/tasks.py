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

from models.datasets import corpus_texts
from train import data as data_lib, ditto, evaluation, losses, text_data


@dataclasses.dataclass
class Task:
  loss_fn: Callable
  train_data: Any  # .batch(step)
  eval_batches: list
  steps_per_epoch: int
  report: Optional[Callable[[Any], dict]] = None
  train_sequences: Optional[np.ndarray] = None
  eval_loss_fn: Optional[Callable] = None  # default: loss_fn


def synthetic_sequences(num: int, seq_len: int, vocab: int, seed: int,
                        chain_seed: int = 0) -> np.ndarray:
  """Token rows sampled (with `seed`) from a fixed random sparse bigram chain (`chain_seed`;
  each token has 3 equally likely successors).

  A learnable, deterministic corpus for tiny-model runs and tests: the next-token entropy
  of the source is log(3), so a model can fit it well but not perfectly until it
  memorizes the rows. Different `seed`s give train and held-out rows of the same source.
  """
  succ = np.random.default_rng([chain_seed, 7]).integers(0, vocab, (vocab, 3))
  rng = np.random.default_rng([seed, 11])
  rows = np.empty((num, seq_len), np.int32)
  rows[:, 0] = rng.integers(0, vocab, num)
  for t in range(1, seq_len):
    rows[:, t] = succ[rows[:, t - 1], rng.integers(0, 3, num)]
  return rows


def document_separator(tokenizer) -> int:
  """The id packed between documents: the pretraining end-of-text token when the vocabulary
  has one (`<|endoftext|>`, `</s>`), else the tokenizer's EOS. Instruct models' EOS is the
  end-of-turn token (`<|im_end|>` for SmolLM2), which should not be taught inside prose."""
  for text in ("<|endoftext|>", "</s>"):
    tid = tokenizer.token_to_id(text) if hasattr(tokenizer, "token_to_id") else None
    if tid is not None:
      return int(tid)
  return int(tokenizer.eos_id)


def text_sequences(dcfg: Any, tokenizer, split: str, num: int, seed: int) -> np.ndarray:
  """`num` fixed-length rows (seq_len tokens) of the text corpus split, tokenized and packed."""
  if dcfg.source == "synthetic":
    vocab = int(dcfg.get("vocab_size", 0)) or 32
    salt = {"train": 0, "validation": 1, "test": 2}.get(split, 3)
    return synthetic_sequences(num, dcfg.seq_len, vocab, seed * 10 + salt, chain_seed=seed)
  if dcfg.source != "text_corpus":
    raise ValueError(f"unknown data.source {dcfg.source!r}; choose 'text_corpus' or 'synthetic'")
  if tokenizer is None:
    raise ValueError("data.source='text_corpus' needs a model with a tokenizer")
  rows = text_data.load_text_sequences(split, tokenizer, dcfg.seq_len,
                                       max_sequences=int(dcfg.get("skip", 0)) + num,
                                       data_dir=dcfg.get("data_dir") or None,
                                       eos_id=document_separator(tokenizer))
  rows = rows[int(dcfg.get("skip", 0)):]
  if len(rows) < num:
    raise ValueError(f"the {split!r} split yields only {len(rows)} sequences of "
                     f"{dcfg.seq_len} tokens, {num} requested")
  return np.asarray(rows[:num], np.int32)


def _eos(model):
  """EOS id banned in evaluation continuations (every one has exactly gen_len tokens)."""
  return None if model.tokenizer is None else model.tokenizer.eos_id


def lm_task(config: Any, model) -> Task:
  """Next-token (maximum likelihood) fine-tuning on fixed-length sequences; with
  `config.evaluate.enabled` it reports hyperfitting's before/after metrics."""
  dcfg = config.data
  if dcfg.source == "synthetic" and not dcfg.get("vocab_size", 0):
    dcfg.vocab_size = model.config.vocab_size
  if dcfg.get("vocab_size", 0) > model.config.vocab_size:
    raise ValueError(f"data.vocab_size={dcfg.vocab_size} exceeds the model's vocabulary "
                     f"({model.config.vocab_size})")
  train = text_sequences(dcfg, model.tokenizer, dcfg.split, dcfg.num_train, config.seed)
  heldout = text_sequences(dcfg, model.tokenizer, dcfg.eval_split, dcfg.num_eval, config.seed)
  source = data_lib.ArrayData({"tokens": train}, config.batch_size, seed=config.seed)
  ecfg = config.evaluate

  def report(params):
    return evaluation.evaluate_lm(
        model.lm, params, heldout, train, context_len=ecfg.context_len,
        gen_len=ecfg.gen_len, num_generations=ecfg.num_generations,
        batch_size=ecfg.get("batch_size", 8), eos_id=_eos(model))

  return Task(loss_fn=losses.next_token_loss(model.config), train_data=source,
              eval_batches=data_lib.eval_batches({"tokens": heldout}, config.eval_batch_size),
              steps_per_epoch=source.batches_per_epoch,
              report=report if ecfg.get("enabled", False) else None, train_sequences=train)


TASKS: dict[str, Callable[[Any, Any], Task]] = {"lm": lm_task}


def register(name: str, builder: Callable[[Any, Any], Task]) -> None:
  TASKS[name] = builder


def build(config: Any, model) -> Task:
  if config.task not in TASKS:
    raise ValueError(f"unknown task {config.task!r}; choose from {sorted(TASKS)}")
  return TASKS[config.task](config, model)


def repetition_probe(docs: list, end_table: np.ndarray, num: int, seed: int, min_len: int = 8,
                     max_len: int = 40) -> tuple[list, list]:
  """`num` (sentence, previous sentence) pairs drawn deterministically from tokenized
  documents, for the self-reinforcement curve."""
  rng = np.random.default_rng([seed, 23])
  pairs = []
  for doc in docs:
    spans = ditto.split_sentences(doc, end_table)
    for i in range(1, len(spans)):
      (ps, pe), (s, e) = spans[i - 1], spans[i]
      if min_len <= e - s <= max_len and 1 <= pe - ps <= max_len:
        pairs.append((list(doc[s:e]), list(doc[ps:pe])))
  if len(pairs) < num:
    raise ValueError(f"only {len(pairs)} usable sentences for the repetition probe, {num} needed")
  chosen = rng.choice(len(pairs), num, replace=False)
  return [pairs[i][0] for i in chosen], [pairs[i][1] for i in chosen]


def ditto_task(config: Any, model) -> Task:
  """DITTO ("Learning to Break the Loop", Xu et al., NeurIPS 2022): each update is, with
  probability `config.ditto.rate`, the sentence-repetition penalty on pseudo-repetitive
  rows built from corpus sentences, else maximum likelihood on packed corpus rows.

  The report: the self-reinforcement curve (mean probability of a sentence's tokens in
  copies 1..10), the sentence-repetition rate and rep-n of greedy continuations of held-out
  contexts, and held-out perplexity (DITTO should not hurt it much).
  """
  dcfg, tcfg = config.data, config.ditto
  if model.tokenizer is None:
    raise ValueError("the ditto task needs a model with a tokenizer (sentence boundaries)")
  tok = model.tokenizer
  end_table = ditto.sentence_end_ids(tok, model.config.vocab_size)
  encode = lambda texts: [tok.encode(t, add_special_tokens=False) for t in texts]
  data_dir = dcfg.get("data_dir") or None
  train_docs = encode(corpus_texts(dcfg.split, data_dir))
  heldout_docs = encode(corpus_texts(dcfg.eval_split, data_dir))
  mle_rows = text_sequences(dcfg, tok, dcfg.split, dcfg.num_train, config.seed)
  heldout = text_sequences(dcfg, tok, dcfg.eval_split, dcfg.num_eval, config.seed)
  mle = data_lib.ArrayData({"tokens": mle_rows}, config.batch_size, seed=config.seed)
  sampler = ditto.RepetitionSampler(train_docs, end_table, dcfg.seq_len)
  rep = data_lib.FunctionData(lambda step, rng: sampler.batch(rng, config.batch_size),
                              seed=config.seed)
  loss_fn = ditto.ditto_mle_mixture(model.config, tcfg.gamma, tcfg.variant, tcfg.rate)
  sentences, prefixes = repetition_probe(heldout_docs, end_table, tcfg.probe_sentences,
                                         config.seed)
  ecfg = config.evaluate
  contexts = heldout[:ecfg.num_generations, :ecfg.context_len]

  def report(params):
    curve = ditto.self_reinforcement_curve(model.lm, params, sentences, prefixes,
                                           num_copies=tcfg.num_copies)
    gens = evaluation.greedy_continuations(model.lm, params, contexts, ecfg.gen_len,
                                           batch_size=ecfg.get("batch_size", 8),
                                           eos_id=_eos(model))
    ppl = evaluation.perplexity_and_entropy(model.lm, params, heldout,
                                            batch_size=config.eval_batch_size)
    return {"self_reinforcement": [float(x) for x in curve],
            "sentence_repetition": ditto.sentence_repetition_rate(gens, end_table),
            "rep_2": evaluation.ngram_repetition(gens, 2),
            "rep_4": evaluation.ngram_repetition(gens, 4), **ppl}

  return Task(loss_fn=loss_fn, train_data=data_lib.MixedData({"mle": mle, "ditto": rep}),
              eval_batches=data_lib.eval_batches({"tokens": heldout}, config.eval_batch_size),
              steps_per_epoch=mle.batches_per_epoch,
              report=report if config.evaluate.get("enabled", False) else None,
              train_sequences=mle_rows,
              eval_loss_fn=losses.next_token_loss(model.config))


TASKS["ditto"] = ditto_task

"""Best-of-N selection and self-agreement: strategies that sample several answers and pick one.

Best-of-N (`best_of_n`): sample N responses per prompt (one batched decode: the prompt is
repeated N times and sample r uses the row's key folded with r, so the first N samples
do not depend on N), then pick one by

* `self_certainty`: the response with the largest self-certainty, from "Scalable Best-of-N
  Selection for Large Language Models via Self-Certainty" (Kang, Zhao, Song):
  SC(y) = (1/n) sum_t KL(U || p_t), computed from the full fp32 distributions seen while
  decoding (the same numbers teacher-forced re-scoring gives, see decoding/scoring.py);
* `likelihood` / `mean_likelihood`: the largest sum / mean of log p(y_t), the G-NLL-style
  sequence likelihood of "Rethinking Uncertainty Estimation in Natural Language Generation";
* `borda`: Borda voting over extracted answers (same self-certainty paper): responses are
  ranked by SC (r = 1 best) and each gives (N - r + 1)^p votes to its extracted answer;
  responses without an answer give none; the answer with most votes wins (ties: the one
  whose best response ranks higher), and the highest-SC response with that answer is
  returned. p = 0 is majority vote (`majority`), which is self-consistency.

Answer extraction is pluggable: a function text -> answer string or None, chosen by name
from `ANSWER_EXTRACTORS` (register your own with `register_answer_extractor`) or passed
directly to the Python functions.

Self-agreement (`self_agreement`), from "Ask One More Time: Self-Agreement Improves
Reasoning of Language Models in (Almost) All Scenarios" (Lin et al.): sample m reasoning
paths, build one prompt holding the question and all m paths with an instruction to give
the answer most of them agree on, and ask the same model once more (greedy). No answer
parsing is needed for the final answer; the paper's exact prompt is not public, so the
template is ours (`DEFAULT_AGREEMENT_TEMPLATE`, configurable with `agreement_template`,
fields `{question}`, `{num_paths}` and `{paths}`; each path is rendered with
`agreement_path_template`, fields `{i}` (1-based) and `{path}`).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np

from decoding import generation
from decoding.generation import Generation, GenerationError, Strategy, _get

AnswerExtractor = Callable[[str], Optional[str]]

SELECTIONS = ("self_certainty", "likelihood", "mean_likelihood", "borda", "majority")

DEFAULT_AGREEMENT_TEMPLATE = (
    "{question}\n\n"
    "Here are {num_paths} candidate solutions to this question:\n\n"
    "{paths}\n\n"
    "Read all the candidate solutions. Which final answer do most of them agree on? "
    "Reply with that answer.")
DEFAULT_PATH_TEMPLATE = "Solution {i}: {path}"


# ----------------------------------------------------------------------- answer extraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(s: str) -> str:
  """'1,200.0' -> '1200'; '-3.50' -> '-3.5'."""
  s = s.replace(",", "")
  if "." in s:
    s = s.rstrip("0").rstrip(".")
  return "0" if s in ("-0", "") else s


def last_number(text: str) -> Optional[str]:
  """The last number in the text, normalized (commas dropped, trailing .0 removed)."""
  found = _NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


def boxed(text: str) -> Optional[str]:
  """The content of the last \\boxed{...} (nested braces allowed), stripped."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, i = 0, start + len("\\boxed")
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i + 1:j].strip()
  return None


def first_line(text: str) -> Optional[str]:
  line = text.strip().split("\n", 1)[0].strip()
  return line or None


ANSWER_EXTRACTORS: dict[str, AnswerExtractor] = {
    "last_number": last_number, "boxed": boxed, "first_line": first_line}


def register_answer_extractor(name: str, fn: AnswerExtractor) -> None:
  ANSWER_EXTRACTORS[name] = fn


def get_extractor(name_or_fn) -> AnswerExtractor:
  if callable(name_or_fn):
    return name_or_fn
  if name_or_fn not in ANSWER_EXTRACTORS:
    raise GenerationError(f"unknown answer_extractor {name_or_fn!r}; available: "
                          f"{sorted(ANSWER_EXTRACTORS)} (or register one)")
  return ANSWER_EXTRACTORS[name_or_fn]


# ------------------------------------------------------------------------------ selection


def rank_by(values: Sequence[float]) -> np.ndarray:
  """Order of responses by decreasing value (ties: lower index first; nan last)."""
  v = np.asarray(values, np.float64)
  v = np.where(np.isnan(v), -np.inf, v)
  return np.argsort(-v, kind="stable")


def borda_votes(answers: Sequence[Optional[str]], certainty: Sequence[float],
                power: float) -> dict[str, float]:
  """Votes per distinct answer: the response of rank r (1 = most certain) gives (N-r+1)^p."""
  n = len(answers)
  votes: dict[str, float] = {}
  for r, i in enumerate(rank_by(certainty), start=1):
    if answers[i] is not None:
      votes[answers[i]] = votes.get(answers[i], 0.0) + float((n - r + 1) ** power)
  return votes


def select(candidates: Sequence[Generation], selection: str, answers=None,
           borda_power: float = 0.5) -> tuple[int, dict]:
  """Index of the chosen candidate, and a JSON-able record of how it was chosen."""
  if selection not in SELECTIONS:
    raise GenerationError(f"unknown selection {selection!r}; choose from {SELECTIONS}")
  sc = [c.self_certainty if c.self_certainty is not None else math.nan for c in candidates]
  info: dict = {"selection": selection}
  if selection == "self_certainty":
    return int(rank_by(sc)[0]), info
  if selection in ("likelihood", "mean_likelihood"):
    ll = [-c.nll / (max(len(c.output_ids), 1) if selection == "mean_likelihood" else 1)
          for c in candidates]
    return int(rank_by(ll)[0]), info
  if answers is None:
    raise GenerationError(f"selection {selection!r} needs extracted answers")
  power = 0.0 if selection == "majority" else borda_power
  votes = borda_votes(answers, sc, power)
  info["votes"] = votes
  order = rank_by(sc)
  if not votes:  # no response has an answer: fall back to the most certain one
    return int(order[0]), info
  best_rank = {}
  for r, i in enumerate(order):
    if answers[i] is not None:
      best_rank.setdefault(answers[i], (r, int(i)))
  winner = max(votes, key=lambda a: (votes[a], -best_rank[a][0]))
  return best_rank[winner][1], info


# ---------------------------------------------------------------------------- pipelines


def _as_config(cfg, **overrides) -> ml_collections.ConfigDict:
  base = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def sample_candidates(lm, params, prompts, cfg, eos_ids, pad_id, row_ids=None, shard=None,
                      num_samples: Optional[int] = None) -> list[list[Generation]]:
  """num_samples sampled responses per prompt (cfg's sampling settings), grouped by prompt."""
  n = int(num_samples or _get(cfg, "num_samples", 8))
  sub = _as_config(cfg, strategy="sample", num_return_sequences=n)
  gens = generation.generate(lm, params, prompts, sub, eos_ids, pad_id, row_ids, shard)
  groups: list[list[Generation]] = [[] for _ in prompts]
  for g in gens:
    groups[g.index].append(g)
  return groups


def decode_text(tokenizer, ids: Sequence[int]) -> str:
  return tokenizer.decode(list(ids), skip_special_tokens=True)


def choose(groups: list[list[Generation]], selection: str, extract: Optional[AnswerExtractor],
           tokenizer, borda_power: float) -> list[Generation]:
  """Applies the selection rule to each prompt's candidates; records the choice in extras."""
  out = []
  for cands in groups:
    answers = None
    if extract is not None and tokenizer is not None:
      answers = [extract(decode_text(tokenizer, c.output_ids)) for c in cands]
    idx, info = select(cands, selection, answers, borda_power)
    g = cands[idx]
    g.extras = dict(info, selected=idx, num_samples=len(cands),
                    candidate_self_certainty=[c.self_certainty for c in cands],
                    candidate_nll=[c.nll for c in cands])
    if answers is not None:
      g.extras["answer"] = answers[idx]
      g.extras["candidate_answers"] = answers
    g.rank = 0
    out.append(g)
  return out


def best_of_n(lm, params, prompts, cfg, eos_ids, pad_id, row_ids=None, shard=None,
              tokenizer=None, extract: Optional[AnswerExtractor] = None) -> list[Generation]:
  """Samples `num_samples` responses per prompt and returns the selected one per prompt.

  `extract` overrides cfg.answer_extractor. Answer-based selections (borda, majority)
  need a tokenizer (answers are extracted from text).
  """
  selection = _get(cfg, "selection", "self_certainty")
  if extract is None:
    extract = get_extractor(_get(cfg, "answer_extractor", "last_number"))
  if selection in ("borda", "majority") and tokenizer is None:
    raise GenerationError(f"selection {selection!r} extracts answers from text: pass a tokenizer")
  groups = sample_candidates(lm, params, prompts, cfg, eos_ids, pad_id, row_ids, shard)
  return choose(groups, selection, extract, tokenizer, float(_get(cfg, "borda_power", 0.5)))


def _best_of_n_pipeline(lm, params, prompts, cfg, eos_ids, pad_id, row_ids, shard, tokenizer):
  return best_of_n(lm, params, prompts, cfg, eos_ids, pad_id, row_ids, shard, tokenizer)


def _validate_best_of_n(cfg) -> None:
  n = _get(cfg, "num_samples", 8)
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise GenerationError(f"num_samples must be an integer >= 1, got {n!r}")
  if _get(cfg, "selection", "self_certainty") not in SELECTIONS:
    raise GenerationError(f"unknown selection {_get(cfg, 'selection')!r}; choose from {SELECTIONS}")
  if not _get(cfg, "borda_power", 0.5) >= 0:
    raise GenerationError(f"borda_power must be >= 0, got {_get(cfg, 'borda_power')}")
  if _get(cfg, "num_return_sequences", 1) != 1:
    raise GenerationError("best_of_n returns one selected response per prompt: "
                          "num_return_sequences must be 1 (all candidates are in extras)")
  get_extractor(_get(cfg, "answer_extractor", "last_number"))
  _validate_sampling(cfg)


def _validate_sampling(cfg) -> None:
  t = _get(cfg, "temperature", 1.0)
  if not t > 0:
    raise GenerationError(f"temperature must be > 0 for sampling, got {t}")


# Self-agreement


def split_chat_prompt(tokenizer, prompt_ids: Sequence[int]) -> tuple[str, bool]:
  """(question text, whether the prompt is one user turn of the tokenizer's chat template).

  The template is rendered around a sentinel message; a prompt that decodes to the same
  prefix and suffix is a chat prompt whose user message is the question. Anything else
  is taken as plain text.
  """
  text = tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
  if tokenizer.chat_template:
    sentinel = "\x00QUESTION\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}],
                                             add_generation_prompt=True)
    pre, post = rendered.split(sentinel)
    if text.startswith(pre) and text.endswith(post) and len(text) >= len(pre) + len(post):
      return text[len(pre):len(text) - len(post)], True
  return decode_text(tokenizer, prompt_ids), False


def agreement_prompt(question: str, paths: Sequence[str],
                     template: str = DEFAULT_AGREEMENT_TEMPLATE,
                     path_template: str = DEFAULT_PATH_TEMPLATE) -> str:
  """The second-stage prompt text: the question and every sampled path (deterministic)."""
  rendered = "\n\n".join(path_template.format(i=i + 1, path=p.strip()) for i, p in enumerate(paths))
  return template.format(question=question.strip(), num_paths=len(paths), paths=rendered)


def encode_agreement(tokenizer, text: str, chat: bool) -> list[int]:
  if chat:
    return tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
  return tokenizer.encode(text + "\n\nAnswer:")


def self_agreement(lm, params, prompts, cfg, eos_ids, pad_id, row_ids=None, shard=None,
                   tokenizer=None, extract: Optional[AnswerExtractor] = None,
                   paths: Optional[list[list[Generation]]] = None) -> list[Generation]:
  """Samples `num_paths` paths per prompt, then asks the model greedily for the answer most
  paths agree on. Returns the final greedy response per prompt; extras hold the paths'
  texts, their extracted answers (for inspection only) and the final extracted answer.

  `paths` lets a caller reuse already sampled candidates (e.g. the first m of a larger
  sample, which are what num_paths=m samples).
  """
  if tokenizer is None:
    raise GenerationError("self_agreement builds a text prompt: pass a tokenizer")
  if extract is None:
    extract = get_extractor(_get(cfg, "answer_extractor", "last_number"))
  if paths is None:
    paths = sample_candidates(lm, params, prompts, cfg, eos_ids, pad_id, row_ids, shard,
                              num_samples=int(_get(cfg, "num_paths", 8)))
  template = _get(cfg, "agreement_template", DEFAULT_AGREEMENT_TEMPLATE)
  path_template = _get(cfg, "agreement_path_template", DEFAULT_PATH_TEMPLATE)
  second, texts = [], []
  for p, cands in zip(prompts, paths):
    question, chat = split_chat_prompt(tokenizer, p)
    ptexts = [decode_text(tokenizer, c.output_ids) for c in cands]
    texts.append(ptexts)
    second.append(encode_agreement(tokenizer, agreement_prompt(question, ptexts, template,
                                                               path_template), chat))
  final_cfg = _as_config(cfg, strategy="greedy", num_return_sequences=1,
                         max_new_tokens=int(_get(cfg, "agreement_max_new_tokens",
                                                 _get(cfg, "max_new_tokens"))),
                         max_cache_len=0)
  finals = generation.generate(lm, params, second, final_cfg, eos_ids, pad_id,
                               row_ids=row_ids, shard=shard)
  for g, ptexts, orig in zip(finals, texts, prompts):
    g.extras = dict(paths=ptexts, path_answers=[extract(t) for t in ptexts],
                    answer=extract(decode_text(tokenizer, g.output_ids)),
                    agreement_prompt_ids=g.prompt_ids)
    g.prompt_ids = [int(t) for t in orig]
  return finals


def _self_agreement_pipeline(lm, params, prompts, cfg, eos_ids, pad_id, row_ids, shard,
                             tokenizer):
  return self_agreement(lm, params, prompts, cfg, eos_ids, pad_id, row_ids, shard, tokenizer)


def _validate_self_agreement(cfg) -> None:
  m = _get(cfg, "num_paths", 8)
  if not isinstance(m, (int, np.integer)) or m < 1:
    raise GenerationError(f"num_paths must be an integer >= 1, got {m!r}")
  if _get(cfg, "num_return_sequences", 1) != 1:
    raise GenerationError("self_agreement returns one answer per prompt: "
                          "num_return_sequences must be 1")
  a = _get(cfg, "agreement_max_new_tokens", _get(cfg, "max_new_tokens", 1))
  if not isinstance(a, (int, np.integer)) or a < 1:
    raise GenerationError(f"agreement_max_new_tokens must be an integer >= 1, got {a!r}")
  template = _get(cfg, "agreement_template", DEFAULT_AGREEMENT_TEMPLATE)
  for field in ("{question}", "{paths}"):
    if field not in template:
      raise GenerationError(f"agreement_template must contain {field}")
  try:
    agreement_prompt("q", ["p"], template, _get(cfg, "agreement_path_template",
                                               DEFAULT_PATH_TEMPLATE))
  except (KeyError, IndexError, ValueError) as e:
    raise GenerationError(f"agreement templates do not format: {e!r}") from None
  get_extractor(_get(cfg, "answer_extractor", "last_number"))
  _validate_sampling(cfg)


generation.register_strategy(Strategy("best_of_n", sampling=True, validate=_validate_best_of_n,
                                      pipeline=_best_of_n_pipeline))
generation.register_strategy(Strategy("self_agreement", sampling=True,
                                      validate=_validate_self_agreement,
                                      pipeline=_self_agreement_pipeline, needs_tokenizer=True))

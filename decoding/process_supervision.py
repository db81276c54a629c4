"""Step-level grading of solutions, after "SPARE: Single-Pass Annotation with Reference-Guided
Evaluation for Automatic Process Supervision and Reward Modelling" (Rizvi, Zhu, Gurevych 2025).

A solution is written as numbered steps, `[1] ... [2] ...`; `split_steps` cuts it with the
reference code's pattern (`\\n*\\[\\d+\\]\\s*`). A grader sees the question, the reference
solution's steps and the numbered student steps, aligns each student step with the reference
step(s) it corresponds to and labels it CORRECT or INCORRECT, all in one pass:

* `grade_with_reference` is that grader as a rule over the quantities each step states:
  a student equation that is arithmetically true and whose result is the result of a
  reference step is aligned with that step and CORRECT; a false equation, or one whose
  result no reference step reaches, is INCORRECT; a step without an equation is CORRECT when
  every number it states is a quantity of the question or a reference result (restating the
  givens, or the answer), else INCORRECT; a step that states no number is CORRECT.
* `grader_prompt` / `parse_grades` are the same grading asked of a language model: the
  prompt asks for the JSON list of the reference code, `[{"student_step": k, "label":
  "CORRECT" | "INCORRECT"}]` (1-based), and steps it leaves out come back as None.

`rollout_labels` is the annotation SPARE is compared with: Monte-Carlo rollouts ("Math-Shepherd",
Wang et al. 2024, hard estimation): step j is good when at least one of k sampled
continuations of the solution's first j steps reaches the right answer; it costs k
continuations per step, which it counts.

`step_targets` turns labels into process reward model targets as the reference code does:
CORRECT 1, INCORRECT 0, a step the grader skipped 0, and the last step's label replaced by
the final answer's correctness.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable, Optional, Sequence

from decoding.runner import generate
from decoding.sampling import Sample
from models.datasets.arithmetic import equations, numbers

STEP_MARK = re.compile(r"\n*\[\d+\]\s*")
LABELS = ("CORRECT", "INCORRECT")


def split_steps(text: str) -> list[str]:
  """The steps of a `[1] ... [2] ...` solution (text before the first mark is dropped; a text
  without marks is one step)."""
  parts = STEP_MARK.split(text)
  if len(parts) == 1:
    return [text.strip()] if text.strip() else []
  return [p.strip() for p in parts[1:] if p.strip()]


def number_steps(steps: Sequence[str]) -> str:
  """`[1] step\\n[2] step ...`, the form graders and the policy's prompt use."""
  return "\n".join(f"[{i}] {s}" for i, s in enumerate(steps, 1))


@dataclasses.dataclass(frozen=True)
class StepGrade:
  label: bool  # CORRECT
  aligned: tuple[int, ...]  # 0-based reference steps the student step corresponds to


def grade_with_reference(question: str, reference_steps: Sequence[str],
                         student_steps: Sequence[str]) -> list[StepGrade]:
  """The rule-based single-pass grader (see the module docstring)."""
  ref_results = []
  for r in reference_steps:
    eqs = equations(r)
    ref_results.append(eqs[-1].stated if eqs else None)
  known = set(numbers(question)) | {x for x in ref_results if x is not None}
  grades = []
  for step in student_steps:
    eqs = equations(step)
    if eqs:
      aligned, ok = [], True
      for e in eqs:
        hits = [j for j, x in enumerate(ref_results) if x is not None and x == e.stated]
        ok = ok and e.true and bool(hits)
        aligned += hits[:1]
      grades.append(StepGrade(ok, tuple(dict.fromkeys(aligned))))
    else:
      nums = numbers(step)
      aligned = tuple(j for j, x in enumerate(ref_results) if x is not None and x in nums)
      grades.append(StepGrade(all(x in known for x in nums), aligned))
  return grades


def grader_prompt(question: str, reference_steps: Sequence[str],
                  student_steps: Sequence[str]) -> str:
  """The single-pass grading request for a language-model grader."""
  return (
      "You grade a student's solution step by step against a reference solution.\n\n"
      f"Question: {question}\n\nReference solution:\n{number_steps(reference_steps)}\n\n"
      f"Student solution:\n{number_steps(student_steps)}\n\n"
      "For each student step, find the reference step(s) it corresponds to, explain briefly "
      "whether its quantities and arithmetic agree, and label it CORRECT or INCORRECT. End "
      "with a JSON list with one entry per student step, like "
      '[{"student_step": 1, "label": "CORRECT"}, {"student_step": 2, "label": "INCORRECT"}].')


def parse_grades(text: str, num_steps: int) -> list[Optional[bool]]:
  """The labels of steps 1..num_steps from a grader's reply: the last JSON list in it whose
  entries carry "student_step" and "label"; a step it does not grade (or a reply without a
  readable list) is None, an out-of-range or unreadable entry is ignored."""
  out: list[Optional[bool]] = [None] * num_steps
  for m in reversed(list(re.finditer(r"\[[^\[\]]*\]", text, flags=re.S))):
    try:
      items = json.loads(m.group())
    except json.JSONDecodeError:
      continue
    if not isinstance(items, list) or not any(isinstance(x, dict) for x in items):
      continue
    for x in items:
      if not isinstance(x, dict):
        continue
      k, label = x.get("student_step"), str(x.get("label", "")).strip().upper()
      if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= num_steps and label in LABELS:
        out[k - 1] = label == "CORRECT"
    return out
  return out


def step_targets(labels: Sequence[Optional[bool]], outcome: bool) -> list[int]:
  """PRM targets: 1 CORRECT, 0 INCORRECT or skipped; the last step takes the outcome."""
  out = [1 if label else 0 for label in labels]
  if out:
    out[-1] = int(bool(outcome))
  return out


@dataclasses.dataclass(frozen=True)
class RolloutLabels:
  labels: list[bool]  # per step: some continuation from it reached the right answer
  generated_tokens: int  # tokens sampled for them
  context_tokens: int  # tokens of the contexts they continued (prefilled once per step)


def rollout_labels(target, prompt_ids: Sequence[int], steps: Sequence[str],
                   is_right: Callable[[str], bool], *, k: int = 4, max_new_tokens: int = 96,
                   temperature: float = 1.0, seed: int = 0, batch_size: int = 16
                   ) -> RolloutLabels:
  """Labels every step of a numbered solution by k sampled continuations each (see the
  module docstring). The context of step j is the prompt, then `[1] .. [j]` and a line
  break; `is_right` gets those steps' text followed by the continuation (e.g. to check that
  its last number is the answer, so a solution that already stated it and then stops
  counts)."""
  tok = target.tokenizer
  texts = [number_steps(steps[:j + 1]) + "\n" for j in range(len(steps))]
  contexts = [list(prompt_ids) + tok.encode(t, add_special_tokens=False) for t in texts]
  settings = Sample(temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                    num_return_sequences=k)
  gens = generate(target, contexts, settings, seed=seed, batch_size=batch_size)
  labels = [any(is_right(texts[j] + tok.decode(g.output_ids, skip_special_tokens=True))
                for g in gens[j * k:(j + 1) * k]) for j in range(len(steps))]
  return RolloutLabels(labels, sum(len(g.output_ids) for g in gens),
                       sum(len(c) for c in contexts))

"""Self-agreement: sample m reasoning paths, then ask the model which answer most agree on.

"Ask One More Time: Self-Agreement Improves Reasoning of Language Models in (Almost) All
Scenarios" (Lin et al.): sample m reasoning paths, build one prompt holding the question
and all m paths with an instruction to give the answer most of them agree on, and ask the
same model once more (greedy). No answer parsing is needed for the final answer; the
paper's exact prompt is not public, so the template is ours (`DEFAULT_AGREEMENT_TEMPLATE`,
fields `{question}`, `{num_paths}` and `{paths}`; each path is rendered with
`agreement_path_template`, fields `{i}` (1-based) and `{path}`). Answers are extracted
(`decoding.answers`) only to report them.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional, Sequence

from decoding import answers as answers_lib
from decoding.answers import AnswerExtractor
from decoding.best_of_n import decode_text, group_by_prompt
from decoding.errors import GenerationError
from decoding.greedy import Greedy
from decoding.results import Generation
from decoding.sampling import Sample
from decoding.settings import Penalties, Warpers, check_int, convert, settings
from decoding.strategy import Strategy

DEFAULT_AGREEMENT_TEMPLATE = (
    "{question}\n\n"
    "Here are {num_paths} candidate solutions to this question:\n\n"
    "{paths}\n\n"
    "Read all the candidate solutions. Which final answer do most of them agree on? "
    "Reply with that answer.")
DEFAULT_PATH_TEMPLATE = "Solution {i}: {path}"


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


@settings
class SelfAgreement(Penalties, Warpers):
  """Self-agreement. Stage 1 samples with this request's processors (temperature 0.7 and
  128 tokens per path are our defaults; the paper's are not confirmed); stage 2 answers
  greedily with `agreement_max_new_tokens`."""
  max_new_tokens: int = 128  # per reasoning path
  temperature: float = 0.7
  num_paths: int = 8  # m
  agreement_max_new_tokens: int = 64  # the final greedy answer
  agreement_template: str = DEFAULT_AGREEMENT_TEMPLATE  # {question} {num_paths} {paths}
  agreement_path_template: str = DEFAULT_PATH_TEMPLATE  # {i} {path}
  answer_extractor: str = "last_number"  # only to report answers in the output
  sampling: ClassVar[bool] = True

  def validate(self) -> None:
    super().validate()
    check_int("num_paths", self.num_paths, 1)
    check_int("agreement_max_new_tokens", self.agreement_max_new_tokens, 1)
    for field in ("{question}", "{paths}"):
      if field not in self.agreement_template:
        raise GenerationError(f"agreement_template must contain {field}")
    try:
      agreement_prompt("q", ["p"], self.agreement_template, self.agreement_path_template)
    except (KeyError, IndexError, ValueError) as e:
      raise GenerationError(f"agreement templates do not format: {e!r}") from None
    answers_lib.get_extractor(self.answer_extractor)
    self.answer_settings()  # its own checks (min_new_tokens <= agreement_max_new_tokens)

  def path_settings(self) -> Sample:
    return convert(self, Sample, num_return_sequences=self.num_paths)

  def answer_settings(self) -> Greedy:
    return convert(self, Greedy, max_new_tokens=self.agreement_max_new_tokens)


def self_agreement(s: SelfAgreement, target, prompts, generate: Callable,
                   extract: Optional[AnswerExtractor] = None,
                   paths: Optional[list[list[Generation]]] = None) -> list[Generation]:
  """Samples `num_paths` paths per prompt, then asks the model greedily for the answer most
  paths agree on (`generate(prompts, settings, **run_options)` runs each stage). Returns the
  final greedy response per prompt; extras hold the paths' texts, their extracted answers
  (for inspection only) and the final extracted answer.

  `paths` lets a caller reuse already sampled candidates (e.g. the first m of a larger
  sample, which are what num_paths=m samples).
  """
  tok = target.tokenizer
  if tok is None:
    raise GenerationError("self_agreement builds a text prompt: the model needs a tokenizer")
  extract = extract or answers_lib.get_extractor(s.answer_extractor)
  if paths is None:
    paths = group_by_prompt(generate(prompts, s.path_settings()), len(prompts))
  second, texts = [], []
  for p, cands in zip(prompts, paths):
    question, chat = split_chat_prompt(tok, p)
    ptexts = [decode_text(tok, c.output_ids) for c in cands]
    texts.append(ptexts)
    second.append(encode_agreement(tok, agreement_prompt(
        question, ptexts, s.agreement_template, s.agreement_path_template), chat))
  # the second prompts are longer: their cache is sized for them
  finals = generate(second, s.answer_settings(), max_cache_len=0)
  for g, ptexts, orig in zip(finals, texts, prompts):
    g.extras = dict(paths=ptexts, path_answers=[extract(t) for t in ptexts],
                    answer=extract(decode_text(tok, g.output_ids)),
                    agreement_prompt_ids=g.prompt_ids)
    g.prompt_ids = [int(t) for t in orig]
  return finals


STRATEGY = Strategy("self_agreement", SelfAgreement, "m sampled reasoning paths, then the model "
                    "is asked (greedy) which answer most agree on", pipeline=self_agreement,
                    needs_tokenizer=True)

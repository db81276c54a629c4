"""Exact-extract: the passage span of lowest NLL as the answer (decoding/exact_extract.py).

  python -m decoding.generate --config=configs/exact_extract.py \
      --input=questions.jsonl --output=answers.jsonl

Input lines are {"passage": str, "question": str} with optional "examples" (a list of
{"passage", "question", "answer"} in-context examples); output lines hold `text` (the span),
`span` ([start, end) token offsets into the passage tokenization), `nll` and `top_spans`.
The defaults live in `ExactExtract`: spans of any length (`max_span_tokens`=0), ranked by raw
NLL (`length_normalize`=False), 5 reported spans, 16 start positions per compiled pass, and
windows only for passages that do not fit the model's context.
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "exact_extract"
  return c

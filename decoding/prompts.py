"""Prompts as the command lines read them: JSONL request lines and text prompts to token ids
(shared by `decoding.generate` and `decoding.evaluate`; no command-line flags here)."""
from __future__ import annotations

from decoding.errors import GenerationError
from decoding.settings import is_int


def check_request_line(obj, where: str) -> None:
  """GenerationError unless a parsed JSONL line is a dict with exactly one of "prompt" (a
  string) or "prompt_ids" (a list of integers); `where` names the line in the message."""
  if not isinstance(obj, dict) or (("prompt" in obj) == ("prompt_ids" in obj)):
    raise GenerationError(f'{where}: expected exactly one of "prompt" or "prompt_ids"')
  if "prompt" in obj and not isinstance(obj["prompt"], str):
    raise GenerationError(f'{where}: "prompt" must be a string')
  if "prompt_ids" in obj and not (isinstance(obj["prompt_ids"], list) and all(
      is_int(t) for t in obj["prompt_ids"])):
    raise GenerationError(f'{where}: "prompt_ids" must be a list of integers')


def encode_text(model, text: str, cfg) -> list[int]:
  """Token ids of a text prompt: the chat template for instruct models (with the
  `system_prompt` message when one is set, else the template's own default), plain
  encoding otherwise."""
  tok = model.tokenizer
  if tok is None:
    raise GenerationError("this checkpoint has no tokenizer: give prompt_ids instead of text")
  if cfg.chat_template and model.instruct and tok.chat_template:
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
    messages.append({"role": "user", "content": text})
    return tok.encode_chat(messages, add_generation_prompt=True)
  return tok.encode(text)

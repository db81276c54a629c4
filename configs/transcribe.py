"""Transcription config for `python -m decoding.transcribe --config=configs/transcribe.py
--input=a.wav,b.wav --output=out.jsonl`.

Strategy fields keep Hugging Face's names and are unset (None: the strategy's default), as in
configs/generate.py; the strategies that transcribe are those of
`decoding.registry.names("speech")` (greedy, sample, beam). Setting a field the chosen
strategy does not read is an error.
"""
import ml_collections
from ml_collections import config_dict

unset = config_dict.placeholder  # None: the strategy's default


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # A registered speech model (models/registry.py: whisper-tiny.en, whisper-base) or a folder
  # of CTranslate2 Whisper files (model.bin, config.json, tokenizer.json).
  c.model = "whisper-tiny.en"
  c.language = "en"  # multilingual models: the language token (<|en|>, <|de|>, ...)
  c.task = "transcribe"  # multilingual models: or "translate" (to English)
  # Whisper's decoding rules: no special symbols, no blank or end of text as the first token
  c.suppress_tokens = True
  # Streaming (CarelessWhisper's causal decoder): strategy greedy streams as stream_greedy,
  # beam as stream_beam; stable tokens are emitted as chunks arrive. Their fields:
  c.streaming = False
  c.chunk_ms = unset(int)  # 300: audio per chunk, a multiple of 20 ms
  c.first_chunks = unset(int)  # 2: chunks in the first encoder block
  c.look_back = unset(int)  # 2: trailing tokens checked for stability on each chunk
  c.chunk_tokens = unset(int)  # 28: tokens added per chunk at most
  c.settle = unset(bool)  # False; True: end with the causal model's offline greedy output

  c.strategy = "greedy"
  # 224: Whisper's own budget for one 30 s window (half its 448 text positions)
  c.max_new_tokens = 224
  c.min_new_tokens = unset(int)
  c.temperature = unset(float)
  c.top_k = unset(int)
  c.top_p = unset(float)
  c.min_p = unset(float)
  c.repetition_penalty = unset(float)
  c.no_repeat_ngram_size = unset(int)
  c.num_beams = unset(int)  # beam (offline and streaming): 4
  c.length_penalty = unset(float)
  c.early_stopping = config_dict.FieldReference(None, field_type=object)
  c.num_return_sequences = unset(int)
  c.do_sample = unset(bool)  # beam: beam sampling

  c.seed = 0
  c.batch_size = 8
  return c

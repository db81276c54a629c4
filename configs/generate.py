"""Generation config for `python -m decoding.generate --config=configs/generate.py`.

Field names follow Hugging Face's GenerationConfig where one exists, and live at the top
level, so `--config.max_new_tokens=64 --config.top_p=0.9` work as transformers users expect.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model: a registered name (see models/registry.py), a .gguf file or a safetensors folder.
  c.model = "smollm2-135m-instruct"
  c.dtype = "float32"  # compute dtype
  c.param_dtype = "float32"  # storage dtype ("bfloat16" with dtype float32 = LayerCast)
  c.matmul_precision = "default"  # "highest" forces full-fp32 matmuls on accelerators
  c.scan_layers = True  # False: per-layer weights, faster decode steps, longer compile

  # Strategy, chosen by name (decoding.generation.STRATEGIES).
  c.strategy = "greedy"

  # Hugging Face GenerationConfig names.
  c.max_new_tokens = 64
  c.min_new_tokens = 0
  c.temperature = 1.0
  c.top_k = 0  # 0 disables
  c.top_p = 1.0
  c.min_p = 0.0
  c.repetition_penalty = 1.0
  c.no_repeat_ngram_size = 0
  c.num_beams = 1
  c.length_penalty = 1.0
  c.early_stopping = False
  c.num_beam_groups = 1
  c.diversity_penalty = 0.0
  c.num_return_sequences = 1
  c.seed = 0

  # Prompting and batching.
  c.chat_template = True  # apply the model's chat template to text prompts (instruct models)
  c.system_prompt = ""  # optional system message when the template is applied
  c.batch_size = 8
  c.max_cache_len = 0  # 0: sized from the longest prompt + max_new_tokens

  # Device mesh: batch over `data`, weights over `model` (1 x 1 = a single device).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.model = 1
  return c

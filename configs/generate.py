"""Generation config for `python -m decoding.generate --config=configs/generate.py`.

Field names follow Hugging Face's GenerationConfig where one exists, and live at the top
level, so `--config.max_new_tokens=64 --config.top_p=0.9` work as transformers users expect.
"""
import ml_collections
from ml_collections import config_dict


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
  # True | False | "never" (Hugging Face's values), typed `object` so both parse from flags.
  c.early_stopping = config_dict.FieldReference(False, field_type=object)
  c.num_beam_groups = 1
  c.diversity_penalty = 0.0
  c.num_return_sequences = 1
  c.do_sample = False  # only beam search reads it (beam sampling); use strategy="sample"
  c.seed = 0

  # Strategy-specific fields (each strategy's own file in configs/ sets its defaults too).
  # momentum (decoding/momentum.py, card 19)
  c.momentum_alpha = 0.2
  c.momentum_top_k = 5
  c.momentum_max_ngram = 5
  c.momentum_resistance = "ours"  # ours | linear | constant | log | exp
  # best_of_n (decoding/selection.py, card 17)
  c.num_samples = 8
  c.selection = "self_certainty"  # self_certainty | likelihood | mean_likelihood | borda | majority
  c.borda_power = 0.5
  c.answer_extractor = "last_number"  # decoding.selection.ANSWER_EXTRACTORS
  # superposed (decoding/superposed.py, card 3); configs/superposed.py also sets temperature=0.06
  c.num_drafts = 3
  c.num_token_sample = 9
  c.ngram_alpha = 0.54
  c.ngram_weights = [0.01, 0.04, 0.15, 0.18, 0.12]
  c.ngram_penalty = 200.0
  c.ngram_corpus = "text_corpus/train"
  # self_agreement (decoding/selection.py, card 14)
  c.num_paths = 8
  c.agreement_max_new_tokens = 64
  c.agreement_template = config_dict.placeholder(str)  # None: selection.DEFAULT_AGREEMENT_TEMPLATE
  c.agreement_path_template = config_dict.placeholder(str)  # None: DEFAULT_PATH_TEMPLATE

  # speculative (decoding/speculative.py, decoding/drafters.py, decoding/trees.py): lossless
  # in greedy mode (the tokens of strategy="greedy") and, with do_sample=True, in sampling mode.
  c.drafter = "self"  # self | model | prompt_lookup | dyspec | gad | eagle
  c.num_draft_tokens = 4  # chain drafters: tokens proposed per target call
  c.draft_layers = 4  # self-drafting: the target's first k layers + its head
  c.draft_model = ""  # drafter=model / dyspec: a draft model's registered name or path
  c.prompt_lookup_max_ngram = 3
  c.prompt_lookup_min_ngram = 1
  c.tree_budget = 16  # tree drafters: draft nodes per target call (root excluded)
  c.tree_depth = 6
  c.tree_children = 4  # children considered per node
  c.eagle_head = "eagle-smollm2-135m"  # drafter=eagle: a registered head name or a folder
  c.eagle_tree = True  # EAGLE-2 dynamic tree (False: a chain of num_draft_tokens)
  c.gad_drafter = "gad-smollm2"  # drafter=gad: a trained block drafter (name or folder)
  # LOSSY acceptance rules (defaults = lossless): GAD++ top-beta / gap-tau (greedy, card 6)
  # and DistillSpec's lenience epsilon (sampling, card 21).
  c.gad_beta = 1
  c.gad_tau = 0.0
  c.lenience = 1.0

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

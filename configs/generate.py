"""Generation config for `python -m decoding.generate --config=configs/generate.py`.

Field names follow Hugging Face's GenerationConfig where one exists, and live at the top
level, so `--config.max_new_tokens=64 --config.top_p=0.9` work as transformers users expect.

The strategy fields are unset (None): each strategy's settings type owns its defaults
(`decoding/settings.py` and the strategy's module), so `--config.strategy=superposed` here
runs exactly what `configs/superposed.py` runs. Setting a field the chosen strategy does not
read is an error that names the strategies that do. The run fields (model, seed, batching,
prompting, mesh) have their values here.
"""
import ml_collections
from ml_collections import config_dict

unset = config_dict.placeholder  # None: the strategy's default


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model: a registered name (see models/registry.py), a .gguf file or a safetensors folder.
  c.model = "smollm2-135m-instruct"
  # The precision recipe (models/numerics.py): "fp32"; "bf16" (bf16 weights and compute);
  # "layercast" (projection weights stored in bf16, everything computed in fp32)
  c.numerics = "fp32"
  # A row's output independent of its batch mates, padding, cache length and mesh
  # (models/batch_invariant.py): bitwise-reproducible greedy decoding, at a cost in speed
  c.batch_invariant = False
  # The model's layout: per-layer weights with q/k/v and gate/up fused decode fastest on CPU
  # (True / False: a shorter first compile, slower steps; see models.lm.load_model)
  c.scan_layers = False
  c.fused_projections = True
  # "packed": weights in column panels and the CPU kernel of models.packed_matmul (x86-64 AVX2,
  # compiled on first use with g++); several times faster for speculative verification
  c.matmul_kernel = "xla"

  # Strategy, chosen by name (decoding/registry.py).
  c.strategy = "greedy"

  # Hugging Face GenerationConfig names (decoding/settings.py).
  c.max_new_tokens = unset(int)  # 64; best_of_n and self_agreement: 128; soft_thinking: 256
  c.min_new_tokens = unset(int)
  c.temperature = unset(float)  # 1.0; superposed: 0.06; best_of_n, self_agreement: 0.7
  c.top_k = unset(int)  # 0 disables
  c.top_p = unset(float)
  c.min_p = unset(float)
  c.repetition_penalty = unset(float)
  c.no_repeat_ngram_size = unset(int)
  c.num_beams = unset(int)  # beam: 4; diverse_beam: 6
  c.length_penalty = unset(float)
  # True | False | "never" (Hugging Face's values), typed `object` so both parse from flags.
  c.early_stopping = config_dict.FieldReference(None, field_type=object)
  c.num_beam_groups = unset(int)
  c.diversity_penalty = unset(float)
  c.num_return_sequences = unset(int)
  c.do_sample = unset(bool)  # beam, speculative, scmoe; for ancestral sampling: strategy="sample"

  # momentum (decoding/momentum.py)
  c.momentum_alpha = unset(float)
  c.momentum_top_k = unset(int)
  c.momentum_max_ngram = unset(int)
  c.momentum_resistance = unset(str)  # ours | block | linear | constant | log | exp
  # best_of_n (decoding/best_of_n.py)
  c.num_samples = unset(int)
  c.selection = unset(str)  # self_certainty | likelihood | mean_likelihood | borda | majority
  c.borda_power = unset(float)
  c.answer_extractor = unset(str)  # decoding/answers.py ANSWER_EXTRACTORS
  # superposed (decoding/superposed.py)
  c.num_drafts = unset(int)
  c.num_token_sample = unset(int)
  c.ngram_alpha = unset(float)
  c.ngram_weights = unset(tuple)  # e.g. --config.ngram_weights="(0.1, 0.2)"
  c.ngram_penalty = unset(float)
  c.ngram_corpus = unset(str)
  # self_agreement (decoding/self_agreement.py)
  c.num_paths = unset(int)
  c.agreement_max_new_tokens = unset(int)
  c.agreement_template = unset(str)
  c.agreement_path_template = unset(str)
  # soft_thinking (decoding/soft_thinking.py); the warpers above are its answer phase's
  c.soft_variant = unset(str)  # gumbel | dirichlet | vanilla
  c.soft_temperature = unset(float)  # 0.6
  c.soft_top_k = unset(int)  # 30; 0: the whole vocabulary
  c.soft_top_p = unset(float)  # 0.95
  c.soft_max_topk = unset(int)  # 10: components of a soft token
  c.dirichlet_alpha = unset(float)  # 4.0
  c.gumbel_temperature = unset(float)  # 0.5
  # Markers: text, or token ids (Python API). think_end default "</think>"; "" = budget only
  c.think_start = config_dict.FieldReference(None, field_type=object)
  c.think_end = config_dict.FieldReference(None, field_type=object)
  c.max_think_tokens = unset(int)  # 192 (max_new_tokens, default 256, counts every token)

  # adadec (decoding/adadec.py): greedy with a lookahead rerank at high-entropy steps
  # nats (1.0); learned per model by `python -m train.adadec_threshold`; "inf": plain greedy
  c.entropy_threshold = unset(float)
  c.lookahead_candidates = unset(int)  # 3: top-B candidates rolled out
  c.lookahead_steps = unset(int)  # 5: greedy rollout tokens per candidate
  c.lookahead_weight = unset(float)  # 1.0: lambda of the score
  c.code_stops = unset(bool)  # True: rollouts stop at an unindented line or 4 blank lines

  # scmoe (decoding/scmoe.py): an MoE model's strong top-k routing contrasted with its weak
  # rank-k routing inside the strong plausible set; do_sample=True samples the contrast
  c.scmoe_beta = unset(float)  # 0.5: score (1 + beta) z_strong - beta z_weak
  c.scmoe_alpha = unset(float)  # 0.1: plausible set p_strong >= alpha * max p_strong
  c.scmoe_weak_rank = unset(int)  # 2: 0-based rank of the weak routing's one expert
  c.scmoe_strong_top_k = unset(int)  # 2

  # exact_extract (decoding/exact_extract.py): input lines {"passage", "question"[, "examples"]}
  c.max_span_tokens = unset(int)  # 0: any length (the whole passage window)
  c.length_normalize = unset(bool)  # False: rank spans by NLL, True: NLL / (length + 1)
  c.top_spans = unset(int)  # 5
  c.start_chunk = unset(int)  # 16 start positions per compiled pass
  c.window_tokens = unset(int)  # 0: as many passage tokens as the context allows
  c.window_stride = unset(int)  # 0: window_tokens // 2
  c.prune_starts = unset(bool)  # True: skip starts that cannot reach the top_spans (exact)

  # speculative (decoding/speculative/): lossless in greedy mode (the tokens of
  # strategy="greedy") and, with do_sample=True, in sampling mode. The drafter's own fields
  # are listed under it; setting another drafter's field is an error.
  c.drafter = unset(str)  # self | model | prompt_lookup | dyspec | eagle | gad
  c.num_draft_tokens = unset(int)  # chain drafters: tokens proposed per target call
  c.draft_layers = unset(int)  # self, dyspec: the target's first k layers + its head
  c.draft_model = unset(str)  # model, dyspec: a draft model's registered name or path
  c.prompt_lookup_max_ngram = unset(int)
  c.prompt_lookup_min_ngram = unset(int)
  c.tree_budget = unset(int)  # dyspec, eagle: draft nodes per target call (root excluded)
  c.tree_depth = unset(int)
  c.tree_children = unset(int)  # children considered per node
  c.eagle_head = unset(str)  # eagle: a registered head name or a folder
  c.eagle_tree = unset(bool)  # eagle: EAGLE-2 dynamic tree (False: a chain)
  c.eagle_draft_vocab = unset(int)  # eagle: draft from the V' tokens the target emits most (default 8192; 0: all)
  c.gad_drafter = unset(str)  # gad: a trained block drafter (name or folder)
  # LOSSY acceptance rules (unset = lossless): GAD++ top-beta / gap-tau (greedy) and
  # DistillSpec's lenience epsilon (sampling).
  c.gad_beta = unset(int)
  c.gad_tau = unset(float)
  c.lenience = unset(float)

  # Run fields: randomness, prompting and batching.
  c.seed = 0
  c.chat_template = True  # apply the model's chat template to text prompts (instruct models)
  c.system_prompt = ""  # a system message when the template is applied ("": the template's own)
  c.batch_size = 8
  c.max_cache_len = 0  # 0: sized from the longest prompt + max_new_tokens

  # Device mesh: batch over `data`, weights over `model` (1 x 1 = a single device).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.model = 1
  return c

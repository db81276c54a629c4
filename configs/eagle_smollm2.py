"""EAGLE / FSPAD draft head for SmolLM2-135M-Instruct ("EAGLE: Speculative Sampling Requires
Rethinking Feature Uncertainty", Li et al., ICML 2024; "Boosting Lossless Speculative
Decoding via Feature Sampling and Partial Alignment Distillation", Gui et al., 2024).

    python -m train.draft_head --config=configs/eagle_smollm2.py

EAGLE trains its head on the target's features of ~68k ShareGPT conversations for many
epochs. Scaled to a 2-core CPU: 1520 chat prompts (600 of the 800 instruction templates x
topics, 320 arithmetic word problems, 480 Jane Austen passages to repeat / rewrite /
summarize / continue / describe, 120 code requests; none from the benchmarks' prompts or
HumanEval) answered greedily by SmolLM2 itself (up to 128 new tokens, batches of 32, decoded
with the packed CPU kernel), 64 of them held out for the acceptance metrics, plus 256 rows
of 256 tokens of plain Austen text (training only). The feature-sampling variant (`fs`, the
winner of an earlier four-way comparison on 160 prompts: README) gets 1000 AdamW updates
(batch 8 rows, lr 1e-3 after 10 warmup steps, cosine decay to 10%, global-norm clipping 0.5
as in EAGLE), with EAGLE's loss weights (SmoothL1 + 0.1 CE; the CE on 48 random answer
pairs per row and step) and input-feature noise U(-0.1, 0.1) (SmolLM2's feature RMS is
1.86), and is shipped to checkpoints/eagle-smollm2-135m with the token ranking of its
training answers (for `eagle_draft_vocab`) and the held-out acceptance of reduced draft
vocabularies. `--config.variants="('eagle','fs','pad','fs_pad')"` runs the comparison again.

Smoke run on a tiny random target (SmolLM2's tokenizer; a minute or two, mostly compiling):
    python -m train.draft_head --config=configs/eagle_smollm2.py --config.model.name=tiny \
        --config.data.num_chat=8 --config.data.num_arithmetic=4 --config.data.num_text=4 \
        --config.data.num_code=4 --config.data.num_eval=4 --config.data.num_corpus=4 \
        --config.data.max_new_tokens=16 --config.num_steps=4 --config.ship.enabled=False \
        --config.workdir=/tmp/eagle_smoke --config.data.cache_dir=/tmp/eagle_smoke/cache
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/eagle_smollm2"  # per-variant metrics.jsonl / results.json, summary.json

  c.model = ml_collections.ConfigDict()  # the target (train.model_setup.build fields)
  c.model.name = "smollm2-135m-instruct"  # or "tiny" (random, SmolLM2 tokenizer) for smoke runs
  c.model.init = "pretrained"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.scan_layers = False  # per-layer weights: the faster decode on CPU
  c.model.remat = False
  c.model.tokenizer = "smollm2-135m-instruct"  # used by "tiny"
  c.model.overrides = ml_collections.ConfigDict(
      dict(hidden_size=32, intermediate_size=64, max_position_embeddings=512))  # "tiny" only

  c.data = ml_collections.ConfigDict()
  c.data.seed = 0
  c.data.num_chat = 600  # of the 800 CHAT_TEMPLATES x TOPICS, shuffled
  c.data.num_arithmetic = 320  # models.datasets.arithmetic.problems(n, arithmetic_seed)
  c.data.arithmetic_seed = 20240828  # not the benchmark's evaluation seed
  c.data.num_text = 480  # Austen passages (train split) in repeat / rewrite / ... requests
  c.data.num_code = 120  # code-writing requests (not HumanEval)
  c.data.num_eval = 64  # the last rows of the shuffled set: held out
  c.data.num_corpus = 256  # plus rows of plain Austen text (train split), training only
  c.data.max_new_tokens = 128
  c.data.gen_batch_size = 32
  c.data.gen_matmul_kernel = "packed"  # answers decoded with the CPU kernel ("xla": XLA dots)
  c.data.seq_len = 256  # prompt + answer, cut to this length
  c.data.feature_batch_size = 8
  c.data.cache_dir = ""  # "" = ~/.cache/decodax/eagle_data
  c.data.cache_features = True

  c.head = ml_collections.ConfigDict()
  c.head.feature = "hidden"  # final hidden state after the final norm (LM-head input)
  c.head.partial_fraction = 0.5  # partial alignment: share of dims in the SmoothL1 term

  c.loss = ml_collections.ConfigDict()
  c.loss.w_cls = 0.1  # EAGLE's CE weight
  c.loss.noise = 0.1  # input features + U(-noise, noise)
  c.loss.beta = 1.0  # SmoothL1 transition point
  c.loss.ce_pairs = 48  # CE on this many random answer pairs per row and step (0: all)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 10
  c.optimizer.end_lr_fraction = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.grad_clip = 0.5

  c.variants = ("fs",)
  c.batch_size = 8
  c.num_steps = 1000
  c.logit_window = 0  # eval loss: answer pairs per row with logits (0: the longest answer)
  c.log_every = 10
  c.eval_every = 0  # held-out loss every N steps (0: only at the end)

  c.eval = ml_collections.ConfigDict()
  c.eval.depth = 5  # drafts per chain
  c.eval.batch_size = 8
  c.eval.also_float32 = False  # also measure the unrounded float32 parameters
  # reduced draft vocabularies measured for the shipped head (coverage, chain acceptance)
  c.eval.draft_vocab = (2048, 4096, 8192, 16384)

  c.ship = ml_collections.ConfigDict()
  c.ship.enabled = True
  c.ship.path = "checkpoints/eagle-smollm2-135m"  # relative to the repository
  c.ship.num_steps = 0  # > 0: then train the best variant this long; ship it if better
  return c

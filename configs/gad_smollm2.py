"""GAD block drafter for SmolLM2-135M-Instruct, distilled from its greedy chat answers.

"Lossless Acceleration for Seq2seq Generation with Aggressive Decoding" (Ge et al., 2022),
card 6. Run with

    python -m train.gad --config=configs/gad_smollm2.py [--workdir=DIR]

The drafter is the target's first 4 of 30 layers + final norm + tied head, with a learned
mask embedding and 6 slot embeddings; it predicts the next 6 tokens in one parallel pass
(`decoding.speculative.gad_drafter.GadDrafter`). Trained: the 4 layers, the final norm, the mask and slot
embeddings (the embedding / head stay the target's). Data: the target's greedy answers
(128 tokens) to 480 templated chat prompts of 60 training subjects, generated once and
cached in the workdir; held-out measurements use other subjects. The result is saved as
the named drafter "gad-smollm2" (a gad_drafter artifact in ~/.cache/decodax/drafts/gad-smollm2,
not in git; decoding loads it with `--config.drafter=gad`).

Block size: the card's k = 25 is for translation with a drafter trained on millions of
sentence pairs; a 4-layer drafter of a 135M chat model trained for half an hour on two CPU
cores gets little right beyond a few tokens, so k = 6 (drafts past the first miss are
wasted work, and the verified block is k + 1 tokens). GAD++ is measured with the released
beta = 5, tau = 3.0.

Scaled to a 2-core CPU (about 30 minutes of training): 250 steps of 8 rows x 16 cuts x 6
masks. The copied final norm is rescaled at init (`calibrate_output_scale`: SmolLM2's
4-layer early exit is far too confident), and lr 1e-3 (3e-3 diverged in a smoke run).
"""
import ml_collections

from configs import train_base


def get_config():
  c = train_base.get_config()
  c.task = "gad"  # run by train.gad (not train.main)
  c.model.name = "smollm2-135m-instruct"

  g = c.gad = ml_collections.ConfigDict()
  g.block = 6  # k: masks per proposal (= draft tokens per target call)
  g.num_layers = 4  # drafter depth (the target's first layers, trained)
  g.slot_embeddings = True  # a learned vector per mask slot, added to the mask embedding
  g.calibrate_output_scale = True  # rescale the copied final norm at init (temperature only)
  g.num_cuts = 16  # (prefix, block) pairs per row per step, in one pass
  g.prompts = "chat"  # "chat" (templated chat prompts) | "synthetic" (tokenizer-free tests)
  g.prompt_len = 64  # prompt bucket (0: longest prompt rounded up to 16)
  g.gen_len = 128  # greedy continuation tokens per training row
  g.num_train_prompts = 480  # of the 16 templates x 60 training subjects
  g.num_corpus_prompts = 0  # optional text-corpus contexts (continued greedily as well)
  g.corpus_prompt_len = 32
  g.num_eval_prompts = 32  # held-out subjects: block metrics on their greedy rows
  g.generate_batch = 32
  g.decode_prompts = 8  # held-out prompts decoded with greedy / GAD / GAD++ (0: skip)
  g.decode_max_new_tokens = 128
  g.plus = ((5, 3.0),)  # GAD++ (beta, tau) settings to measure
  g.eval_num_draft = (3,)  # also decode with only the first k' drafts (plus k = block)
  g.timing_repeats = 1
  g.report_before = True
  g.save_name = "gad-smollm2"  # "" = do not save
  g.save_dir = ""  # "" = the drafts dir (models.registry.drafts_dir()) / save_name

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.schedule = "cosine"
  c.optimizer.end_lr_fraction = 0.1
  c.optimizer.grad_clip = 1.0
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_steps = 250
  c.log_every = 10
  c.checkpoint_every = 50
  return c

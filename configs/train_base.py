"""Defaults shared by every training experiment; each `configs/*.py` overrides what it needs.

Run an experiment with `python -m train.main --config=configs/NAME.py --workdir=DIR` and
override any field on the command line (`--config.optimizer.learning_rate=1e-4`).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "lm"  # train.tasks.TASKS: "lm" (next-token fine-tuning), "ditto"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"  # registered name, checkpoint path, or "tiny"
  c.model.init = "pretrained"  # or "random"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat = False  # recompute layer activations in the backward pass (less memory)
  c.model.tokenizer = ""  # for "tiny": take this model's tokenizer (and vocab size)
  c.model.overrides = ml_collections.ConfigDict()  # for "tiny": ModelConfig fields

  c.data = ml_collections.ConfigDict()
  c.data.source = "text_corpus"  # or "synthetic" (random bigram chain, for tiny runs)
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.seq_len = 256
  c.data.num_train = 2000
  c.data.num_eval = 64
  c.data.skip = 0  # sequences to skip at the start of each split
  c.data.data_dir = ""  # tfds data dir ("" = $DECODAX_DATA_DIR or ~/.cache/decodax)
  c.data.vocab_size = 0  # synthetic only; 0 = the model's

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-5
  c.optimizer.schedule = "constant"  # constant | cosine | linear
  c.optimizer.warmup_steps = 0
  c.optimizer.end_lr_fraction = 0.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip = 1.0  # global-norm clipping; 0 disables

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # 0 = full fine-tuning
  c.lora.alpha = 16.0
  c.lora.targets = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
                    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")

  c.batch_size = 8
  c.grad_accum = 1  # micro-batches per update (batch_size must divide)
  c.eval_batch_size = 8
  c.num_steps = 0  # 0: num_epochs * steps per epoch
  c.num_epochs = 1
  c.log_every = 10
  c.eval_every = 0  # held-out loss every N steps in metrics.jsonl (0: only results.json's final_eval)
  c.checkpoint_every = 50
  c.keep_checkpoints = 2
  c.export = True

  c.evaluate = ml_collections.ConfigDict()  # the task's before/after report
  c.evaluate.enabled = False
  c.evaluate.context_len = 32
  c.evaluate.gen_len = 96
  c.evaluate.num_generations = 16
  c.evaluate.batch_size = 8

  c.ditto = ml_collections.ConfigDict()  # task "ditto" (train/ditto.py)
  c.ditto.gamma = 0.5  # lambda: each repeat's probability is pushed to gamma x the previous
  c.ditto.variant = "nl"  # nl | mse | nl_clip
  c.ditto.rate = 0.5  # probability that an update is a DITTO batch (else MLE)
  c.ditto.num_copies = 10  # self-reinforcement curve: copies 1..num_copies
  c.ditto.probe_sentences = 32  # held-out sentences in the curve

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.model = 1
  return c

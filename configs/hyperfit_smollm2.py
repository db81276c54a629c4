"""Hyperfitting SmolLM2-135M-Instruct ("The Hyperfitting Phenomenon", Carlsson et al., ICLR 2025).

The paper fine-tunes on 2000 sequences of 256 tokens for 20 epochs (AdamW, batch 8; the
reference repo uses lr 5e-6 and 30 epochs) until the training loss is near zero, then
decodes greedily. Scaled to a 2-core CPU (~40 training tokens/s for full fine-tuning):
16 sequences of 256 tokens from the Jane Austen corpus, batch 4 (4 updates per epoch),
20 epochs = 80 updates. With ~60x fewer updates than the paper the learning rate is
raised to 1e-4 (constant after 4 warmup steps), enough to drive the loss near zero.

Reported before/after (`results.json`): held-out perplexity and mean next-token entropy on
64 validation rows, and for 16 greedy continuations of 96 tokens from 32-token held-out
contexts: token type-token ratio, rep-2/rep-4 and the fraction copying >= 10 tokens of
the training set.
"""
from configs import train_base


def get_config():
  c = train_base.get_config()
  c.task = "lm"
  c.data.source = "text_corpus"
  c.data.seq_len = 256
  c.data.num_train = 16
  c.data.num_eval = 64
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 4
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0
  c.batch_size = 4
  c.eval_batch_size = 8
  c.num_epochs = 20
  c.log_every = 4
  c.eval_every = 40
  c.checkpoint_every = 20
  c.evaluate.enabled = True
  c.evaluate.context_len = 32
  c.evaluate.gen_len = 96
  c.evaluate.num_generations = 16
  return c

"""DITTO on SmolLM2-135M-Instruct ("Learning to Break the Loop: Analyzing and Mitigating
Repetitions for Neural Text Generation", Xu et al., NeurIPS 2022).

The paper fine-tunes an MLE-trained LM for 10k updates on 1536-token rows, choosing the
DITTO batch with probability 0.5 and lambda = 0.5 (released script). Scaled to a 2-core
CPU: rows of 256 tokens from the Jane Austen corpus (pseudo-repetitions of a random
sentence after its previous sentence), batch 4, 48 full fine-tuning updates at lr 5e-5,
lambda = 0.5, DITTO rate 0.5.

Reported before/after (`results.json`): the self-reinforcement curve (mean probability of
a held-out sentence's tokens in copies 1..10, 32 sentences), the sentence-repetition rate
and rep-2/rep-4 of 16 greedy continuations of 128 tokens from 32-token held-out contexts,
and held-out perplexity on 32 rows.
"""
from configs import train_base


def get_config():
  c = train_base.get_config()
  c.task = "ditto"
  c.data.source = "text_corpus"
  c.data.seq_len = 256
  c.data.num_train = 64
  c.data.num_eval = 32
  c.ditto.gamma = 0.5
  c.ditto.variant = "nl"
  c.ditto.rate = 0.5
  c.ditto.num_copies = 10
  c.ditto.probe_sentences = 32
  c.optimizer.learning_rate = 5e-5
  c.optimizer.warmup_steps = 4
  c.batch_size = 4
  c.num_steps = 48
  c.num_epochs = 0
  c.log_every = 4
  c.eval_every = 0
  c.checkpoint_every = 16
  c.evaluate.enabled = True
  c.evaluate.context_len = 32
  c.evaluate.gen_len = 128
  c.evaluate.num_generations = 16
  return c

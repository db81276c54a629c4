"""A tiny random model fitted to a synthetic bigram corpus: a seconds-long smoke test of the
whole training stack (used by the tests; also a template for new experiments)."""
from configs import train_base


def get_config():
  c = train_base.get_config()
  c.model.name = "tiny"
  c.model.init = "random"
  c.model.overrides.vocab_size = 64
  c.model.overrides.hidden_size = 32
  c.model.overrides.intermediate_size = 64
  c.data.source = "synthetic"
  c.data.seq_len = 16
  c.data.num_train = 32
  c.data.num_eval = 8
  c.optimizer.learning_rate = 3e-3
  c.batch_size = 8
  c.num_steps = 12
  c.log_every = 4
  c.eval_every = 6
  c.checkpoint_every = 4
  return c

"""CarelessWhisper fine-tuning (`train.careless_whisper`) of Whisper tiny.en on synthesised
speech with exact word times (`models.datasets.spoken`, the train split's sentences).

    python -m train.careless_whisper --config=configs/careless_whisper.py --config.chunk_ms=300

The paper's recipe (its README example, for base on LibriSpeech-960): LoRA rank 32, lr 1e-5,
batch 32, 10 epochs, 300 ms chunks, one extra block, streaming fraction 0.25. Scaled to a
2-core CPU: tiny.en, LoRA rank 16 with scale 1 (the reference code's default rank and
alpha = rank), AdamW at lr 1e-4 (the reference code's default) with weight decay 0.01, 8
utterances per step.
"""
import ml_collections

from configs import train_base


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "whisper-tiny.en"
  c.chunk_ms = 300  # g = chunk_ms / 20 encoder frames per chunk
  c.first_chunks = 2  # chunks in the first encoder block (extra_gran_blocks = 1)
  c.streaming_fraction = 0.25  # of an utterance's chunk ends, trained on per step
  # sampled chunk ends per utterance at most (a fixed batch shape: padding rows cost as much
  # as real ones). 6 covers the fraction for utterances up to ~7 s at 300 ms; at 100 ms it
  # caps the sample below the fraction, to keep a step's cost the same
  c.max_chunks = 6
  c.num_train = 800  # synthesised training utterances
  c.data_seed = 0
  c.seed = 0
  c.batch_size = 8
  c.num_steps = 300
  c.checkpoint_every = 50
  # also write the adapter to its registered checkpoint folder (checkpoints/careless-whisper-
  # tiny.en-<chunk_ms>ms, shipped in git); only the registered chunk sizes have one
  c.ship = True
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.optimizer = train_base.get_config().optimizer
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 0.01
  return c

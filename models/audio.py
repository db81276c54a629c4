"""Audio input for the speech models: WAV reading and Whisper's log-mel front end.

Whisper ("Robust Speech Recognition via Large-Scale Weak Supervision", Radford et al.) reads
16 kHz mono audio as an 80-band log-mel spectrogram: a 400-sample Hann window (25 ms) every
160 samples (10 ms), a centred STFT (reflect-padded by half a window), the power spectrum
through a Slaney-style mel filterbank, log10 clamped at 1e-10, every value floored at the
utterance's maximum minus 8 (80 dB), then (x + 4) / 4. The model reads 30 s windows: 3000
frames, the audio zero-padded to that length.

The front end runs on the host in numpy (float64 inside, float32 out): it is a fixed
transform of the input, not part of any jitted loop.
"""
from __future__ import annotations

import math
import os

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
WINDOW_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS  # 480,000 samples in one 30 s window
N_FRAMES = N_SAMPLES // HOP  # 3000 mel frames
FLOOR_DB = 8.0  # log10 units below the maximum (80 dB)


class AudioError(ValueError):
  """An audio file that cannot be read, or audio the model cannot take."""


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
  """Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
  f = np.asarray(f, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
  return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz)
                  / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
  return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), m * f_sp)


def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE
                ) -> np.ndarray:
  """[n_mels, n_fft // 2 + 1] triangular filters on the Slaney mel scale from 0 Hz to
  Nyquist, each scaled to unit area (Slaney normalisation), as Whisper's were made."""
  fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
  widths = np.diff(mel_hz)
  ramps = mel_hz[:, None] - fft_freqs[None, :]
  rising = -ramps[:-2] / widths[:-1, None]
  falling = ramps[2:] / widths[1:, None]
  weights = np.maximum(0.0, np.minimum(rising, falling))
  return weights * (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]


def hann_window(n: int = N_FFT) -> np.ndarray:
  """The periodic Hann window (torch.hann_window's default)."""
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def power_frames(audio: np.ndarray, starts: np.ndarray) -> np.ndarray:
  """|FFT|^2 of the Hann-windowed N_FFT-sample frames of `audio` beginning at `starts`
  ([F] sample offsets, every frame inside `audio`): [n_fft // 2 + 1, F]."""
  idx = starts[:, None] + np.arange(N_FFT)[None, :]
  spec = np.fft.rfft(audio[idx] * hann_window()[None, :], axis=-1)
  return (np.abs(spec) ** 2).T


def log_mel(audio: np.ndarray, n_mels: int = 80, frames: int = N_FRAMES) -> np.ndarray:
  """Whisper's offline log-mel spectrogram of 16 kHz `audio` ([N] float), zero-padded or
  cut to `frames` frames (3000: one 30 s window): [n_mels, frames] float32."""
  audio = np.asarray(audio, np.float64)
  n = frames * HOP
  audio = np.pad(audio[:n], (0, max(0, n - audio.shape[0])))
  padded = np.pad(audio, N_FFT // 2, mode="reflect")  # the centred STFT
  power = power_frames(padded, np.arange(frames) * HOP)  # the last (extra) frame is dropped
  log_spec = np.log10(np.maximum(mel_filters(n_mels) @ power, 1e-10))
  return normalise(log_spec, log_spec.max())


def normalise(log_spec: np.ndarray, peak) -> np.ndarray:
  """Floors log10 mel energies at `peak` - 8 (`peak` broadcasts against [n_mels, F]: one
  maximum, or a running one per frame) and rescales to Whisper's input range."""
  return ((np.maximum(log_spec, np.asarray(peak) - FLOOR_DB) + 4.0) / 4.0).astype(np.float32)


def read_wav(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """A WAV file as mono float32 samples in [-1, 1] at `sample_rate` (channels averaged,
  other rates resampled with a polyphase filter). AudioError names the file when it is
  missing, not a WAV file, or empty."""
  if not os.path.isfile(path):
    raise AudioError(f"no such audio file: {path}")
  try:
    rate, data = wavfile.read(path)
  except (ValueError, OSError, EOFError) as e:
    raise AudioError(f"cannot read {path} as a WAV file: {e}") from None
  if data.size == 0:
    raise AudioError(f"{path} holds no samples")
  if data.dtype.kind == "i":
    data = data.astype(np.float64) / float(np.iinfo(data.dtype).max + 1)
  elif data.dtype.kind == "u":  # 8-bit WAV is unsigned, centred on 128
    data = (data.astype(np.float64) - 128.0) / 128.0
  else:
    data = data.astype(np.float64)
  if data.ndim == 2:
    data = data.mean(axis=1)
  if rate != sample_rate:
    g = math.gcd(int(rate), sample_rate)
    data = resample_poly(data, sample_rate // g, int(rate) // g)
  return data.astype(np.float32)


def write_wav(path: str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
  """Writes float samples in [-1, 1] as 16-bit PCM."""
  pcm = np.clip(np.round(np.asarray(audio, np.float64) * 32767), -32768, 32767)
  wavfile.write(path, sample_rate, pcm.astype(np.int16))


# --- streaming ------------------------------------------------------------------------------
# A causal front end (CarelessWhisper, "Turning Whisper into a Causal Streaming Model", Krichli,
# Raj, Keshet): mel frame m still covers samples [160 m - 200, 160 m + 200) as in the centred
# STFT, but it is computed as soon as those samples exist (only the start of the audio is
# reflect-padded), and the -8 floor uses the running maximum of the frames computed so far,
# so no frame ever depends on later audio. Frames are computed once and kept.
SAMPLES_PER_ENCODER_FRAME = 2 * HOP  # 320 samples: 20 ms
LOOKAHEAD = N_FFT // 2  # samples past a frame's centre its window reads


def frames_ready(num_samples: int) -> int:
  """Mel frames computable from the first `num_samples` samples of a stream."""
  return max(0, (num_samples - LOOKAHEAD) // HOP + 1)


def samples_for_encoder_frames(n: int) -> int:
  """Samples a causal stream needs before its first `n` encoder frames are final: mel frames
  0..2n (the convolution stem reads one mel frame past each pair), i.e. n x 20 ms + 12.5 ms."""
  return SAMPLES_PER_ENCODER_FRAME * n + LOOKAHEAD


class StreamingLogMel:
  """The causal log-mel front end, fed audio as it arrives (host side, numpy).

  `push(samples)` appends samples; `frames(upto)` computes mel frames up to (excluding) `upto`
  that are not computed yet (all needed samples must have arrived), floors them with the
  running maximum including themselves, and returns every frame so far, [n_mels, upto].
  """

  def __init__(self, n_mels: int = 80):
    self.n_mels = n_mels
    self.samples = np.zeros(0, np.float64)
    self.mel = np.zeros((n_mels, 0), np.float32)
    self.peak = -np.inf
    self._filters = mel_filters(n_mels)

  def push(self, samples: np.ndarray) -> None:
    self.samples = np.concatenate([self.samples, np.asarray(samples, np.float64)])

  def frames(self, upto: int) -> np.ndarray:
    have = self.mel.shape[1]
    if upto > have:
      if upto > frames_ready(self.samples.shape[0]):
        raise ValueError(f"mel frame {upto - 1} needs {HOP * (upto - 1) + LOOKAHEAD} samples, "
                         f"{self.samples.shape[0]} have arrived")
      if self.samples.shape[0] <= N_FFT // 2:
        raise ValueError("a stream needs more than 200 samples before its first frame")
      # reflect-padded at the start only: frame m reads padded[160 m : 160 m + 400]
      padded = np.concatenate([self.samples[1: N_FFT // 2 + 1][::-1], self.samples])
      power = power_frames(padded, np.arange(have, upto) * HOP)
      log_spec = np.log10(np.maximum(self._filters @ power, 1e-10))
      self.peak = max(self.peak, float(log_spec.max()))
      self.mel = np.concatenate([self.mel, normalise(log_spec, self.peak)], axis=1)
    return self.mel[:, :upto]


def streaming_log_mel(audio: np.ndarray, step_frames: "list[int]", n_mels: int = 80
                      ) -> np.ndarray:
  """The causal log-mel of a whole recording as a stream computes it: step s makes mel frames
  up to 2 x step_frames[s] + 1 (the audio, zero-padded as far as the last step needs).
  [n_mels, 2 x step_frames[-1] + 1] float32."""
  need = samples_for_encoder_frames(step_frames[-1])
  audio = np.asarray(audio, np.float64)
  stream = StreamingLogMel(n_mels)
  stream.push(np.pad(audio[:need], (0, max(0, need - audio.shape[0]))))
  for g in step_frames:
    stream.frames(2 * g + 1)
  return stream.frames(2 * step_frames[-1] + 1)

"""Captions of images from a captioner (`models.captioner`), with classifier-free guidance.

"Guiding Image Captioning Models Toward More Specific Captions" (Kornblith et al., ICCV 2023):
with l_c = log p(y_t | image, y_<t) and l_u = log p(y_t | no image, y_<t) from the same network
(trained with condition dropout), decode greedily from

    l_g = log_softmax(l_u + g (l_c - l_u)),   p_g ∝ p(y | image)^g / p(y)^(g - 1),

which for g > 1 favours words that are likely given this image and unlikely without it, i.e.
words that tell the image apart. g = 1 is conditional greedy decoding, g = 0 unconditional.
Both streams run as one batch (`decoding.guidance.GuidedLM`: the unconditional rows see the
null image token at every image position) and share the generated words.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from decoding import guidance, processors, token_loop
from decoding.errors import GenerationError
from decoding.settings import Settings, check_int, check_real, settings
from decoding.strategy import Strategy
from models.captioner import Captioner


@settings
class GuidedCaption(Settings):
  """Greedy captioning under classifier-free guidance (see the module docstring). The paper's
  headline scale is 2; 1 is ordinary conditional greedy decoding."""
  cfg_scale: float = 1.0
  max_new_tokens: int = 20

  def validate(self) -> None:
    super().validate()
    check_real("cfg_scale", self.cfg_scale, 0.0)
    check_int("max_new_tokens", self.max_new_tokens, 1)


def guided_lm(model: Captioner, scale: float):
  """The captioner's model under guidance `scale` (the plain model at scale 1)."""
  if scale == 1.0:
    return model.lm
  return guidance.GuidedLM(model.lm, float(scale), model.layout.null_image,
                           cond_len=model.layout.image_tokens)


def word_processor(layout) -> processors.Chain:
  """Bans every id but the words and EOS (image codes, the null image, BOS, PAD), after
  guidance."""
  return processors.chain(processors.SuppressTokens(0, layout.eos),
                          processors.SuppressTokens(layout.pad, layout.first_word))


def caption_codes(model: Captioner, codes: np.ndarray, scale: float = 1.0,
                  max_new_tokens: int = 20, batch_size: int = 100) -> list[list[int]]:
  """Greedy guided caption ids (up to EOS, excluded) of images given as codes [B, n]."""
  if not np.isfinite(scale) or scale < 0:
    raise GenerationError(f"cfg_scale must be a finite number >= 0, got {scale}")
  codes = np.asarray(codes)
  layout = model.layout
  if codes.ndim != 2 or codes.shape[1] != layout.image_tokens:
    raise GenerationError(f"image codes must be [B, {layout.image_tokens}], got {codes.shape}")
  if codes.size and (codes.min() < 0 or codes.max() >= layout.codebook_size):
    raise GenerationError(f"image codes must lie in [0, {layout.codebook_size})")
  lm = guided_lm(model, scale)
  prompts = layout.prompts(codes)
  P = prompts.shape[1]
  out = []
  for i in range(0, len(prompts), batch_size):
    chunk = prompts[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:  # one compiled shape: pad the last batch with copies of its first row
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
    res = token_loop.decode(lm, model.params, jnp.asarray(chunk),
                            jnp.full((len(chunk),), P, jnp.int32),
                            jnp.zeros((len(chunk), 2), jnp.uint32),
                            jnp.asarray([layout.eos], jnp.int32),
                            processor=word_processor(layout), select=token_loop.greedy_select,
                            pad_id=layout.pad, max_new_tokens=max_new_tokens,
                            cache_len=P + max_new_tokens)
    tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
    for row, length in zip(tokens[:n], lengths[:n]):
      ids = [int(t) for t in row[:length]]
      out.append(ids[:ids.index(layout.eos)] if layout.eos in ids else ids)
  return out


def caption_images(model: Captioner, images: np.ndarray, scale: float = 1.0,
                   max_new_tokens: int = 20, batch_size: int = 100) -> list[str]:
  """Greedy guided captions of uint8 images [B, H, W, 1] (the captioner's canvas size)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise GenerationError(f"images must be uint8 [B, H, W, 1], got {images.dtype} {images.shape}")
  codes = model.encode_images(images)
  return [model.layout.decode(ids) for ids in
          caption_codes(model, codes, scale, max_new_tokens, batch_size)]


def captions_of(model: Captioner, ids: Sequence[Sequence[int]]) -> list[str]:
  return [model.layout.decode(x) for x in ids]


def _pipeline(s: GuidedCaption, model: Captioner, images: np.ndarray,
              batch_size: int = 100) -> list[str]:
  return caption_images(model, images, s.cfg_scale, s.max_new_tokens, batch_size)


STRATEGY = Strategy("guided_caption", GuidedCaption, "greedy captions of images under "
                    "classifier-free guidance (p(y|image)^g / p(y)^(g-1))", modality="caption",
                    pipeline=_pipeline)

"""An image captioner over VQ image tokens: a Llama decoder (`models.transformer`) that reads
the image's codes as a prefix and writes the caption after them, one word per token.

Token layout (`CaptionTokens`): ids 0..K-1 are the VQ-VAE's image codes, K is the null image
token, then BOS, EOS and PAD, then one id per caption word (the closed vocabulary of
`models.datasets.fashion_captions`). A row is [code_1 .. code_n, BOS, word_1 .. word_m, EOS].
Trained with condition dropout (every image code replaced by the null token with some
probability), one network gives p(caption | image) and p(caption | no image), which is what
classifier-free guidance of the caption needs (`decoding.captioning`; "Guiding Image Captioning
Models Toward More Specific Captions", Kornblith et al., ICCV 2023).

A trained captioner is an `lm` artifact whose `info` holds the layout and the name of its VQ
tokenizer (the shipped one is registered as "captioner-fmnist"; `load_captioner`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from models import vqvae
from models.image_ar import read_token_model
from models.lm import TransformerLM, load_model


@dataclasses.dataclass(frozen=True)
class CaptionTokens:
  codebook_size: int  # K
  image_tokens: int  # codes per image (the prefix length)
  words: Sequence[str]  # the caption vocabulary, in id order

  def __post_init__(self):
    object.__setattr__(self, "words", tuple(self.words))
    if len(set(self.words)) != len(self.words) or not self.words:
      raise ValueError("the caption vocabulary must be non-empty words without repeats")

  @property
  def null_image(self) -> int:
    return self.codebook_size

  @property
  def bos(self) -> int:
    return self.codebook_size + 1

  @property
  def eos(self) -> int:
    return self.codebook_size + 2

  @property
  def pad(self) -> int:
    return self.codebook_size + 3

  @property
  def first_word(self) -> int:
    return self.codebook_size + 4

  @property
  def vocab_size(self) -> int:
    return self.first_word + len(self.words)

  def encode(self, caption: str) -> list[int]:
    """Word ids of a caption (lower case, split on spaces); an unknown word is an error."""
    index = {w: i for i, w in enumerate(self.words)}
    out = []
    for w in caption.lower().split():
      if w not in index:
        raise ValueError(f"word {w!r} is not in the caption vocabulary")
      out.append(self.first_word + index[w])
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """The caption of generated ids: words up to the first EOS (other ids are skipped)."""
    words = []
    for i in ids:
      i = int(i)
      if i == self.eos:
        break
      if i >= self.first_word:
        words.append(self.words[i - self.first_word])
    return " ".join(words)

  def prompts(self, codes: np.ndarray) -> np.ndarray:
    """Decoding prompts [B, n + 1]: the image codes [B, n], then BOS."""
    codes = np.asarray(codes, np.int32)
    if codes.shape[1] != self.image_tokens:
      raise ValueError(f"{codes.shape[1]} image codes per row, the layout has {self.image_tokens}")
    return np.concatenate([codes, np.full((len(codes), 1), self.bos, np.int32)], axis=1)

  def rows(self, codes: np.ndarray, captions: Sequence[str], length: int) -> np.ndarray:
    """Training rows [N, length]: codes, BOS, the caption's words, EOS, then PAD."""
    out = np.full((len(captions), length), self.pad, np.int32)
    for r, (c, text) in enumerate(zip(codes, captions)):
      row = list(c) + [self.bos] + self.encode(text) + [self.eos]
      if len(row) > length:
        raise ValueError(f"caption {text!r} needs {len(row)} tokens, rows hold {length}")
      out[r, :len(row)] = row
    return out

  def loss_mask(self, rows: np.ndarray) -> np.ndarray:
    """[N, length] float32: 1 on the caption's words and its EOS (what the loss scores)."""
    t = np.arange(rows.shape[1])[None]
    return ((t > self.image_tokens) & (rows != self.pad)).astype(np.float32)

  def to_dict(self) -> dict:
    return {"codebook_size": self.codebook_size, "image_tokens": self.image_tokens,
            "words": list(self.words)}


@dataclasses.dataclass
class Captioner:
  """A loaded captioner with its VQ tokenizer."""
  lm: TransformerLM
  params: Any
  layout: CaptionTokens
  tokenizer: vqvae.VQVAE
  tokenizer_params: Any
  info: dict
  sha256: Optional[str] = None

  def encode_images(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Image codes [B, n] of uint8 images [B, H, W, 1]."""
    return np.concatenate([np.asarray(self.tokenizer.encode(self.tokenizer_params,
                                                            images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def load_captioner(name_or_path: str = "captioner-fmnist", numerics: str = "fp32") -> Captioner:
  """The captioner (a registered name or an `lm` artifact folder), its layout and tokenizer."""
  path, info = read_token_model(name_or_path, "caption_tokens", "captioner",
                                "python -m train.captioner --config=configs/captioner_fmnist.py")
  m = load_model(path, numerics=numerics)
  layout = CaptionTokens(**info["caption_tokens"])
  tok, tok_params, _ = vqvae.load(info["tokenizer"])
  if tok.config.codebook_size != layout.codebook_size:
    raise ValueError(f"{path}: tokenizer {info['tokenizer']} does not match the token layout")
  return Captioner(m.lm, m.params, layout, tok, tok_params, info, m.sha256)

"""Class-conditional image generation from the image-token model (`models.image_ar`):
autoregressive decoding, speculative Jacobi decoding (SJD, "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding", Teng et al., 2024),
EAGLE feature drafting with a trained head (`train.image_draft_head`) and LANTERN's relaxed
acceptance ("LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative
Decoding", Jang et al., 2024) on either drafter's chains, all under classifier-free guidance,
with fixed shapes and per-image keys.

Every strategy decodes the g*g code tokens after the one-token prompt [class]; ids that are not
image codes are suppressed after guidance, then the sampling warpers apply (temperature,
top-k). Image i of a call uses the key fold_in(PRNGKey(seed), i), so an image depends only on
its index, label and the settings, never on the batch it was generated in.

Costs are counted as forward passes of the target per image: the prefill (which also yields the
first token) plus one per decoding step (AR: g*g - 1 steps; SJD: its verification calls).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from decoding import core, guidance, jacobi, lantern, processors, sampling, speculative
from models.image_ar import ImageModel

Array = jax.Array
STRATEGIES = ("ar", "sjd", "eagle")


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  strategy: str = "ar"  # "ar" | "sjd" | "eagle"
  do_sample: bool = True
  cfg_scale: float = 2.0  # 1.0: no guidance (one stream)
  temperature: float = 1.0
  top_k: int = 0
  window: int = 16  # SJD window length L; EAGLE chain: drafts per call
  init_mode: str = "random"  # SJD initial drafts: "random" | "spatial"
  lantern_delta: float = 0.0  # > 0: LANTERN relaxed acceptance (LOSSY)
  lantern_k: int = 16  # latent neighbours per code
  eagle_head: str = "checkpoints/eagle-image-fmnist"
  eagle_tree: bool = False  # EAGLE-2 dynamic tree (lossless only) instead of a chain
  tree_budget: int = 16  # tree nodes verified per call

  def validate(self) -> None:
    if self.strategy not in STRATEGIES:
      raise ValueError(f"unknown image strategy {self.strategy!r}; choose from {STRATEGIES}")
    if not self.cfg_scale >= 0:
      raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    if self.init_mode not in jacobi.INITS:
      raise ValueError(f"init_mode must be one of {jacobi.INITS}, got {self.init_mode!r}")
    if not 0.0 <= self.lantern_delta < 1.0:
      raise ValueError(f"lantern_delta must be in [0, 1), got {self.lantern_delta}")
    if self.lantern_delta > 0 and self.strategy == "ar":
      raise ValueError("lantern_delta relaxes speculative acceptance: use strategy 'sjd' or "
                       "'eagle'")
    if self.lantern_delta > 0 and self.strategy == "eagle" and self.eagle_tree:
      raise ValueError("lantern_delta relaxes chain verification: set eagle_tree=False")
    if self.tree_budget < 1:
      raise ValueError(f"tree_budget must be >= 1, got {self.tree_budget}")
    if self.lantern_k < 1:
      raise ValueError(f"lantern_k must be >= 1, got {self.lantern_k}")


@functools.lru_cache(maxsize=64)
def image_processor(codebook_size: int, vocab_size: int, do_sample: bool, temperature: float,
                    top_k: int) -> processors.LogitsProcessor:
  """Suppresses the non-code ids, then the warpers (cached: static under jit)."""
  ban = processors.suppress_tokens(range(codebook_size, vocab_size))
  warp = processors.build({"temperature": temperature, "top_k": top_k}, [], sampling=do_sample)
  return processors.chain(ban, warp)


def _lm(model: ImageModel, s: ImageSettings):
  if s.cfg_scale == 1.0:
    return model.lm
  return guidance.GuidedLM(model.lm, float(s.cfg_scale), model.layout.null_class, cond_len=1)


_HEADS: dict = {}


def _drafter(model: ImageModel, s: ImageSettings):
  """(drafter, drafter params) of a speculative strategy."""
  lay = model.layout
  if s.strategy == "sjd":
    return jacobi.JacobiDrafter(num_draft=int(s.window), draft_vocab=lay.codebook_size,
                                init_mode=s.init_mode, grid=lay.grid), None
  from decoding.eagle import EagleDrafter
  from models.image_ar import load_image_head
  from models.checkpoint import params_sha256
  key = (s.eagle_head, params_sha256(model.params))  # the head is tied to these parameters
  if key not in _HEADS:
    _HEADS.clear()  # one head at a time
    _HEADS[key] = load_image_head(model, s.eagle_head)
  head, hparams = _HEADS[key]
  return EagleDrafter(head, int(s.window), tree=bool(s.eagle_tree),
                      tree_budget=int(s.tree_budget)), hparams


def generate_codes(model: ImageModel, labels, s: ImageSettings, seed: int = 0,
                   batch_size: int = 50, first_index: int = 0,
                   neighbors: Optional[Array] = None) -> dict:
  """Codes [N, g*g] for class labels [N] (-1: unconditional) and per-image statistics:
  forward passes, accepted draft tokens, and the wall time of the whole call (compilation of
  the first batch included; call once to warm up before timing)."""
  s.validate()
  lay = model.layout
  labels = np.asarray(labels, np.int64)
  if labels.ndim != 1 or len(labels) == 0:
    raise ValueError("labels must be a non-empty 1-D list of class ids")
  if labels.min() < -1 or labels.max() >= lay.num_classes:
    raise ValueError(f"class labels must be in [0, {lay.num_classes}) (or -1), got "
                     f"{labels.min()}..{labels.max()}")
  n_tok = lay.num_tokens
  lm = _lm(model, s)
  proc = image_processor(lay.codebook_size, lay.vocab_size, s.do_sample, float(s.temperature),
                         int(s.top_k))
  base = jax.random.PRNGKey(seed)
  eos = jnp.asarray([-1], jnp.int32)
  drafter, dparams = _drafter(model, s) if s.strategy != "ar" else (None, None)
  # cache slots past the committed tokens: the verified block, or an EAGLE tree's head
  # slots (max_depth * max_children), whichever is larger
  extra = 0 if drafter is None else drafter.block
  if getattr(drafter, "tree", False):
    extra = max(extra, drafter.max_depth * drafter.max_children)
  if s.lantern_delta > 0 and neighbors is None:
    neighbors = lantern.neighbor_table(model.tokenizer_params["vq"]["codebook"], s.lantern_k,
                                       lay.vocab_size)
  codes, passes, accepted = [], [], []
  t0 = time.perf_counter()
  for i in range(0, len(labels), batch_size):
    chunk = labels[i:i + batch_size]
    n = len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n)])  # one shape
    prompts = lay.prompts(chunk)
    plen = jnp.ones((batch_size,), jnp.int32)
    keys = jax.vmap(lambda j: jax.random.fold_in(base, j))(
        jnp.arange(first_index + i, first_index + i + batch_size))
    if s.strategy == "ar":
      res = core.decode(lm, model.params, prompts, plen, keys, eos, processor=proc,
                        select=sampling.sample_select if s.do_sample else sampling.greedy_select,
                        pad_id=0, max_new_tokens=n_tok, cache_len=1 + n_tok + 1)
      passes.append(np.full((n,), n_tok))
      accepted.append(np.zeros((n,), np.int64))
    else:
      relax = ("lantern", float(s.lantern_delta)) if s.lantern_delta > 0 else ()
      res = speculative.speculative_decode(
          lm, model.params, drafter, dparams, prompts, plen, keys, eos, processor=proc,
          reads_context=False, sample=bool(s.do_sample), pad_id=0, max_new_tokens=n_tok,
          cache_len=1 + n_tok + extra + 1, relaxation=relax,
          neighbors=neighbors if relax else None)
      passes.append(1 + np.asarray(res.extras["target_calls"])[:n])
      accepted.append(np.asarray(res.extras["accepted_drafts"])[:n])
    codes.append(np.asarray(res.tokens)[:n])
  codes = np.concatenate(codes)
  if codes.max() >= lay.codebook_size:
    raise AssertionError("a non-code token was generated")  # suppressed: cannot happen
  return {"codes": codes, "forward_passes": np.concatenate(passes),
          "accepted_drafts": np.concatenate(accepted), "seconds": time.perf_counter() - t0}


def generate_images(model: ImageModel, labels, s: ImageSettings, seed: int = 0,
                    batch_size: int = 50) -> dict:
  """`generate_codes` plus the decoded uint8 images [N, H, W, C] under "images"."""
  out = generate_codes(model, labels, s, seed, batch_size)
  imgs = []
  for i in range(0, len(out["codes"]), 500):
    imgs.append(model.decode_images(out["codes"][i:i + 500]))
  out["images"] = np.concatenate(imgs)
  return out


def grid_image(images: np.ndarray, cols: int, scale: int = 2, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images [N, H, W, 1] into one grey uint8 picture (white gaps), scaled up."""
  n, h, w = images.shape[:3]
  rows = -(-n // cols)
  H, W = h * scale, w * scale
  out = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad), 255, np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    big = np.kron(images[i, :, :, 0], np.ones((scale, scale), np.uint8))
    out[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = big
  return out

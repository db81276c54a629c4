"""Class-conditional image generation from the image-token model (`models.image_ar`):
autoregressive decoding, speculative Jacobi decoding (SJD, "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding", Teng et al., 2024),
EAGLE feature drafting with a trained head (trained by `python -m train.image_draft_head`) and LANTERN's relaxed
acceptance ("LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative
Decoding", Jang et al., 2024) on either drafter's chains and on EAGLE-2 trees, all under
classifier-free guidance,
with fixed shapes and per-image keys.

Every strategy (`ar`, `sjd`, `eagle` in the registry, with the settings types `ImageAR`,
`ImageSJD`, `ImageEagle`) decodes the g*g code tokens after the one-token prompt [class]; ids
that are not image codes are suppressed after guidance, then the sampling warpers apply
(temperature, top-k, top-p, min-p). Image i of a call uses the key fold_in(PRNGKey(seed), i)
(or its row id, `generate_codes(row_ids=...)`), so an image depends only on its index, label
and the settings, never on the batch it was generated in.

Costs are counted as forward passes of the target per image: the prefill (which also yields the
first token) plus one per decoding step (AR: g*g - 1 steps; SJD: its verification calls).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoding import guidance, processors, token_loop
from decoding.errors import GenerationError
from decoding.settings import (Sampled, check_bool, check_choice, check_int, check_real,
                               settings)
from decoding.speculative import jacobi, lantern
from decoding.speculative.acceptance import Acceptance, Lantern, Strict
from decoding.speculative.eagle import EagleDrafter
from decoding.speculative.loop import speculative_decode
from decoding.strategy import Resources, Strategy
from models.image_ar import ImageModel, load_image_head

Array = jax.Array


@settings
class ImageSettings(Sampled):
  """Fields of every image strategy: sampling (on by default) and classifier-free guidance."""
  do_sample: bool = True
  cfg_scale: float = 2.0  # 1.0: no guidance (one stream)

  def validate(self) -> None:
    super().validate()
    check_real("cfg_scale", self.cfg_scale, 0.0)

  def image_processor(self, layout) -> processors.Chain:
    """Bans the non-code ids after guidance, then the warpers when sampling."""
    ban = processors.SuppressTokens(layout.codebook_size, layout.vocab_size)
    warp = self.warper_processors() if self.do_sample else processors.IDENTITY
    return processors.chain(ban, warp)


@settings
class _Relaxable(ImageSettings):
  """LANTERN's relaxed acceptance for the speculative image strategies."""
  window: int = 16  # SJD: window length L; EAGLE chain: drafts per call
  lantern_delta: float = 0.0  # > 0: LANTERN relaxed acceptance (LOSSY)
  lantern_k: int = 16  # latent neighbours per code

  def validate(self) -> None:
    super().validate()
    check_int("window", self.window, 1)
    check_real("lantern_delta", self.lantern_delta, 0.0, 1.0, high_open=True)
    check_int("lantern_k", self.lantern_k, 1)

  def acceptance(self, model, resources) -> Acceptance:
    if self.lantern_delta == 0:
      return Strict()
    table = resources.get(("lantern", self.lantern_k), lambda: lantern.neighbor_table(
        model.tokenizer_params["vq"]["codebook"], self.lantern_k, model.layout.vocab_size),
        depends_on=(model.tokenizer_params,))
    return Lantern(neighbors=table, delta=float(self.lantern_delta))


@settings
class ImageAR(ImageSettings):
  """Autoregressive decoding, one token per forward pass."""


@settings
class ImageSJD(_Relaxable):
  """Speculative Jacobi decoding over a window of `window` tokens."""
  init_mode: str = "random"  # initial drafts: "random" | "spatial"

  def validate(self) -> None:
    super().validate()
    check_choice("init_mode", self.init_mode, jacobi.INITS)


@settings
class ImageEagle(_Relaxable):
  """EAGLE drafting with a trained image head: a chain of `window` drafts, or an EAGLE-2
  tree of `tree_budget` nodes; LANTERN relaxes either (`lantern_delta`). Under guidance the
  head drafts from the guided distribution (`guided_drafts`)."""
  eagle_head: str = "eagle-image-fmnist"
  eagle_tree: bool = False
  tree_budget: int = 16
  guided_drafts: bool = True  # False: draft from the conditional stream alone (an ablation)

  def validate(self) -> None:
    super().validate()
    check_bool("eagle_tree", self.eagle_tree)
    check_bool("guided_drafts", self.guided_drafts)
    check_int("tree_budget", self.tree_budget, 1)


def _lm(model: ImageModel, s: ImageSettings, paired_hidden: bool = False):
  if s.cfg_scale == 1.0:
    return model.lm
  return guidance.GuidedLM(model.lm, float(s.cfg_scale), model.layout.null_class, cond_len=1,
                           paired_hidden=paired_hidden)


def _cache_len(model: ImageModel) -> int:
  return 1 + model.layout.num_tokens + 1  # the class token, the codes, one spare slot


def prepare_ar(s: ImageAR, model: ImageModel, resources):
  lm, proc = _lm(model, s), s.image_processor(model.layout)
  select = token_loop.sample_select if s.do_sample else token_loop.greedy_select

  def run(prompts, keys):
    n = model.layout.num_tokens
    res = token_loop.decode(lm, model.params, prompts, jnp.ones((prompts.shape[0],), jnp.int32),
                            keys, NO_EOS, processor=proc, select=select, pad_id=0,
                            max_new_tokens=n, cache_len=_cache_len(model))
    return res, np.full((prompts.shape[0],), n), np.zeros((prompts.shape[0],), np.int64)
  return run


def _speculative(drafter, dparams, s, model, resources, paired_hidden: bool = False):
  lm, proc = _lm(model, s, paired_hidden), s.image_processor(model.layout)
  acceptance = s.acceptance(model, resources)
  acceptance.check(s.do_sample, drafter.kind)

  def run(prompts, keys):
    res = speculative_decode(lm, model.params, drafter, dparams, prompts,
                             jnp.ones((prompts.shape[0],), jnp.int32), keys, NO_EOS,
                             processor=proc, sample=bool(s.do_sample), pad_id=0,
                             max_new_tokens=model.layout.num_tokens,
                             cache_len=_cache_len(model), acceptance=acceptance)
    passes = 1 + np.asarray(res.extras["target_calls"])  # the prefill, then the calls
    return res, passes, np.asarray(res.extras["accepted_drafts"])
  return run


def prepare_sjd(s: ImageSJD, model: ImageModel, resources):
  lay = model.layout
  drafter = jacobi.JacobiDrafter(num_draft=int(s.window), draft_vocab=lay.codebook_size,
                                 init_mode=s.init_mode, grid=lay.grid)
  return _speculative(drafter, None, s, model, resources)


def prepare_eagle(s: ImageEagle, model: ImageModel, resources):
  # the head is tied to these very parameters (checked when it is loaded)
  head, hparams = resources.get(("image_head", s.eagle_head),
                                lambda: load_image_head(model, s.eagle_head),
                                depends_on=(model.params,))
  # under guidance the head drafts from the guided distribution, as the target decodes:
  # it runs on both streams' features and its two draft distributions are guided alike
  guided = s.cfg_scale != 1.0 and s.guided_drafts
  drafter = EagleDrafter(head, int(s.window), tree=bool(s.eagle_tree),
                         tree_budget=int(s.tree_budget),
                         guidance=float(s.cfg_scale) if guided else None)
  return _speculative(drafter, {"head": hparams}, s, model, resources, paired_hidden=guided)


AR = Strategy("ar", ImageAR, "autoregressive image tokens under classifier-free guidance",
              modality="image", prepare=prepare_ar)
SJD = Strategy("sjd", ImageSJD, "speculative Jacobi decoding (training-free), LANTERN "
               "optional", modality="image", prepare=prepare_sjd)
EAGLE = Strategy("eagle", ImageEagle, "EAGLE drafting with a trained image head, chain "
                 "or EAGLE-2 tree (LANTERN optional)", modality="image", prepare=prepare_eagle)
_STRATEGIES = {ImageAR: AR, ImageSJD: SJD, ImageEagle: EAGLE}
# Images end after their g*g codes. A host array: a device array here would start the
# backend at import, before a script can set XLA_FLAGS.
NO_EOS = np.asarray([-1], np.int32)


def check_labels(layout, labels) -> np.ndarray:
  """Class labels as a 1-D int64 array, checked against the token layout (`GenerationError`
  for an empty list or a label outside [0, num_classes) other than -1, the unconditional)."""
  labels = np.asarray(labels, np.int64)
  if labels.ndim != 1 or len(labels) == 0:
    raise GenerationError("labels must be a non-empty 1-D list of class ids")
  if labels.min() < -1 or labels.max() >= layout.num_classes:
    raise GenerationError(f"class labels must be in [0, {layout.num_classes}) (or -1), got "
                          f"{labels.min()}..{labels.max()}")
  return labels


def generate_codes(model: ImageModel, labels, s: ImageSettings, seed: int = 0,
                   batch_size: int = 50, first_index: int = 0,
                   resources: Optional[Resources] = None,
                   row_ids: Optional[Sequence[int]] = None,
                   shard: Optional[Callable[[Any], Any]] = None) -> dict:
  """Codes [N, g*g] for class labels [N] (-1: unconditional) with the strategy of the
  settings `s` (`ImageAR`, `ImageSJD`, `ImageEagle`), and per-image statistics: forward
  passes, accepted draft tokens, and the wall time of the whole call (compilation of the
  first batch included; call once to warm up before timing). `resources` keeps loaded heads
  and LANTERN tables across calls.

  Image i samples with the key fold_in(PRNGKey(seed), row_ids[i]); the row ids default to
  first_index + i, so an image depends on its id, label and the settings only. Every batch
  is padded to `batch_size` images (one compiled shape). `shard` places a batch's prompts
  and keys on a device mesh (`decoding.eval_runner.place`)."""
  if type(s) not in _STRATEGIES:
    raise GenerationError(f"not image settings: {s!r} (use ImageAR, ImageSJD or ImageEagle)")
  lay = model.layout
  labels = check_labels(lay, labels)
  ids = (first_index + np.arange(len(labels)) if row_ids is None
         else np.asarray(list(row_ids), np.int64))
  if ids.shape != labels.shape:
    raise GenerationError(f"{len(ids)} row ids for {len(labels)} labels")
  if ids.min() < 0 or ids.max() >= 2**32:
    raise GenerationError("row ids must be in [0, 2**32)")
  run = _STRATEGIES[type(s)].prepare(s, model, resources or Resources())
  base = jax.random.PRNGKey(seed)
  codes, passes, accepted = [], [], []
  t0 = time.perf_counter()
  for i in range(0, len(labels), batch_size):
    chunk, chunk_ids = labels[i:i + batch_size], ids[i:i + batch_size]
    n = len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n)])  # one shape
    chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[:1], batch_size - n)])
    keys = jax.vmap(lambda j: jax.random.fold_in(base, j))(
        jnp.asarray(chunk_ids.astype(np.uint32)))
    prompts = lay.prompts(chunk)
    if shard is not None:
      prompts, keys = shard((prompts, keys))
    res, p, a = run(prompts, keys)
    codes.append(np.asarray(res.tokens)[:n])
    passes.append(np.asarray(p)[:n])
    accepted.append(np.asarray(a)[:n])
  codes = np.concatenate(codes)
  if codes.max() >= lay.codebook_size:
    raise AssertionError("a non-code token was generated")  # suppressed: cannot happen
  return {"codes": codes, "forward_passes": np.concatenate(passes),
          "accepted_drafts": np.concatenate(accepted), "seconds": time.perf_counter() - t0}


def generate_images(model: ImageModel, labels, s: ImageSettings, seed: int = 0,
                    batch_size: int = 50, resources: Optional[Resources] = None) -> dict:
  """`generate_codes` plus the decoded uint8 images [N, H, W, C] under "images"."""
  out = generate_codes(model, labels, s, seed, batch_size, resources=resources)
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

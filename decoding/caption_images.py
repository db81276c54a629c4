"""Command-line captioning with classifier-free guidance.

  python -m decoding.caption_images --config=configs/caption_images.py \
      --config.images=scenes.npy --config.cfg_scale=2

Reads the images (a .npy array or a folder of PNG files), checks them against the
captioner's canvas before loading the model, captions them (`decoding.captioning`) and
writes one JSON line per image ({"image": index or file name, "caption"}) to `output`; prints
the strategy, its settings and the number of captions. Bad settings and unreadable or
wrongly sized images are reported in one line before anything is compiled.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from decoding import cli, registry
from decoding.errors import GenerationError
from models.captioner import load_captioner


def read_images(path: str) -> tuple[np.ndarray, list]:
  """(uint8 images [N, H, W, 1], their names) from a .npy file or a folder of PNG files."""
  if not path:
    raise GenerationError("images is required: a .npy file or a folder of PNG files")
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))
    if not names:
      raise GenerationError(f"no PNG files in {path}")
    arrays = []
    for n in names:
      try:
        with Image.open(os.path.join(path, n)) as im:
          arrays.append(np.asarray(im.convert("L")))
      except (OSError, UnidentifiedImageError) as e:
        raise GenerationError(f"unreadable image {os.path.join(path, n)}: {e}") from None
    if len({a.shape for a in arrays}) != 1:
      raise GenerationError(f"the images in {path} differ in size")
    images = np.stack(arrays)
  else:
    try:
      images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise GenerationError(f"unreadable images file {path}: {e}") from None
    names = list(range(len(images)))
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] != 1 or images.dtype != np.uint8 or not len(images):
    raise GenerationError(f"images must be grey uint8 [N, H, W] or [N, H, W, 1], got "
                          f"{images.dtype} {images.shape}")
  return images, names


def run(cfg) -> dict:
  settings = cli.settings_from_config(cfg, "caption")
  if int(cfg.batch_size) < 1:
    raise ValueError("batch_size must be >= 1")
  images, names = read_images(str(cfg.images))
  model = load_captioner(cfg.model, numerics=cfg.numerics)
  side = int(round(model.layout.image_tokens ** 0.5)) * (
      model.tokenizer.config.image_size // model.tokenizer.config.grid)
  if images.shape[1:3] != (side, side):
    raise GenerationError(f"images must be {side} x {side} for {cfg.model}, got "
                          f"{images.shape[1]} x {images.shape[2]}")
  strategy = registry.strategy_of(settings)
  captions = strategy.pipeline(settings, model, images, int(cfg.batch_size))
  with open(cfg.output, "w") as f:
    for name, text in zip(names, captions):
      f.write(json.dumps({"image": name, "caption": text}) + "\n")
  return {"strategy": strategy.name, "settings": settings.to_flat(), "captions": len(captions),
          "output": cfg.output, "first": captions[:3]}


def main() -> None:
  cli.main_with_config("configs/caption_images.py", "Captioning config file.", run)


if __name__ == "__main__":
  main()

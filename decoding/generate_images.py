"""Command-line image generation: PNG grids per class, with steps, accepted tokens and time.

  python -m decoding.generate_images --config=configs/generate_images.py
  python -m decoding.generate_images --config=configs/generate_images.py --config.strategy=sjd

Writes `out_dir/class_<id>_<name>.png` (per_class images in a row, 2x scale) and
`out_dir/summary.json`: the strategy, its settings and the config; `seconds`, the wall time of
generating all the images (the first, compiling, batch is run once beforehand, so it is a warm
time); and per class the mean forward passes of the model per image (the prefill plus one per
decoding step or verification call), the accepted draft tokens per image and the mean tokens
per forward pass. Bad settings are reported in one line before anything is loaded or compiled.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from decoding import cli, registry
from decoding.image_strategies import generate_codes, generate_images, grid_image
from decoding.strategy import Resources
from models.image_ar import load_image_model


def parse_classes(spec: str, num_classes: int = 10) -> list[int]:
  if not str(spec).strip():
    return list(range(num_classes))
  try:
    out = [int(x) for x in str(spec).split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"classes must be comma-separated integers, got {spec!r}") from None
  bad = [c for c in out if not 0 <= c < num_classes]
  if bad or not out:
    raise ValueError(f"classes must be in [0, {num_classes}), got {spec!r}")
  return out


def run(cfg) -> dict:
  settings = cli.settings_from_config(cfg, "image")
  if int(cfg.per_class) < 1 or int(cfg.batch_size) < 1:
    raise ValueError("per_class and batch_size must be >= 1")
  model = load_image_model(cfg.model, numerics=cfg.numerics)
  classes = parse_classes(cfg.classes, model.layout.num_classes)
  os.makedirs(cfg.out_dir, exist_ok=True)
  labels = np.repeat(classes, int(cfg.per_class))
  bs = min(int(cfg.batch_size), len(labels))
  resources = Resources()
  generate_codes(model, labels[:bs], settings, int(cfg.seed), bs, resources=resources)  # compile
  out = generate_images(model, labels, settings, int(cfg.seed), bs, resources=resources)
  summary = {"strategy": registry.strategy_of(settings).name, "settings": settings.to_flat(),
             "config": cli.as_dict(cfg), "images": int(len(labels)), "seconds": out["seconds"],
             "tokens_per_image": model.layout.num_tokens, "classes": {}}
  for c in classes:
    sel = labels == c
    name = model.class_names[c]
    path = os.path.join(cfg.out_dir, f"class_{c}_{file_name(name)}.png")
    Image.fromarray(grid_image(out["images"][sel], cols=int(cfg.per_class))).save(path)
    fp = out["forward_passes"][sel]
    summary["classes"][name] = {
        "png": path, "forward_passes_per_image": float(fp.mean()),
        "accepted_drafts_per_image": float(out["accepted_drafts"][sel].mean()),
        "tokens_per_forward_pass": float(model.layout.num_tokens / fp.mean())}
  with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  return summary


def file_name(class_name: str) -> str:
  """An ASCII file-name form of a class name ("T-shirt/top" -> "t-shirt-top")."""
  return class_name.replace("/", "-").replace(" ", "_").lower()


def main() -> None:
  cli.main_with_config("configs/generate_images.py", "Image generation config file.", run,
                       show=lambda summary: {k: v for k, v in summary.items() if k != "settings"})


if __name__ == "__main__":
  main()

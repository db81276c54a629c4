"""Command-line image generation: PNG grids per class, with steps, accepted tokens and time.

  python -m decoding.generate_images --config=configs/generate_images.py
  python -m decoding.generate_images --config=configs/generate_images.py --config.strategy=sjd

Writes `out_dir/class_<id>_<name>.png` (per_class images in a row, 2x scale) and
`out_dir/summary.json`: the settings, and per class the mean forward passes per image, accepted
draft tokens per image, mean tokens per forward pass, and the generation time (the first,
compiling, batch is run twice so the time is a warm one). Bad settings are reported before
anything is loaded or compiled.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app
from ml_collections import config_flags



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


def settings_from(cfg):
  from decoding.images import ImageSettings
  s = ImageSettings(strategy=cfg.strategy, do_sample=bool(cfg.do_sample),
                    cfg_scale=float(cfg.cfg_scale), temperature=float(cfg.temperature),
                    top_k=int(cfg.top_k), window=int(cfg.window), init_mode=cfg.init_mode,
                    lantern_delta=float(cfg.lantern_delta), lantern_k=int(cfg.lantern_k),
                    eagle_head=cfg.eagle_head, eagle_tree=bool(cfg.eagle_tree),
                    tree_budget=int(cfg.tree_budget))
  s.validate()
  return s


def run(cfg) -> dict:
  from PIL import Image
  from decoding import images
  from models import image_ar
  from models.datasets.fashion_mnist import CLASS_NAMES
  s = settings_from(cfg)
  if int(cfg.per_class) < 1 or int(cfg.batch_size) < 1:
    raise ValueError("per_class and batch_size must be >= 1")
  classes = parse_classes(cfg.classes)
  model = image_ar.load_image_model(cfg.model)
  os.makedirs(cfg.out_dir, exist_ok=True)
  labels = np.repeat(classes, int(cfg.per_class))
  bs = min(int(cfg.batch_size), len(labels))
  images.generate_codes(model, labels[:bs], s, int(cfg.seed), bs)  # compile
  out = images.generate_images(model, labels, s, int(cfg.seed), bs)
  summary = {"settings": dict(cfg), "images": int(len(labels)), "seconds": out["seconds"],
             "tokens_per_image": model.layout.num_tokens, "classes": {}}
  for c in classes:
    sel = labels == c
    name = CLASS_NAMES[c].replace("/", "-").replace(" ", "_").lower()
    path = os.path.join(cfg.out_dir, f"class_{c}_{name}.png")
    Image.fromarray(images.grid_image(out["images"][sel], cols=int(cfg.per_class))).save(path)
    fp = out["forward_passes"][sel]
    summary["classes"][CLASS_NAMES[c]] = {
        "png": path, "forward_passes_per_image": float(fp.mean()),
        "accepted_drafts_per_image": float(out["accepted_drafts"][sel].mean()),
        "tokens_per_forward_pass": float(model.layout.num_tokens / fp.mean())}
  with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  return summary


def main() -> None:
  # the flag is defined here, not at import, so importing this module (tests, other CLIs)
  # never collides with another module's --config
  config = config_flags.DEFINE_config_file("config", "configs/generate_images.py",
                                           "Image generation config file.")

  def _main(argv):
    del argv
    try:
      summary = run(config.value)
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))

  app.run(_main)


if __name__ == "__main__":
  main()

"""Classifier-free guidance of the image captioner: specificity against human-like references.

  python -m benchmarks.eval_captioning [--scenes=500] [--scales=1,1.5,2,3]

Captions held-out captioned scenes (`models.datasets.fashion_captions`, the Fashion-MNIST test
split) with the shipped captioner (`captioner-fmnist`, `train.captioner`) greedily at each
guidance scale (`decoding.captioning`; 0 = the unconditional model, for reference), and
scores them (`decoding.caption_metrics`): CIDEr-D against the five reference captions, and
caption-to-image recall@1 over the gallery of all the scenes by the attributes a caption
names. Also: how many attributes a caption names, and the share of named attributes that are
true of the image. Writes results/captioning_cfg.json, a picture of a few scenes with their
captions at each scale (results/captioning_cfg.png) and the table between the markers in
README.md. The paper's trade-off ("Guiding Image Captioning Models Toward More Specific
Captions", Kornblith et al., ICCV 2023): recall@1 rises and CIDEr-D falls as the scale grows.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from benchmarks import report
from benchmarks.hardware import machine_name
from decoding import caption_metrics, captioning
from models.captioner import load_captioner
from models.datasets import fashion_captions

MARKER = "captioning"


def render(result: dict) -> str:
  md = [f"`captioner-fmnist` ({result['params']} parameters), {result['scenes']} held-out scenes "
        f"(Fashion-MNIST test split, seed {result['seed']}), greedy, 5 references per scene "
        "that name the class and 0-2 of its 4 other attributes. Recall@1: the caption's scene "
        f"among all {result['scenes']} by the attributes it names (ties split).", "",
        "| guidance scale | CIDEr-D | recall@1 | attributes named | named attributes true | "
        "class named and true | words |", "|---|---|---|---|---|---|---|"]
  for row in result["rows"]:
    md.append(f"| {row['scale']:g} | {row['cider_d']:.3f} | {row['recall_at_1']:.3f} | "
              f"{row['attributes_named']:.2f} | {row['named_true']:.3f} | "
              f"{row['class_true']:.3f} | {row['words']:.1f} |")
  md += ["", f"Examples at each scale: `{result['picture']}`.", "",
         f"`{result['command']}` ({result['seconds'] / 60:.1f} min on {result['machine']})."]
  return "\n".join(md)


def picture(path: str, images: np.ndarray, captions: dict, count: int = 6) -> None:
  """A row per scene: the image, then its caption at each scale."""
  import matplotlib  # plotting only here; the library never needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  scales = list(captions)
  fig, axes = plt.subplots(count, 2, figsize=(9, 1.3 * count),
                           gridspec_kw={"width_ratios": [1, 6]})
  for i in range(count):
    axes[i, 0].imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=255)
    axes[i, 0].axis("off")
    axes[i, 1].axis("off")
    text = "\n".join(f"scale {s:g}: {captions[s][i]}" for s in scales)
    axes[i, 1].text(0.0, 0.5, text, va="center", family="monospace", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="captioner-fmnist")
  ap.add_argument("--scenes", type=int, default=500)
  ap.add_argument("--scales", default="0,1,1.5,2,3")
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--max_new_tokens", type=int, default=20)
  ap.add_argument("--picture", default="results/captioning_cfg.png")
  report.add_output_args(ap, "results/captioning_cfg.json")
  args = ap.parse_args(argv)
  done = report.render_only(args, render, MARKER)
  if done is not None:
    return done
  t0 = time.time()
  model = load_captioner(args.model)
  scenes, images, refs = fashion_captions.scenes("test", args.scenes, args.seed)
  codes = model.encode_images(images)
  truth = [s.attributes for s in scenes]
  rows, captions = [], {}
  for scale in [float(s) for s in args.scales.split(",")]:
    ids = captioning.caption_codes(model, codes, scale, args.max_new_tokens)
    caps = captioning.captions_of(model, ids)
    captions[scale] = caps
    cider, _ = caption_metrics.cider_d(caps, refs)
    recall, _ = caption_metrics.retrieval_recall_at_1(caps, truth, fashion_captions.parse)
    named = [fashion_captions.parse(c) for c in caps]
    true = [sum(t.get(k) == v for k, v in n.items()) for n, t in zip(named, truth)]
    rows.append(dict(scale=scale, cider_d=cider, recall_at_1=recall,
                     attributes_named=float(np.mean([len(n) for n in named])),
                     named_true=float(np.sum(true) / max(1, sum(len(n) for n in named))),
                     class_true=float(np.mean([n.get("class") == t["class"]
                                               for n, t in zip(named, truth)])),
                     words=float(np.mean([len(c.split()) for c in caps])),
                     examples=caps[:6]))
    print(f"scale {scale:g}: CIDEr-D {cider:.3f}, recall@1 {recall:.3f}, "
          f"{rows[-1]['attributes_named']:.2f} attributes named", flush=True)
  picture(args.picture, images, captions)
  result = dict(model=args.model, scenes=args.scenes, seed=args.seed, rows=rows,
                references=refs[:6], truth=truth[:6], picture=args.picture,
                params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(model.params))),
                seconds=time.time() - t0, machine=machine_name(),
                command=" ".join(["python -m benchmarks.eval_captioning"] + list(
                    sys.argv[1:] if argv is None else argv)))
  report.save(result, args, render, MARKER)
  return result


if __name__ == "__main__":
  main()

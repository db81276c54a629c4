"""Notebooks in colab/ run headless from top to bottom, so they never rot."""
from __future__ import annotations

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
@pytest.mark.slow
@pytest.mark.usefixtures("smollm_gguf")  # both load SmolLM2 or its tokenizer
def test_notebook_executes(path):
  nb = nbformat.read(path, as_version=4)
  env_backend = os.environ.get("MPLBACKEND")
  os.environ["MPLBACKEND"] = "Agg"
  try:
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()
  finally:
    if env_backend is None:
      os.environ.pop("MPLBACKEND", None)
    else:
      os.environ["MPLBACKEND"] = env_backend
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  expected = {"01_generate.ipynb": "sequence log-prob",
              "02_train.ipynb": "trained export generates ids",
              "03_speculative.ipynb": "speculative outputs equal greedy",
              "04_images.ipynb": "image grids generated",
              "05_reproducibility.ipynb": "batch-invariant tokens and log-probabilities are the same at batch 1 and 8"}
  assert expected.get(os.path.basename(path), "") in outputs

"""The shipped image-token model and its EAGLE head: generated images show the requested class,
the CLI writes its grids and summary, the head trainer runs end to end, and EAGLE drafting with
the shipped head gives exactly the AR greedy images."""
import json
import os

import numpy as np
import pytest

from models import artifacts, image_ar
from models.datasets.fashion_mnist import CLASS_NAMES


@pytest.fixture(scope="module")
def model():
  return image_ar.load_image_model()


def test_shipped_model_names_its_classes_and_its_weights(model):
  assert model.class_names == CLASS_NAMES  # from the manifest: no dataset module needed
  _, manifest = artifacts.read_manifest("image-ar-fmnist", "lm")
  assert model.sha256 == manifest["params"]["sha256"]
  # the shipped head is tied to that checksum, not to the bytes of the parameter leaves
  _, head = artifacts.read_manifest("eagle-image-fmnist", "eagle_head")
  assert head["target"]["name"] == "image-ar-fmnist"
  assert head["target"]["sha256"] == model.sha256 == model.weights_sha256


@pytest.mark.slow
def test_cli_images_show_the_requested_class(model, tmp_path):
  from configs import generate_images as gcfg
  from decoding import generate_images
  from models import image_classifier
  from PIL import Image
  cfg = gcfg.get_config()
  cfg.per_class, cfg.batch_size, cfg.out_dir = 3, 30, str(tmp_path)
  summary = generate_images.run(cfg)
  assert summary["images"] == 30
  pngs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
  assert len(pngs) == 10
  grid = np.asarray(Image.open(tmp_path / pngs[0]))
  assert grid.shape[1] > 3 * 28  # a row of three scaled images
  with open(tmp_path / "summary.json") as f:
    saved = json.load(f)
  for c in saved["classes"].values():  # AR: one forward pass per token
    assert c["forward_passes_per_image"] == model.layout.num_tokens
  clf, params, _ = image_classifier.load(image_ar.repo_path("checkpoints/classifier-fmnist"))
  from decoding import image_strategies as images
  labels = np.repeat(np.arange(10), 3)
  out = images.generate_images(model, labels, images.ImageAR(), seed=0, batch_size=30)
  _, pred = clf.features_and_predictions(params, out["images"])
  assert float(np.mean(pred == labels)) >= 0.8  # measured 0.97 on 100 images at scale 2


@pytest.mark.slow
@pytest.mark.data
def test_image_head_trainer_and_shipped_head(model, tmp_path):
  from configs import eagle_image_fmnist
  from decoding import image_strategies as images
  from train import image_draft_head
  c = eagle_image_fmnist.get_config()
  c.num_train, c.num_heldout, c.feature_batch, c.num_steps = 64, 16, 40, 3
  c.variants, c.batch_size, c.log_every = ("eagle",), 16, 1
  c.ship.path = str(tmp_path / "head")
  summary = image_draft_head.run(c, str(tmp_path / "run"))
  assert summary["best"] == "eagle" and os.path.isdir(tmp_path / "head")
  image_ar.load_image_head(model, str(tmp_path / "head"))  # tied to this model: loads
  _, manifest = artifacts.read_manifest(str(tmp_path / "head"), "eagle_head")
  assert manifest["target"]["name"] == "image-ar-fmnist"  # the registered name of the path
  assert manifest["target"]["sha256"] == model.sha256
  shipped = image_ar.load_image_head(model)[0]
  assert shipped.vocab_size == model.layout.vocab_size
  labels = np.arange(10)
  greedy = images.ImageAR(do_sample=False)
  ar = images.generate_codes(model, labels, greedy, batch_size=10)
  eagle = images.generate_codes(model, labels, images.ImageEagle(do_sample=False, window=4),
                                batch_size=10)
  np.testing.assert_array_equal(eagle["codes"], ar["codes"])
  assert eagle["forward_passes"].mean() < 0.8 * model.layout.num_tokens  # drafts accepted

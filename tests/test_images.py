"""The image stack: VQ-VAE quantization and EMA codebook updates, the shipped tokenizer's
reconstruction and codebook usage, the shipped classifier and the FID, and image-generation
input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import image_ar, image_classifier, vqvae


@pytest.fixture(scope="module")
def fmnist_test():
  from models import datasets
  return datasets.load_arrays("fashion_mnist", "test")


def test_nearest_code_is_the_brute_force_argmin():
  rng = np.random.RandomState(0)
  z = rng.randn(5, 3, 3, 4).astype(np.float32)
  cb = rng.randn(11, 4).astype(np.float32)
  got = np.asarray(vqvae.nearest_code(jnp.asarray(z), jnp.asarray(cb)))
  want = np.argmin(((z[..., None, :] - cb) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(got, want)


def test_ema_update_and_dead_code_restart():
  cfg = vqvae.VQConfig(codebook_size=4, code_dim=2, decay=0.5, epsilon=0.0, restart_below=0.3)
  m = vqvae.VQVAE(cfg)
  params = {"net": {}, "vq": {"codebook": jnp.zeros((4, 2)), "ema_count": jnp.ones(4),
                              "ema_sum": jnp.zeros((4, 2))}}
  aux = {"counts": jnp.asarray([2.0, 0.0, 1.0, 1.0]),
         "sums": jnp.asarray([[2.0, 4.0], [0, 0], [1.0, 1.0], [3.0, 0.0]]),
         "restart_from": jnp.asarray([[9.0, 9.0], [7.0, 7.0], [8.0, 8.0], [6.0, 6.0]])}
  vq = m.vq_update(params, aux)["vq"]
  # counts: 0.5 * 1 + 0.5 * n = [1.5, 0.5, 1, 1]; sums: 0.5 * sums
  np.testing.assert_allclose(vq["ema_count"], [1.5, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(vq["codebook"][0], [1.0 / 1.5, 2.0 / 1.5], rtol=1e-6)
  np.testing.assert_allclose(vq["codebook"][2], [0.5, 0.5], rtol=1e-6)
  aux["counts"] = jnp.asarray([2.0, 0.0, 0.0, 2.0])
  vq2 = m.vq_update({"net": {}, "vq": vq}, aux)["vq"]  # code 1: 0.25 < 0.3 -> restarted
  np.testing.assert_allclose(vq2["codebook"][1], [7.0, 7.0])
  assert float(vq2["ema_count"][1]) == 1.0
  assert float(vq2["ema_count"][2]) == 0.5  # 0.5 * 1: above the threshold, kept


def test_vq_config_rejects_bad_values():
  with pytest.raises(ValueError, match="multiple of 4"):
    vqvae.VQConfig(image_size=30)
  with pytest.raises(ValueError, match="decay"):
    vqvae.VQConfig(decay=1.0)


@pytest.mark.data
def test_shipped_tokenizer_reconstructs_and_uses_its_codebook(fmnist_test):
  tok, params, manifest = vqvae.load(image_ar.repo_path("checkpoints/vqvae-fmnist"))
  images = fmnist_test["image"][:1000]
  codes = tok.encode(params, jnp.asarray(images))
  assert codes.shape == (1000, tok.config.num_tokens)
  recon = np.asarray(tok.decode(params, codes))
  mse = float(np.mean((recon - images / 255.0) ** 2))
  assert mse < 0.012, mse  # per pixel on [0, 1]; the shipped run measured 0.0067 on 10000
  assert len(np.unique(np.asarray(codes))) > 0.8 * tok.config.codebook_size
  # the reported numbers in the manifest come from the same measurement
  assert manifest["info"]["test"]["codes_used"] <= tok.config.codebook_size
  assert abs(manifest["info"]["test"]["recon_mse"] - mse) < 0.003


@pytest.mark.data
def test_shipped_classifier_and_fid(fmnist_test):
  clf, params, _ = image_classifier.load(image_ar.repo_path("checkpoints/classifier-fmnist"))
  images, labels = fmnist_test["image"], fmnist_test["label"]
  feats, pred = clf.features_and_predictions(params, images[:2000])
  assert float(np.mean(pred == labels[:2000])) > 0.85
  a, b = feats[:1000], feats[1000:2000]
  assert image_classifier.fid(a, a) < 1e-4
  same = image_classifier.fid(a, b)  # two halves of the test set: small
  noise = np.random.RandomState(0).randint(0, 256, images[:1000].shape).astype(np.uint8)
  f_noise, _ = clf.features_and_predictions(params, noise)
  assert image_classifier.fid(a, f_noise) > 20 * max(same, 1e-3)
  # one class against all: far larger than two random halves
  only = images[:2000][labels[:2000] == 0][:150]
  f_only, _ = clf.features_and_predictions(params, only)
  assert image_classifier.fid(a, f_only) > 5 * max(same, 1e-3)


def test_frechet_distance_of_gaussians():
  rng = np.random.RandomState(0)
  mu1, mu2 = rng.randn(3), rng.randn(3)
  s = np.diag([1.0, 2.0, 3.0])
  assert abs(image_classifier.frechet_distance(mu1, s, mu2, s)
             - float(((mu1 - mu2) ** 2).sum())) < 1e-8
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
  got = image_classifier.frechet_distance(np.zeros(1), np.eye(1) * 4.0, np.ones(1), np.eye(1))
  assert abs(got - (1.0 + 1.0)) < 1e-8


def test_image_tokens_layout():
  lay = image_ar.ImageTokens(codebook_size=256, num_classes=10, grid=7)
  assert lay.vocab_size == 267 and lay.null_class == 266 and lay.num_tokens == 49
  np.testing.assert_array_equal(lay.class_token(jnp.asarray([0, 9, -1])), [256, 265, 266])
  rows = lay.sequences(np.asarray([3]), np.arange(49)[None])
  assert rows.shape == (1, 50) and rows[0, 0] == 259 and rows[0, 1:].tolist() == list(range(49))


def test_image_tokens_carry_their_class_names():
  names = [f"class {i}" for i in range(3)]
  lay = image_ar.ImageTokens(codebook_size=16, num_classes=3, grid=3, class_names=names)
  assert lay.class_names == tuple(names) and hash(lay)  # a JSON list becomes a tuple
  assert image_ar.ImageTokens(**lay.to_dict()) == lay  # what a manifest stores round-trips
  assert lay.to_dict()["class_names"] == names
  with pytest.raises(ValueError, match="2 class names for 3 classes"):
    image_ar.ImageTokens(codebook_size=16, num_classes=3, grid=3, class_names=names[:2])


def test_condition_dropout_replaces_the_class_token():
  lay = image_ar.ImageTokens(codebook_size=8, num_classes=2, grid=2)
  seen = {}

  def base(params, batch, key):
    seen["tokens"] = batch["tokens"]
    return jnp.zeros(()), {}

  tokens = jnp.asarray(np.tile([[8, 1, 2, 3, 4]], (4000, 1)), jnp.int32)
  image_ar.cond_dropout_loss(base, lay, 0.25)(None, {"tokens": tokens}, jax.random.PRNGKey(0))
  first = np.asarray(seen["tokens"][:, 0])
  assert set(first.tolist()) == {8, lay.null_class}
  assert abs(float(np.mean(first == lay.null_class)) - 0.25) < 0.03
  np.testing.assert_array_equal(seen["tokens"][:, 1:], tokens[:, 1:])


# --------------------------------------------------------------- generation (untrained model)


@pytest.fixture(scope="module")
def tiny_image_model():
  from models import transformer
  from models.config import tiny_config
  from models.lm import TransformerLM
  lay = image_ar.ImageTokens(codebook_size=16, num_classes=3, grid=3)
  cfg = tiny_config(vocab_size=lay.vocab_size, max_position_embeddings=32)
  params = transformer.init_params(cfg, jax.random.PRNGKey(1))
  params = jax.tree.map(lambda x: x * 4.0, params)  # sharper than the near-uniform init
  tok = vqvae.VQVAE(vqvae.VQConfig(image_size=12, codebook_size=16, code_dim=4))
  # random tokenizer weights of the right shapes (only decoded to check shapes and dtype);
  # filled on the host: compiling the conv net's init costs more than the rest of the module
  rng = np.random.RandomState(2)
  tok_params = jax.tree.map(lambda s: jnp.asarray(rng.randn(*s.shape) * 0.1, s.dtype),
                            jax.eval_shape(tok.init, jax.random.PRNGKey(2)))
  return image_ar.ImageModel(TransformerLM(cfg), params, lay, tok, tok_params, {})


@pytest.mark.slow
def test_image_strategies_agree_and_do_not_depend_on_the_batch(tiny_image_model, tmp_path):
  """Greedy EAGLE (tree, untrained head) = greedy AR under guidance; EAGLE chains and EAGLE-2
  trees with LANTERN sampled in one batch or in two = the same images (per-image keys)."""
  from decoding import image_strategies as images
  from models import eagle_head as dh
  m = tiny_image_model
  head = dh.EagleHead(dh.HeadConfig(m.lm.config))
  head_path = str(tmp_path / "head")
  dh.save_head(head_path, head, dh.init_head_params(head, jax.random.key(4)), {},
               target_name="tiny", target_sha256=m.weights_sha256)
  labels = np.asarray([0, 1, 2, 1, 0])
  greedy = images.ImageAR(do_sample=False, cfg_scale=2.0)
  ar = images.generate_codes(m, labels, greedy, batch_size=5)
  assert (ar["codes"] < m.layout.codebook_size).all()  # class ids never generated
  # (greedy SJD = greedy AR, spatial init included:
  # tests/decoding/speculative/test_jacobi_guidance.py; the Jacobi drafter under GuidedLM's
  # cache rollback: the prompt-lookup case there)
  out = images.generate_codes(m, labels, images.ImageEagle(
      do_sample=False, cfg_scale=2.0, eagle_head=head_path, eagle_tree=True, tree_budget=6),
      batch_size=5)
  np.testing.assert_array_equal(out["codes"], ar["codes"])  # lossless: greedy AR
  assert (out["forward_passes"] <= m.layout.num_tokens).all()
  s = images.ImageEagle(cfg_scale=1.5, window=3, lantern_delta=0.1, lantern_k=3,
                        eagle_head=head_path)
  whole = images.generate_codes(m, labels, s, seed=3, batch_size=5)
  parts = images.generate_codes(m, labels, s, seed=3, batch_size=2)
  np.testing.assert_array_equal(whole["codes"], parts["codes"])
  tree = images.ImageEagle(cfg_scale=1.5, eagle_tree=True, tree_budget=6, lantern_delta=0.1,
                           lantern_k=3, eagle_head=head_path)  # LANTERN on an EAGLE-2 tree
  t_whole = images.generate_codes(m, labels, tree, seed=3, batch_size=5)
  t_parts = images.generate_codes(m, labels, tree, seed=3, batch_size=2)
  np.testing.assert_array_equal(t_whole["codes"], t_parts["codes"])
  assert (t_whole["codes"] < m.layout.codebook_size).all()
  imgs = m.decode_images(jnp.asarray(whole["codes"][:2]))
  assert imgs.shape == (2, 12, 12, 1) and imgs.dtype == np.uint8


def test_every_image_strategy_runs_and_greedy_ones_give_the_ar_codes(tiny_image_model, tmp_path):
  """AR, SJD and EAGLE (a chain from an untrained head) through `generate_codes` without
  guidance: greedy SJD and greedy EAGLE give the greedy AR codes in at most one forward pass
  per code, and sampled AR gives codes of the codebook. (Under guidance, the EAGLE-2 tree and
  LANTERN: the slow test above.)"""
  from decoding import image_strategies as images
  from models import eagle_head as dh
  m = tiny_image_model
  head = dh.EagleHead(dh.HeadConfig(m.lm.config))
  head_path = str(tmp_path / "head")
  dh.save_head(head_path, head, dh.init_head_params(head, jax.random.key(4)), {},
               target_name="tiny", target_sha256=m.weights_sha256)
  labels = np.asarray([0, 2, 1])
  greedy = dict(do_sample=False, cfg_scale=1.0)
  ar = images.generate_codes(m, labels, images.ImageAR(**greedy), batch_size=3)
  for s in (images.ImageSJD(window=4, **greedy),
            images.ImageEagle(window=3, eagle_head=head_path, **greedy)):
    out = images.generate_codes(m, labels, s, batch_size=3)
    np.testing.assert_array_equal(out["codes"], ar["codes"], err_msg=type(s).__name__)
    assert (out["forward_passes"] <= m.layout.num_tokens).all()
  sampled = images.generate_codes(m, labels, images.ImageAR(cfg_scale=1.0), seed=1, batch_size=3)
  assert sampled["codes"].shape == (3, m.layout.num_tokens)
  assert ((sampled["codes"] >= 0) & (sampled["codes"] < m.layout.codebook_size)).all()


def test_image_head_is_tied_to_its_model(tiny_image_model, tmp_path):
  from models import checkpoint, eagle_head as dh
  m = tiny_image_model
  head = dh.EagleHead(dh.HeadConfig(m.lm.config))
  assert m.sha256 is None  # in memory: tied to its parameter bytes
  assert m.weights_sha256 == checkpoint.params_sha256(m.params)
  dh.save_head(str(tmp_path), head, dh.init_head_params(head, jax.random.key(4)), {},
               target_name="tiny",
               target_sha256=checkpoint.params_sha256(jax.tree.map(lambda x: x + 1, m.params)))
  with pytest.raises(dh.TargetMismatchError):
    image_ar.load_image_head(m, str(tmp_path))


def test_image_settings_and_cli_reject_bad_input_before_loading():
  from decoding import generate_images
  from decoding import image_strategies as images
  from decoding.errors import GenerationError
  with pytest.raises(GenerationError, match="has no field 'lantern_delta'"):
    images.ImageAR(lantern_delta=0.1)
  with pytest.raises(GenerationError, match="lantern_delta must be"):
    images.ImageEagle(eagle_tree=True, lantern_delta=1.0)
  with pytest.raises(GenerationError, match="top_k=5 only applies when sampling"):
    images.ImageSJD(do_sample=False, top_k=5)
  with pytest.raises(ValueError, match="classes"):
    generate_images.parse_classes("3,12")
  import ml_collections
  from configs import generate_images as gcfg
  cfg = gcfg.get_config()
  cfg.model = "/nonexistent/model"
  for strategy, field, match in (("nope", None, "unknown strategy 'nope'"),
                                 ("beam", None, "strategy 'beam' generates text"),
                                 ("ar", "lantern_delta", "lantern_delta does not apply to strategy 'ar'")):
    cfg.strategy = strategy
    if field:
      cfg[field] = 0.1
    with pytest.raises(GenerationError, match=match):
      generate_images.run(cfg)  # the settings fail before the (missing) model is looked for
  cfg = gcfg.get_config()
  cfg.model = "/nonexistent/model"
  with pytest.raises(FileNotFoundError, match="no image model"):
    generate_images.run(cfg)
  assert isinstance(cfg, ml_collections.ConfigDict)


def test_generate_codes_rejects_bad_labels(tiny_image_model):
  from decoding import image_strategies as images
  with pytest.raises(ValueError, match="class labels"):
    images.generate_codes(tiny_image_model, [0, 7], images.ImageAR())

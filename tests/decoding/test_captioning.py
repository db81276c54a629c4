"""Guided captioning (decoding/captioning.py), its metrics (decoding/caption_metrics.py), the
caption token layout (models/captioner.py) and the captioned scenes
(models/datasets/fashion_captions.py)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import caption_images as caption_config
from decoding import caption_images as caption_cmd, caption_metrics, captioning, guidance
from decoding.errors import GenerationError
from models import captioner, transformer
from models.config import tiny_config
from models.datasets import fashion_captions as fc
from models.lm import TransformerLM

RNG = np.random.default_rng(0)
LAYOUT = captioner.CaptionTokens(codebook_size=8, image_tokens=4, words=("a", "b", "c", "d"))


def _model(seed=0):
  cfg = tiny_config(vocab_size=LAYOUT.vocab_size)
  params = transformer.init_params(cfg, jax.random.PRNGKey(seed))
  # a sharper model than init gives: the choice depends on the image prefix
  params = jax.tree.map(lambda x: x * 4.0, params)
  return captioner.Captioner(TransformerLM(cfg), params, LAYOUT, None, None, {})


def _logprobs(model, rows):
  rows = jnp.asarray(rows)
  pos = jnp.broadcast_to(jnp.arange(rows.shape[1])[None], rows.shape)
  out = transformer.forward(model.params, model.lm.config, rows, pos, None).logits[:, -1]
  return np.asarray(jax.nn.log_softmax(out.astype(jnp.float32), -1))


def _brute_force(model, codes, scale, steps):
  """Greedy guided decoding by full forward passes of both streams at every step."""
  cond = LAYOUT.prompts(codes)
  uncond = cond.copy()
  uncond[:, :LAYOUT.image_tokens] = LAYOUT.null_image
  out = [[] for _ in codes]
  done = np.zeros(len(codes), bool)
  allowed = np.zeros(LAYOUT.vocab_size, bool)
  allowed[LAYOUT.eos] = True
  allowed[LAYOUT.first_word:] = True
  for _ in range(steps):
    lc, lu = _logprobs(model, cond), _logprobs(model, uncond)
    g = lu + scale * (lc - lu)
    nxt = np.where(allowed[None], g, -np.inf).argmax(-1)
    for b, t in enumerate(nxt):
      if not done[b]:
        if t == LAYOUT.eos:
          done[b] = True
        else:
          out[b].append(int(t))
    cond = np.concatenate([cond, nxt[:, None]], 1)
    uncond = np.concatenate([uncond, nxt[:, None]], 1)
  return out


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0, 3.0])
def test_guided_greedy_captions_match_brute_force_on_both_streams(scale, monkeypatch):
  model = _model()
  codes = RNG.integers(0, 8, (5, 4))
  # the guided path even at scale 1 (caption_codes uses the plain model there)
  monkeypatch.setattr(captioning, "guided_lm", lambda m, s: guidance.GuidedLM(
      m.lm, float(s), LAYOUT.null_image, cond_len=LAYOUT.image_tokens))
  got = captioning.caption_codes(model, codes, scale, max_new_tokens=6, batch_size=4)
  assert got == _brute_force(model, codes, scale, 6)


def test_scale_one_is_conditional_and_scale_zero_unconditional_greedy():
  model = _model(1)
  codes = RNG.integers(0, 8, (6, 4))
  plain = captioning.caption_codes(model, codes, 1.0, max_new_tokens=6, batch_size=6)
  guided = captioning.caption_codes(model, codes, 1.0 + 1e-9, max_new_tokens=6, batch_size=6)
  assert plain == guided
  null = np.full_like(codes, LAYOUT.null_image)
  # scale 0 ignores the image: every row gets the caption of the null image
  uncond = captioning.caption_codes(model, codes, 0.0, max_new_tokens=6, batch_size=6)
  want = _brute_force(model, null[:1], 1.0, 6)[0]
  assert all(u == want for u in uncond)
  with pytest.raises(GenerationError, match="cfg_scale"):
    captioning.caption_codes(model, codes, -1.0)
  with pytest.raises(GenerationError, match="image codes"):
    captioning.caption_codes(model, codes + 8)


def test_caption_layout_round_trips_words_and_masks_only_the_caption():
  ids = LAYOUT.encode("a c d")
  assert LAYOUT.decode(ids + [LAYOUT.eos, LAYOUT.first_word]) == "a c d"
  rows = LAYOUT.rows(np.zeros((1, 4), np.int32), ["b a"], 10)
  assert rows[0].tolist() == [0, 0, 0, 0, LAYOUT.bos, *LAYOUT.encode("b a"), LAYOUT.eos,
                              LAYOUT.pad, LAYOUT.pad]
  assert LAYOUT.loss_mask(rows)[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
  with pytest.raises(ValueError, match="vocabulary"):
    LAYOUT.encode("a zebra")
  with pytest.raises(ValueError, match="needs"):
    LAYOUT.rows(np.zeros((1, 4), np.int32), ["a b c d a"], 8)


def test_cider_d_is_ten_for_an_exact_match_with_unique_ngrams_and_clips_repeats():
  refs = [["a small red dress in the corner"], ["there is a large sneaker lying sideways"]]
  score, per = caption_metrics.cider_d([r[0] for r in refs], refs)
  np.testing.assert_allclose(per, 10.0)
  # n-grams every image's references share carry no weight (idf = 0)
  worse, _ = caption_metrics.cider_d(["a dress", "a sneaker"], refs)
  assert worse < score
  # repeating a matching word cannot raise the score (clipping)
  rep, _ = caption_metrics.cider_d(["dress dress dress dress", "sneaker"], refs)
  once, _ = caption_metrics.cider_d(["dress", "sneaker"], refs)
  assert rep <= once + 1e-12


def test_cider_d_by_hand_on_unigrams():
  # image 1 refs: "x y"; image 2 refs: "x z". idf(x) = 0, idf(y) = idf(z) = log 2.
  # candidate "y" for image 1: unigram sim = (log2 * log2) / (log2 * log2) = 1; bigram
  # orders are empty (sim 0); lengths in bigrams 0 vs 1: penalty exp(-1 / 72).
  score, per = caption_metrics.cider_d(["y", "x z"], [["x y"], ["x z"]])
  np.testing.assert_allclose(per[0], 10.0 * np.exp(-1 / 72) / 4)


def test_retrieval_counts_matches_minus_contradictions_and_splits_ties():
  gallery = [{"class": "dress", "size": "small"}, {"class": "dress", "size": "large"},
             {"class": "coat", "size": "small"}]
  caps = ["a small dress", "a dress", "a large coat"]
  recall, credit = caption_metrics.retrieval_recall_at_1(caps, gallery, fc.parse)
  # 1: only image 0 matches both; 2: images 0 and 1 tie; 3: images 1 and 2 tie (1 match each)
  np.testing.assert_allclose(credit, [1.0, 0.5, 0.5])
  assert recall == pytest.approx(2 / 3)


def test_parse_reads_every_attribute_and_keeps_t_shirts_apart_from_shirts():
  assert fc.parse("a picture of a small dim upside down t-shirt in the bottom right") == {
      "class": "t-shirt", "size": "small", "brightness": "dim", "rotation": "upside down",
      "position": "bottom right"}
  assert fc.parse("there is a shirt lying sideways in the center") == {
      "class": "shirt", "rotation": "sideways", "position": "center"}
  assert fc.parse("an ankle boot") == {"class": "ankle boot"}


def test_reference_captions_name_the_class_and_at_most_two_true_attributes():
  rng = np.random.default_rng(1)
  for _ in range(200):
    s = fc.Scene(0, int(rng.integers(10)), str(rng.choice(fc.POSITIONS)),
                 str(rng.choice(fc.SIZES)), str(rng.choice(fc.BRIGHTNESS)),
                 str(rng.choice(fc.ROTATIONS)))
    for ref in fc.reference_captions(s, rng):
      named = fc.parse(ref)
      assert named["class"] == s.attributes["class"]
      assert 1 <= len(named) <= 3
      assert all(s.attributes[k] == v for k, v in named.items())
      assert set(ref.split()) <= set(fc.words())
  # a caption that names everything parses back to the scene
  full = fc.caption(s, fc.OPTIONAL, 0)
  assert fc.parse(full) == s.attributes


def test_render_places_sizes_and_dims_the_item():
  item = np.full((28, 28), 200, np.uint8)
  small = fc.render(item, fc.Scene(0, 0, "bottom right", "small", "dim", "upright"))[..., 0]
  assert small.shape == (fc.CANVAS, fc.CANVAS)
  ys, xs = np.nonzero(small)
  assert (ys.min(), xs.min(), ys.max(), xs.max()) == (24, 24, 39, 39)
  assert small.max() == round(200 * fc.DIM)
  large = fc.render(item, fc.Scene(0, 0, "top left", "large", "bright", "sideways"))[..., 0]
  ys, xs = np.nonzero(large)
  assert (ys.max(), xs.max(), large.max()) == (27, 27, 200)


def _cli_config(**kw):
  cfg = caption_config.get_config()
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def test_the_caption_command_refuses_bad_input_before_loading_anything(tmp_path):
  with pytest.raises(GenerationError, match="images is required"):
    caption_cmd.run(_cli_config())
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros((2, 40, 40), np.float32))
  with pytest.raises(GenerationError, match="uint8"):
    caption_cmd.run(_cli_config(images=str(bad)))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "a.png").write_bytes(b"not a png")
  with pytest.raises(GenerationError, match="unreadable image"):
    caption_cmd.run(_cli_config(images=str(tmp_path / "junk")))
  with pytest.raises(GenerationError, match="cfg_scale"):
    caption_cmd.run(_cli_config(images=str(bad), cfg_scale=-1.0))
  cfg = _cli_config(images=str(bad))
  cfg.temperature = 0.7
  with pytest.raises(GenerationError, match="unknown field 'temperature'"):
    caption_cmd.run(cfg)


@pytest.mark.slow
def test_the_caption_command_captions_each_image_as_the_library_does(tmp_path):
  model = captioner.load_captioner("captioner-fmnist")
  rng = np.random.default_rng(3)
  item = (rng.random((28, 28)) * 255).astype(np.uint8)
  scenes = [fc.Scene(0, 0, p, "large", "bright", "upright") for p in fc.POSITIONS[:3]]
  images = np.stack([fc.render(item, s)[..., 0] for s in scenes])
  path = tmp_path / "scenes.npy"
  np.save(path, images)
  with pytest.raises(GenerationError, match="40 x 40"):
    np.save(tmp_path / "small.npy", images[:, :28, :28])
    caption_cmd.run(_cli_config(images=str(tmp_path / "small.npy")))
  out = tmp_path / "captions.jsonl"
  summary = caption_cmd.run(_cli_config(images=str(path), cfg_scale=2.0, output=str(out)))
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  assert summary["captions"] == 3 and [x["image"] for x in lines] == [0, 1, 2]
  want = captioning.caption_images(model, images[..., None], 2.0)
  assert [x["caption"] for x in lines] == want

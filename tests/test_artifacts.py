"""The one artifact registry (`models.registry.ARTIFACTS`, `resolve`) and the one folder format
(`models.artifacts`): a round trip of every kind, the checksum, kind and target checks, the
refusal of the formats before it, and the shipped artifacts' manifests. Tiny random models
only (parameters filled on the host: nothing here compiles)."""
from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from models import artifacts, checkpoint, eagle_head as dh, image_classifier, registry
from models import transformer, vqvae
from models.config import tiny_config
from models.lm import LoadedModel, TransformerLM, load_model, load_self_draft, save_lm
from decoding.speculative import gad_drafter as gad
from train import distillspec, gad as train_gad

CFG = tiny_config(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3)
SHA = "ab" * 32  # the checksum the tiny target's drafters record


def _fill(shapes, seed: int):
  """Random arrays with the shapes and dtypes of an `eval_shape` tree."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), shapes)


def _target_params(seed: int = 0):
  return _fill(jax.eval_shape(functools.partial(transformer.init_params, CFG),
                              jax.random.PRNGKey(0)), seed)


def _target(params, sha=SHA, config=CFG) -> LoadedModel:
  return LoadedModel("tiny", TransformerLM(config), params, None, False, sha)


def _assert_same_bits(a, b):
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


# ------------------------------------------------------------------------------ the registry


def test_registry_table_holds_every_artifact_once():
  table = registry.ARTIFACTS
  assert {n: a.kind for n, a in table.items()} == {
      "smollm2-135m-instruct": "lm", "qwen2.5-coder-0.5b-instruct": "lm",
      "qwen2.5-coder-1.5b-instruct": "lm", "image-ar-fmnist": "lm",
      "eagle-smollm2-135m": "eagle_head", "eagle-image-fmnist": "eagle_head",
      "vqvae-fmnist": "vq_tokenizer", "classifier-fmnist": "image_classifier",
      "distillspec-smollm2-L4": "self_draft", "gad-smollm2": "gad_drafter",
      "smollm2-135m-moe": "moe_delta", "captioner-fmnist": "lm",
      "whisper-tiny.en": "speech", "whisper-base": "speech",
      "careless-whisper-tiny.en-300ms": "speech_adapter",
      "careless-whisper-tiny.en-100ms": "speech_adapter"}
  assert registry.MODELS == {n: a for n, a in table.items() if a.packaged}  # the packaged part
  assert registry.DEFAULT_MODEL in registry.MODELS
  for a in table.values():
    assert a.name in table and (a.target in table if a.target else True)
    assert a.packaged or a.command.startswith("python -m train.")
  assert table["gad-smollm2"].location == "$DECODAX_DRAFTS_DIR/gad-smollm2"
  assert table["eagle-image-fmnist"].target == "image-ar-fmnist"
  with pytest.raises(ValueError, match="exactly one home"):
    registry.Artifact("x", "vq_tokenizer", checkpoint="checkpoints/x", drafts=True, command="c")
  with pytest.raises(ValueError, match="command"):
    registry.Artifact("x", "vq_tokenizer", checkpoint="checkpoints/x")
  with pytest.raises(ValueError, match="target"):
    registry.Artifact("x", "gad_drafter", drafts=True, command="c")
  with pytest.raises(ValueError, match="unknown kind"):
    registry.Artifact("x", "tokenizer", drafts=True, command="c")


@pytest.mark.usefixtures("smollm_gguf")  # resolves the packaged GGUF file
def test_resolve_every_registered_name(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.DRAFTS_ENV, str(tmp_path / "drafts"))
  joined = []
  monkeypatch.setattr(registry, "join_parts", lambda spec: joined.append(spec.name) or "/j")
  for name, entry in registry.ARTIFACTS.items():
    if entry.parts:  # split packages: joined and verified once
      # (tests/models/test_registry_parts.py)
      assert registry.resolve(name) == ("/j", None, entry.instruct)
    elif entry.packaged:
      path, sha, instruct = registry.resolve(name)
      assert os.path.isfile(path) and sha == entry.sha256 and instruct == entry.instruct
    elif entry.checkpoint:  # shipped: the folder in the repository, of its kind
      path, sha, instruct = registry.resolve(name)
      assert path == registry.repo_path(entry.checkpoint) and sha is None
      assert instruct == entry.instruct
      assert artifacts.read_manifest(name, entry.kind)[0] == path
    else:  # trained on demand: the command that produces it until it exists
      with pytest.raises(FileNotFoundError, match=re.escape(entry.command)):
        registry.resolve(name)
      os.makedirs(entry.path)
      assert registry.resolve(name)[0] == str(tmp_path / "drafts" / name)
      assert registry.artifact_dir(name) == entry.path
  assert joined == ["whisper-base", "qwen2.5-coder-0.5b-instruct",
                    "qwen2.5-coder-1.5b-instruct"]


def test_resolve_paths(tmp_path, monkeypatch):
  folder = tmp_path / "Some-Instruct-Model"
  folder.mkdir()
  assert registry.resolve(str(folder)) == (str(folder), None, True)
  monkeypatch.chdir(tmp_path)  # relative paths are also taken from the repository root
  path, sha, _ = registry.resolve("checkpoints/vqvae-fmnist")
  assert path == registry.repo_path("checkpoints/vqvae-fmnist") and sha is None
  assert registry.entry_for("checkpoints/vqvae-fmnist").name == "vqvae-fmnist"
  assert registry.entry_for(str(folder)) is None
  assert registry.artifact_dir("my-draft") == os.path.join(registry.drafts_dir(), "my-draft")
  with pytest.raises(ValueError, match="unknown model or artifact 'nope'"):
    registry.resolve("nope")


def test_kind_of_names_and_folders(tmp_path):
  assert registry.kind_of("gad-smollm2") == "gad_drafter"  # registered, produced or not
  assert registry.kind_of("smollm2-135m-instruct") == "lm"
  assert registry.kind_of("checkpoints/eagle-image-fmnist") == "eagle_head"  # by its manifest
  path = _small_artifact(tmp_path)
  assert registry.kind_of(path) == "vq_tokenizer"
  assert registry.kind_of(str(tmp_path)) is None  # no manifest
  assert registry.kind_of("nope") is None


# ------------------------------------------------------------------------------ round trips


def test_round_trip_lm(tmp_path):
  params = _target_params()
  config = CFG.replace(param_dtype=jnp.bfloat16)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  path = save_lm(str(tmp_path / "lm"), config, params16, instruct=True, info={"run": "test"})
  _, manifest = artifacts.read_manifest(path, "lm")
  assert manifest["format"] == "decodax-artifact" and manifest["version"] == 1
  assert manifest["config"] == {"model": checkpoint.config_to_dict(config), "instruct": True}
  assert manifest["params"]["file"] == "params.safetensors"
  assert manifest["params"]["storage_dtype"] == "bfloat16"
  assert manifest["params"]["num_params"] == sum(x.size for x in jax.tree.leaves(params))
  assert manifest["target"] is None and manifest["tokenizer"] is None
  assert manifest["info"] == {"run": "test"}
  m = load_model(path, param_dtype="bfloat16", scan_layers=True, fused_projections=False)
  _assert_same_bits(m.params, params16)
  assert m.instruct and m.tokenizer is None and m.sha256 == manifest["params"]["sha256"]
  per_layer = load_model(path, param_dtype="bfloat16", scan_layers=False,
                         fused_projections=False)  # stored stacked
  _assert_same_bits(per_layer.params, transformer.unstack_layers(params16, CFG.num_layers))


def test_round_trip_tokenizer_metadata_and_info(tmp_path):
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]}
  info = {"command": "python -m x", "measured": {"tau": 1.5}, "path": tmp_path}
  path = artifacts.save_artifact(str(tmp_path / "a"), "lm", {"w": np.ones(3, np.float32)},
                                 config={}, info=info, tokenizer=meta)
  manifest, params = artifacts.load_artifact(path, "lm")
  assert manifest["tokenizer"] == "tokenizer.json"
  assert artifacts.read_tokenizer(path, manifest) == meta
  assert manifest["info"] == {**info, "path": str(tmp_path)}  # free-form, as strings if needed
  np.testing.assert_array_equal(params["w"], np.ones(3))


def test_round_trip_eagle_head(tmp_path):
  head = dh.EagleHead(dh.HeadConfig(CFG, feature_sampling=True))
  params = _fill(jax.eval_shape(lambda: dh.init_head_params(head, jax.random.PRNGKey(0))), 1)
  dh.save_head(str(tmp_path / "h"), head, params, {"steps": 3}, target_name="tiny",
               target_sha256=SHA)
  head2, params2 = dh.load_head(str(tmp_path / "h"), target_sha256=SHA,
                                param_dtype=jnp.bfloat16)
  assert head2.config == head.config.replace(
      target=head.config.target.replace(param_dtype=jnp.bfloat16))
  _assert_same_bits(params2, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


def test_round_trip_self_draft(tmp_path):
  tparams = _target_params()
  draft_lm, trainable, assemble = distillspec.self_draft(TransformerLM(CFG), tparams, 2)
  trained = _fill(trainable, 3)
  distillspec.save_draft(str(tmp_path / "d"), trained, draft_lm, target_name="tiny",
                         target_sha256=SHA, target_config=CFG)
  lm, params = load_self_draft(str(tmp_path / "d"), _target(tparams))
  assert lm.config == draft_lm.config
  _assert_same_bits(params, assemble(trained, tparams)["draft"])


def test_round_trip_gad_drafter(tmp_path):
  tparams = _target_params()
  target_lm = TransformerLM(CFG)
  drafter = gad.GadDrafter(target_lm=target_lm, num_layers=2, num_draft=4)
  dparams = _fill(gad.init_params(target_lm, tparams, 2, 4), 5)
  train_gad.save_gad_drafter(str(tmp_path / "g"), dparams, drafter, target_name="tiny",
                             target_sha256=SHA, info={"steps": 1})
  manifest, stored = artifacts.load_artifact(str(tmp_path / "g"), "gad_drafter",
                                             target_sha256=SHA, target_config=CFG)
  assert manifest["config"] == {"num_layers": 2, "num_draft": 4, "slot_embeddings": True}
  _assert_same_bits(stored, dparams)
  drafter2, dparams2 = gad.drafter_from_artifact(manifest, stored, target_lm, tparams)
  assert drafter2 == drafter
  _assert_same_bits(dparams2, dparams)


def test_round_trip_vq_tokenizer_and_image_classifier(tmp_path):
  tok = vqvae.VQVAE(vqvae.VQConfig(image_size=12, codebook_size=16, code_dim=4))
  tparams = _fill(jax.eval_shape(tok.init, jax.random.PRNGKey(0)), 6)
  vqvae.save(str(tmp_path / "vq"), tok, tparams, info={"test": {"recon_mse": 0.1}})
  tok2, tparams2, manifest = vqvae.load(str(tmp_path / "vq"))
  assert tok2 == tok and manifest["info"]["test"]["recon_mse"] == 0.1
  _assert_same_bits(tparams2, tparams)
  clf = image_classifier.ImageClassifier(feature_dim=8)
  cparams = _fill(jax.eval_shape(clf.init, jax.random.PRNGKey(0)), 7)
  image_classifier.save(str(tmp_path / "clf"), clf, cparams)
  clf2, cparams2, manifest = image_classifier.load(str(tmp_path / "clf"))
  assert clf2 == clf and manifest["kind"] == "image_classifier"
  _assert_same_bits(cparams2, cparams)


# ------------------------------------------------------------------------------ the checks


def _small_artifact(tmp_path) -> str:
  return artifacts.save_artifact(str(tmp_path / "vq"), "vq_tokenizer",
                                 {"w": np.arange(8, dtype=np.float32)}, config={})


def test_corrupted_params_file_raises_checksum_error(tmp_path):
  path = _small_artifact(tmp_path)
  params_path = os.path.join(path, "params.safetensors")
  recorded = checkpoint.sha256_file(params_path)
  data = bytearray(open(params_path, "rb").read())
  data[-1] ^= 0xFF  # one flipped bit of a parameter
  open(params_path, "wb").write(bytes(data))
  with pytest.raises(checkpoint.ChecksumError) as e:
    artifacts.load_artifact(path, "vq_tokenizer")
  msg = str(e.value)
  assert params_path in msg and recorded in msg and checkpoint.sha256_file(params_path) in msg
  assert "python -m train.vqvae" in msg  # how to produce it anew


def test_another_kind_or_a_missing_manifest_is_refused(tmp_path):
  path = _small_artifact(tmp_path)
  with pytest.raises(ValueError, match="holds a vq_tokenizer artifact, not a lm"):
    artifacts.load_artifact(path, "lm")
  with pytest.raises(FileNotFoundError, match="missing manifest.json"):
    artifacts.load_artifact(str(tmp_path), "vq_tokenizer")
  with pytest.raises(ValueError, match="needs a target"):
    artifacts.save_artifact(str(tmp_path / "h"), "eagle_head", {}, config={})


def test_drafters_loaded_against_another_target_raise_target_mismatch(tmp_path):
  tparams = _target_params()
  head = dh.EagleHead(dh.HeadConfig(CFG))
  hp = _fill(jax.eval_shape(lambda: dh.init_head_params(head, jax.random.PRNGKey(0))), 1)
  dh.save_head(str(tmp_path / "h"), head, hp, target_name="tiny", target_sha256=SHA)
  with pytest.raises(artifacts.TargetMismatchError,
                     match=f"trained on a target with sha256 {SHA} \\(tiny\\).*{'0' * 64}"):
    dh.load_head(str(tmp_path / "h"), target_sha256="0" * 64)
  draft_lm, trainable, _ = distillspec.self_draft(TransformerLM(CFG), tparams, 1)
  distillspec.save_draft(str(tmp_path / "d"), trainable, draft_lm, target_name="tiny",
                         target_sha256=SHA, target_config=CFG)
  with pytest.raises(artifacts.TargetMismatchError, match="sha256"):
    load_self_draft(str(tmp_path / "d"), _target(tparams, sha="0" * 64))
  wide = CFG.replace(intermediate_size=96)  # same weights' checksum, another architecture
  with pytest.raises(artifacts.TargetMismatchError, match="intermediate_size"):
    load_self_draft(str(tmp_path / "d"), _target(tparams, config=wide))
  assert issubclass(artifacts.TargetMismatchError, checkpoint.ChecksumError)


@pytest.mark.parametrize("old,name,command", [
    ("gad.json", "gad-smollm2", "python -m train.gad --config=configs/gad_smollm2.py"),
    ("draft.json", "distillspec-smollm2-L4",
     "python -m train.distillspec --config=configs/distillspec_smollm2.py")])
def test_outdated_drafter_folder_names_its_command(tmp_path, monkeypatch, old, name, command):
  monkeypatch.setenv(registry.DRAFTS_ENV, str(tmp_path))
  folder = tmp_path / name
  (folder / "params").mkdir(parents=True)  # the orbax parameters of the old format
  (folder / old).write_text(json.dumps({"format": "decodax-draft", "version": 1}))
  kind = registry.ARTIFACTS[name].kind
  with pytest.raises(artifacts.OutdatedFormatError, match=re.escape(f"`{command}`")) as e:
    artifacts.load_artifact(name, kind)
  assert old in str(e.value) and "outdated format" in str(e.value)


def test_outdated_head_and_model_folders_name_their_command(tmp_path):
  head = tmp_path / "head"
  (head / "params").mkdir(parents=True)
  (head / "draft_head.json").write_text(json.dumps(
      {"format": "decodax-eagle-head", "metadata": {"trained_by": "python -m train.draft_head "
                                                    "--config=configs/my_head.py"}}))
  with pytest.raises(artifacts.OutdatedFormatError,
                     match="`python -m train.draft_head --config=configs/my_head.py`"):
    dh.load_head(str(head), target_sha256=SHA)
  export = tmp_path / "export"
  export.mkdir()
  (export / "decodax_model.json").write_text(json.dumps({"format": "decodax"}))
  (export / "params.safetensors").write_bytes(b"")
  with pytest.raises(artifacts.OutdatedFormatError, match="python -m train.main"):
    load_model(str(export))
  # writing the artifact anew replaces the old format in place
  artifacts.save_artifact(str(head), "eagle_head", {"w": np.zeros(2, np.float32)}, config={},
                          target=artifacts.target_entry("tiny", SHA, CFG))
  assert sorted(os.listdir(head)) == ["manifest.json", "params.safetensors"]


def test_shipped_artifacts_use_the_one_format_and_name_their_targets():
  for name, entry in registry.ARTIFACTS.items():
    if not entry.checkpoint:
      continue
    path, manifest = artifacts.read_manifest(name, entry.kind)
    assert sorted(os.listdir(path)) == ["manifest.json", "params.safetensors"], name
    assert manifest["params"]["sha256"] == checkpoint.sha256_file(
        os.path.join(path, "params.safetensors")), name
    assert manifest["info"], name  # the training run and its measurements
    if entry.target:
      assert manifest["target"]["name"] == entry.target
      assert manifest["target"]["sha256"] == artifacts.registered_sha256(entry.target)
    else:
      assert manifest["target"] is None

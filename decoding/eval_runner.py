"""A strategy over a dataset: resumable, split over processes and devices, streamed to JSONL.

`evaluate(model, rows, settings, output)` runs a text strategy over `rows` (each a `Row`: a
stable integer id and a prompt's token ids) and `evaluate_images(model, rows, settings,
output)` an image strategy over class labels. Both run one loop, `run_rows`, around a
function that decodes one batch; a caller with a pipeline of its own (a stage that reuses
earlier outputs) passes its own batch function to `run_rows`. The loop:

* resumes: a row whose id is already in `output` (or in a part file of an interrupted run)
  is not run again. Each finished batch is appended to the process's part file and flushed,
  so a killed run loses at most the batch in flight; a partial last line is dropped and
  rewritten by the rerun. `output.run.json` records what wrote the file (strategy, settings,
  seed, model); a rerun with anything else is an error, not a silently mixed file.
* splits the rows over processes: under `jax.distributed` (`init_processes`, as on a TPU pod
  slice, or local processes with CPU collectives) the pending rows are cut into batches of
  `batch_size` and process i takes batches i, i + n, i + 2n, ...; it writes
  `output.part-0000i-of-0000n`, and process 0 merges every part into `output`, in id order,
  after a barrier. Every process returns the merged results, so `output` must be on a
  filesystem all processes see.
* splits each batch over the process's own devices: the model is placed on a data x model
  mesh of `jax.local_devices()` (`place`; `models.sharding` lays out the weights over
  `model`), and each batch's rows over `data`, so `batch_size` must be a multiple of `data`.
* shows a progress bar (tqdm, on stderr) and returns one record per row, in id order.

Row i samples with its id as its row id (`decoding.runner.generate(row_ids=...)`), so which
process, batch or device runs it changes its output only through floating-point rounding.
The batches are the same whatever the number of processes (and a resumed run's remaining
batches are the uninterrupted run's), so with one device per process the file is byte for
byte the single-process file. Split over a mesh's `data` axis, a device multiplies a smaller
share of the batch, which XLA:CPU sums in another order (log-probs move by ~1e-6; greedy
tokens agree unless two logits are that close). A batch-invariant model
(`ModelConfig.batch_invariant`) on a data-only mesh runs each device's rows as their own
program (`models.sharding.rows_per_device`): the tests' tiny model then writes the
single-device file byte for byte; with a model axis too (a column block of a product can
round differently from the whole), and at SmolLM2's sizes (XLA:CPU's exp inside attention
rounds differently for one row and for eight), the tokens are the same and the floats agree
to ~1e-5.

Text records are {"id", the row's fields, "outputs": [one `Generation.to_json` per output
sequence, with "text" when the model has a tokenizer]}; image records {"id", the row's
fields, "label", "codes", "forward_passes", "accepted_drafts"}. Every argument is checked
(`GenerationError`) before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from decoding import image_strategies, registry
from decoding.errors import GenerationError
from decoding.runner import generate, plan_lengths, validate_prompts
from decoding.settings import check_int, is_int
from decoding.strategy import Resources, Target
from models import sharding


@dataclasses.dataclass(frozen=True)
class Row:
  """One dataset row: a stable id (an integer in [0, 2**32), also its PRNG row id), what the
  batch function decodes (a prompt's token ids, or a class label for images), and fields
  copied into its record (e.g. the prompt's text, a reference answer)."""
  id: int
  input: Any
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# (row ids, row inputs) -> one JSON-able dict per row, in order: what `run_rows` records.
BatchFn = Callable[[list[int], list[Any]], list[dict]]


def part_path(output: str, index: int, count: int) -> str:
  """The file process `index` of `count` streams its rows into."""
  return f"{output}.part-{index:05d}-of-{count:05d}"


def signature_path(output: str) -> str:
  """The file recording what wrote `output` (checked when a run resumes)."""
  return f"{output}.run.json"


# ------------------------------------------------------------------------------- processes


def init_processes(coordinator: str = "", num_processes: int = 1, process_id: int = 0,
                   cpu_collectives: str = "gloo") -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`); call it before
  anything touches a device. coordinator "": a single process (nothing to do); "auto": JAX
  detects the cluster (TPU pod slices, SLURM, ...); "host:port": process `process_id` of
  `num_processes`, with process 0 serving as coordinator at that address. CPU devices of
  different processes talk through `cpu_collectives` (the barriers need them)."""
  if not coordinator:
    return
  if jax.distributed.is_initialized():
    return
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if coordinator == "auto":
    jax.distributed.initialize()
    return
  host, _, port = str(coordinator).rpartition(":")
  if not host or not port.isdigit():
    raise GenerationError(f"coordinator must be 'host:port', 'auto' or '', got {coordinator!r}")
  check_int("num_processes", num_processes, 1)
  check_int("process_id", process_id, 0, num_processes - 1)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------- checks


def mesh_axes(mesh: Sequence[int]) -> tuple[int, int]:
  """(data, model) of a mesh shape, checked against this process's devices."""
  if not isinstance(mesh, (tuple, list)) or len(mesh) != 2:
    raise GenerationError(f"mesh must be (data, model), got {mesh!r}")
  data, model = mesh
  check_int("mesh data", data, 1)
  check_int("mesh model", model, 1)
  have = len(jax.local_devices())
  if data * model > have:
    raise GenerationError(
        f"mesh {data}x{model} needs {data * model} devices, this process has {have} (on CPU, "
        "simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  return int(data), int(model)


def check_ids(ids: Sequence[Any]) -> None:
  """Row ids: at least one, integers in [0, 2**32), no id twice."""
  if len(ids) == 0:
    raise GenerationError("no rows given")
  seen: dict[int, int] = {}
  for k, i in enumerate(ids):
    if not is_int(i) or not 0 <= i < 2**32:
      raise GenerationError(f"row {k}: id must be an integer in [0, 2**32), got {i!r}")
    if int(i) in seen:
      raise GenerationError(f"row id {int(i)} appears twice (rows {seen[int(i)]} and {k}): ids "
                            "must be unique")
    seen[int(i)] = k


def check_batch_size(batch_size: int, data: int) -> None:
  check_int("batch_size", batch_size, 1)
  if batch_size % data:
    raise GenerationError(f"batch_size={batch_size} is not a multiple of the mesh's data axis "
                          f"({data}): each batch is split evenly over the data devices")


def check_output(output: str) -> None:
  """The output file can be created (or appended to) and its folder written."""
  if not isinstance(output, str) or not output:
    raise GenerationError("give an output file (JSONL)")
  if os.path.isdir(output):
    raise GenerationError(f"output {output!r} is a directory: give a file path")
  folder = os.path.dirname(os.path.abspath(output))
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
      pass
    if os.path.exists(output):
      with open(output, "a"):
        pass
  except OSError as e:
    raise GenerationError(f"cannot write the output {output!r}: {e.strerror or e}") from None


# ------------------------------------------------------------------------------- placement


def place(model, data: int = 1, model_parallel: int = 1) -> tuple[Any, Optional[Callable]]:
  """`model` (a `Target`, an `ImageModel`: anything with `lm` and `params` fields) with its
  weights on a data x model mesh of this process's devices, and the function that places a
  batch's arrays (rows over `data`); (model, None) on a 1 x 1 mesh. A model already on a
  mesh of that shape is kept as it is. A batch-invariant model (`config.batch_invariant`)
  gets the column-only layout, so no product sums across devices."""
  data, model_parallel = mesh_axes((data, model_parallel))
  if data * model_parallel == 1:
    return model, None
  lm = model.lm
  mesh = getattr(lm, "mesh", None)
  local = set(jax.local_devices())
  if mesh is None or dict(mesh.shape) != {sharding.DATA: data, sharding.MODEL: model_parallel} \
      or not set(mesh.devices.flat) <= local:
    if not (dataclasses.is_dataclass(lm) and "mesh" in {f.name for f in dataclasses.fields(lm)}):
      raise GenerationError(f"{type(lm).__name__} takes no device mesh: run it on a 1x1 mesh")
    mesh = sharding.make_mesh(data, model_parallel, jax.local_devices())
    # the batch-invariant mode splits no weight on its input axis (models.sharding)
    invariant = bool(getattr(getattr(lm, "config", None), "batch_invariant", False))
    params = (sharding.shard_params(model.params, mesh, column_only=True) if invariant
              else sharding.shard_params(model.params, mesh))
    model = dataclasses.replace(model, lm=dataclasses.replace(lm, mesh=mesh), params=params)
  return model, lambda arrays: sharding.shard_batch(arrays, mesh)


# ------------------------------------------------------------------------------ the files


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(id, line) of each complete record of a JSONL file; a partial last line (a run killed
  while writing) is skipped, a broken line anywhere else is an error."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.read().split("\n")
  last = len(lines) - 1  # the text after the final newline: "" unless the write was cut
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      ok = isinstance(rec, dict) and is_int(rec.get("id"))
    except json.JSONDecodeError:
      ok = False
    if ok and n < last:
      yield int(rec["id"]), line
    elif n < last:
      raise GenerationError(f"{path}:{n + 1}: not a record with an integer id; the file was "
                            "not written by this runner (delete it or choose another output)")


def _read(output: str, parts: bool = False) -> dict[int, str]:
  """id -> line of the output file and, with `parts`, of every part file (the first copy of
  an id wins)."""
  found: dict[int, str] = {}
  paths = [output] + (sorted(glob.glob(glob.escape(output) + ".part-*-of-*")) if parts else [])
  for path in paths:
    for i, line in _lines(path):
      found.setdefault(i, line)
  return found


def rows_done(output: str) -> int:
  """How many rows `output` and its part files already hold (what a rerun would skip)."""
  return len(_read(output, parts=True))


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _merge(output: str) -> None:
  """Folds every part file into `output`, in id order, and removes the parts (process 0).
  Leaves `output` untouched when there is nothing to fold in and nothing to drop."""
  parts = sorted(glob.glob(glob.escape(output) + ".part-*-of-*"))
  found = _read(output, parts=True)
  if not parts and os.path.exists(output):
    with open(output) as f:
      text = f.read()
    if text == "".join(found[i] + "\n" for i in sorted(found)):
      return
  if parts or os.path.exists(output):
    _write_atomic(output, "".join(found[i] + "\n" for i in sorted(found)))
  for p in parts:
    os.remove(p)


def _differences(stored: Any, wanted: Any, where: str = "") -> list[str]:
  if isinstance(stored, dict) and isinstance(wanted, dict):
    out = []
    for k in sorted(set(stored) | set(wanted)):
      out += _differences(stored.get(k), wanted.get(k), f"{where}.{k}" if where else k)
    return out
  return [] if stored == wanted else [f"{where}: {stored!r} in the file, {wanted!r} now"]


def _check_signature(output: str, signature: Optional[Mapping]) -> None:
  path = signature_path(output)
  if signature is None or not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f)
  diff = _differences(stored, json.loads(json.dumps(signature)))
  if diff:
    raise GenerationError(f"{output} was written by another run ({'; '.join(diff[:3])}): "
                          f"delete it and {path}, or choose another output")


def numerics_of(lm) -> dict:
  """What decides a model's floating-point results besides its weights: the dtypes, the dot
  precision, the matmul kernel and the batch-invariant mode (empty for a model without a
  `ModelConfig`). Part of a run's signature, so a resumed file is not mixed across them."""
  config = getattr(lm, "config", None)
  if config is None or not hasattr(config, "batch_invariant"):
    return {}
  name = lambda d: None if d is None else np.dtype(d).name
  return {"dtype": name(config.dtype), "param_dtype": name(config.param_dtype),
          "proj_dtype": name(config.proj_dtype), "matmul_precision": config.matmul_precision,
          "matmul_kernel": config.matmul_kernel, "batch_invariant": bool(config.batch_invariant)}


# -------------------------------------------------------------------------------- the loop


def run_rows(rows: Sequence[Row], run_batch: BatchFn, output: str, *, batch_size: int,
             data_parallel: int = 1, signature: Optional[Mapping] = None,
             progress: bool = True, desc: str = "evaluating") -> list[dict]:
  """Runs `run_batch` over the rows not yet in `output`, this process's share of them (see
  the module docstring), appending each batch's records to the process's part file as it
  finishes; merges the parts into `output` (id order) and returns every row's record in id
  order. `signature` (JSON-able) describes the run; a rerun with another one is an error.
  `data_parallel` is the mesh's data axis (`batch_size` must be a multiple of it)."""
  check_ids([r.id for r in rows])
  check_batch_size(batch_size, data_parallel)
  check_output(output)
  _check_signature(output, signature)
  index, count = jax.process_index(), jax.process_count()
  if index == 0:  # fold in an interrupted run's parts, drop its partial lines
    _merge(output)
  _barrier(f"decodax-eval-start {output}")
  done = _read(output)
  ids = {int(r.id) for r in rows}
  unknown = sorted(set(done) - ids)
  if unknown:  # every process raises alike: none is left waiting at a barrier
    raise GenerationError(f"{output} holds {len(unknown)} row(s) whose id is not in this "
                          f"dataset (e.g. {unknown[0]}): it was written for other rows; delete "
                          "it or choose another output")
  if index == 0 and signature is not None and not os.path.exists(signature_path(output)):
    _write_atomic(signature_path(output), json.dumps(signature, indent=1) + "\n")
  pending = [r for r in rows if int(r.id) not in done]
  batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
  mine = batches[index::count]
  if count > 1:
    desc = f"{desc} [process {index}/{count}]"
  if done:
    desc = f"{desc} ({len(done)} of {len(rows)} rows done before)"
  bar = tqdm(total=sum(len(b) for b in mine), desc=desc, unit="row", file=sys.stderr,
             disable=not progress)
  if mine:
    with open(part_path(output, index, count), "a") as f:
      for batch in mine:
        results = run_batch([int(r.id) for r in batch], [r.input for r in batch])
        if len(results) != len(batch):
          raise RuntimeError(f"the batch function returned {len(results)} records for "
                             f"{len(batch)} rows")
        f.write("".join(json.dumps(_record(r, res)) + "\n" for r, res in zip(batch, results)))
        f.flush()
        os.fsync(f.fileno())
        bar.update(len(batch))
  bar.close()
  _barrier(f"decodax-eval-done {output}")
  if index == 0:
    _merge(output)
  _barrier(f"decodax-eval-merged {output}")
  final = _read(output)
  missing = sorted(ids - set(final))
  if missing:
    raise GenerationError(f"{len(missing)} row(s) missing from {output} after the merge (e.g. "
                          f"id {missing[0]}): with several processes the output must be on a "
                          "filesystem every process sees")
  return [json.loads(final[i]) for i in sorted(ids)]


def _record(row: Row, result: dict) -> dict:
  clash = set(row.fields) & set(result) | ({"id"} & (set(row.fields) | set(result)))
  if clash:
    raise GenerationError(f"row {row.id}: field(s) {sorted(clash)} clash with the record's own")
  return {"id": int(row.id), **row.fields, **result}


# ------------------------------------------------------------------------- text and images


def evaluate(model, rows: Sequence[Row], settings, output: str, *, seed: int = 0,
             batch_size: int = 8, mesh: Sequence[int] = (1, 1), max_cache_len: int = 0,
             resources: Optional[Resources] = None, progress: bool = True,
             desc: Optional[str] = None, share_prefix: bool = False) -> list[dict]:
  """Runs a text strategy (`settings`) over rows of token-id prompts (`Row.input`) and
  returns one record per row in id order: {"id", the row's fields, "outputs": its
  `Generation`s as JSON, `index` = the row id, plus "text" when the model has a
  tokenizer}. model: a loaded model or a `Target`; mesh: (data, model) devices of each
  process; `batch_size` rows per batch (a multiple of data); share_prefix: prefill a
  batch's common prompt prefix once (`decoding.runner.generate`). See the module docstring."""
  target = model if isinstance(model, Target) else Target.of(model)
  strategy = registry.strategy_of(settings)
  if strategy.modality != "text":
    raise GenerationError(f"strategy {strategy.name!r} generates images: use evaluate_images")
  if strategy.needs_tokenizer and target.tokenizer is None:
    raise GenerationError(f"strategy {strategy.name!r} works on text: the model needs a tokenizer")
  if not is_int(seed):
    raise GenerationError(f"seed must be an integer, got {seed!r}")
  check_int("max_cache_len", max_cache_len, 0)
  data, model_parallel = mesh_axes(mesh)
  check_ids([r.id for r in rows])
  check_batch_size(batch_size, data)
  check_output(output)
  for r in rows:
    if not isinstance(r.input, (list, tuple, np.ndarray)):
      raise GenerationError(f"row {r.id}: the input must be a prompt's token ids, got "
                            f"{type(r.input).__name__}")
    try:
      validate_prompts([r.input], target.lm.vocab_size)
    except GenerationError as e:
      raise GenerationError(f"row {r.id}: {str(e).replace('prompt 0 ', 'prompt ')}") from None
  if hasattr(settings, "max_new_tokens"):
    plan_lengths(settings.max_new_tokens, max(len(r.input) for r in rows),
                 target.lm.max_positions, max_cache_len)
  signature = {"strategy": strategy.name, "settings": settings.to_flat(), "seed": int(seed),
               "model": target.name, "model_sha256": target.sha256,
               "numerics": numerics_of(target.lm)}
  if share_prefix:  # other floats in the last bits: a file is written one way only
    signature["share_prefix"] = True
  _check_signature(output, signature)
  placed, shard = place(target, data, model_parallel)
  resources = Resources() if resources is None else resources
  tok = target.tokenizer

  def run_batch(ids: list[int], prompts: list[Any]) -> list[dict]:
    gens = generate(placed, prompts, settings, seed=seed, batch_size=batch_size,
                    max_cache_len=max_cache_len, row_ids=ids, shard=shard, resources=resources,
                    share_prefix=share_prefix)
    outputs: list[list[dict]] = [[] for _ in ids]
    for g in gens:
      k, g.index = g.index, ids[g.index]
      text = {} if tok is None else {"text": tok.decode(g.output_ids, skip_special_tokens=True)}
      outputs[k].append(g.to_json(**text))
    return [{"outputs": o} for o in outputs]

  return run_rows(rows, run_batch, output, batch_size=batch_size, data_parallel=data,
                  signature=signature, progress=progress, desc=desc or strategy.name)


def evaluate_images(model, rows: Sequence[Row], settings, output: str, *, seed: int = 0,
                    batch_size: int = 50, mesh: Sequence[int] = (1, 1),
                    resources: Optional[Resources] = None, progress: bool = True,
                    desc: Optional[str] = None) -> list[dict]:
  """Runs an image strategy (`ImageAR`, `ImageSJD`, `ImageEagle`) over rows whose input is a
  class label (-1: unconditional) and returns one record per row in id order: {"id", the
  row's fields, "label", "codes" (g*g ints), "forward_passes", "accepted_drafts"}. Image i
  samples with fold_in(PRNGKey(seed), id), as `image_strategies.generate_codes` with
  `row_ids`; every batch is padded to `batch_size` (one compiled shape)."""
  strategy = registry.strategy_of(settings)
  if strategy.modality != "image":
    raise GenerationError(f"strategy {strategy.name!r} generates text: use evaluate")
  if not is_int(seed):
    raise GenerationError(f"seed must be an integer, got {seed!r}")
  data, model_parallel = mesh_axes(mesh)
  check_ids([r.id for r in rows])
  check_batch_size(batch_size, data)
  check_output(output)
  image_strategies.check_labels(model.layout, [r.input for r in rows])
  signature = {"strategy": strategy.name, "settings": settings.to_flat(), "seed": int(seed),
               "model_sha256": model.sha256}
  _check_signature(output, signature)
  placed, shard = place(model, data, model_parallel)
  resources = Resources() if resources is None else resources

  def run_batch(ids: list[int], labels: list[Any]) -> list[dict]:
    out = image_strategies.generate_codes(placed, labels, settings, seed, batch_size,
                                          resources=resources, row_ids=ids, shard=shard)
    return [{"label": int(label), "codes": [int(c) for c in out["codes"][k]],
             "forward_passes": int(out["forward_passes"][k]),
             "accepted_drafts": int(out["accepted_drafts"][k])}
            for k, label in enumerate(labels)]

  return run_rows(rows, run_batch, output, batch_size=batch_size, data_parallel=data,
                  signature=signature, progress=progress, desc=desc or strategy.name)


def image_outputs(records: Sequence[dict]) -> dict:
  """`generate_codes`'s arrays ("codes", "forward_passes", "accepted_drafts") from image
  records."""
  return {"codes": np.asarray([r["codes"] for r in records], np.int32),
          "forward_passes": np.asarray([r["forward_passes"] for r in records], np.int64),
          "accepted_drafts": np.asarray([r["accepted_drafts"] for r in records], np.int64)}

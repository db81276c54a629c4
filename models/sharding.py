"""Device meshes and partition rules for parameters, KV cache and batch.

The mesh has two axes: `data` (batch rows) and `model` (weights: attention heads'
output features, MLP hidden units, vocabulary). Rules are matched on the parameter
path; a dimension is only split when the axis size divides it, otherwise it stays
replicated, so any mesh shape is valid. GSPMD inserts the collectives.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.kv_cache import KVCache
from models.numerics import path_name

DATA, MODEL = "data", "model"

# (path regex, spec for the trailing dims); the stacked-layer axis, if any, is replicated.
PARAM_RULES: Sequence[tuple[str, tuple]] = (
    (r"embed/table$", (None, MODEL)),  # [D, V]
    (r"lm_head/kernel$", (None, MODEL)),  # [D, V]
    (r"attn/(q_proj|k_proj|v_proj|qkv_proj)/kernel$", (None, MODEL)),  # [D, H*hd]
    (r"attn/(q_proj|k_proj|v_proj|qkv_proj)/bias$", (MODEL,)),
    (r"attn/o_proj/kernel$", (MODEL, None)),  # [H*hd, D]
    (r"(mlp|shared_mlp)/(gate_proj|up_proj|gate_up_proj)/kernel$", (None, MODEL)),  # [D, F]
    (r"(mlp|shared_mlp)/down_proj/kernel$", (MODEL, None)),  # [F, D]
    (r"norm/scale$", (None,)),
)


def make_mesh(data: int = 1, model: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  if data < 1 or model < 1:
    raise ValueError(f"mesh axes must be >= 1, got data={data}, model={model}")
  if data * model > len(devices):
    raise ValueError(
        f"mesh {data}x{model} needs {data * model} devices, only {len(devices)} available "
        "(on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  return Mesh(np.array(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def _fit(spec: tuple, shape: tuple, mesh: Mesh) -> P:
  """Right-aligns `spec` on `shape` and drops axes that do not divide their dimension."""
  spec = (None,) * (len(shape) - len(spec)) + tuple(spec)
  out = []
  for dim, ax in zip(shape, spec):
    out.append(ax if ax is not None and dim % mesh.shape[ax] == 0 else None)
  return P(*out)


# Batch-invariant mode: no product may sum over a split axis (partial sums combined across
# devices would be added in an order that depends on the mesh), so the two row-parallel
# projections are split by output columns too; their input is gathered instead.
COLUMN_ONLY_RULES: Sequence[tuple[str, tuple]] = (
    (r"attn/o_proj/kernel$", (None, MODEL)),
    (r"(mlp|shared_mlp)/down_proj/kernel$", (None, MODEL)),
)


def param_specs(params: Any, mesh: Mesh, column_only: bool = False) -> Any:
  """PartitionSpecs of `params` on `mesh`; `column_only`: no weight split on its input axis."""
  rules = tuple(COLUMN_ONLY_RULES if column_only else ()) + tuple(PARAM_RULES)

  def spec(path, leaf):
    name = path_name(path)
    for pattern, rule in rules:
      if re.search(pattern, name):
        return _fit(rule, leaf.shape, mesh)
    return P()
  return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params: Any, mesh: Mesh, column_only: bool = False) -> Any:
  table = params.get("embed", {}).get("table") if isinstance(params, dict) else None
  if table is not None and table.ndim == 3:
    raise ValueError("packed weights (matmul_kernel='packed') run on one CPU device; the "
                     "sharding rules name [K, N] matrices: load with matmul_kernel='xla' "
                     "to shard over a mesh")
  specs = param_specs(params, mesh, column_only)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def cache_spec(shape: tuple, mesh: Mesh) -> P:
  """KV cache [(L,) B, Hkv, T, hd]: batch over data, KV heads over model when divisible."""
  return _fit((DATA, MODEL, None, None), shape, mesh)


def batch_spec(shape: tuple, mesh: Mesh) -> P:
  return _fit((DATA,) + (None,) * (len(shape) - 1), shape, mesh)


def shard_batch(arrays: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec(x.shape, mesh))),
                      arrays)


def rows_per_device(fn: Callable[..., Any], mesh: Mesh, batch_size: int, params: Any,
                    *args: Any) -> Any:
  """fn(params, *args) with every data device running it on its own rows only.

  A `shard_map` over the data axis of a data-only mesh (model axis 1): the weights are
  replicated, every array argument whose leading dimension is the batch is split by rows
  (a KV cache by its batch axis), and each device runs exactly the program a single device
  would run on those rows. Under GSPMD a data-parallel product is instead partitioned as
  XLA sees fit (a fixed-size row chunk may be split over devices and summed in another
  order), so this is what makes a batch-invariant model (`models.batch_invariant`) give the
  same bits on any data-parallel mesh. Outputs with a leading batch dimension are
  gathered back in row order. `batch_size` must divide evenly over the data axis.
  """
  if mesh.shape[MODEL] != 1 or batch_size % mesh.shape[DATA]:
    raise ValueError(f"rows_per_device needs a data-only mesh dividing the batch; got mesh "
                     f"{dict(mesh.shape)} for {batch_size} rows")

  def spec(x: Any) -> P:
    if isinstance(x, KVCache):
      rows = lambda a: P(*([None] * (a.ndim - 4) + [DATA]))  # [(L,) B, Hkv, T, hd]
      return KVCache(k=jax.tree.map(rows, x.k), v=jax.tree.map(rows, x.v), lengths=P(DATA))
    return jax.tree.map(lambda a: P(DATA) if a.ndim and a.shape[0] == batch_size else P(), x)

  is_cache = lambda x: isinstance(x, KVCache)
  in_specs = (jax.tree.map(lambda _: P(), params),) + tuple(
      jax.tree.map(spec, a, is_leaf=is_cache) for a in args)
  out_shape = jax.eval_shape(fn, params, *args)
  out_specs = jax.tree.map(spec, out_shape, is_leaf=is_cache)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(params, *args)

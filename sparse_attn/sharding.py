"""Device mesh, logical axis rules, and placing parameters and batches on the mesh.

Parameters carry logical axis names at their init sites (model.py: "embed", "heads", "kv",
"mlp", "vocab", "classes"); activations' batch axis is "batch". The config maps logical
names to mesh axes ("data", "model"), so the same model runs on one CPU or a pod:

  config.mesh.shape = (-1, 1)          # (data, model); -1 = all remaining devices
  config.mesh.rules = [("batch", "data"), ("heads", "model"), ("mlp", "model"), ...]

Multi-host: `maybe_initialize_distributed(config)` calls `jax.distributed.initialize()`
when the config or the environment asks for it; each process then feeds its slice of the
global batch (`global_batch`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

DEFAULT_RULES = (
    ("batch", DATA),
    ("heads", MODEL),
    ("mlp", MODEL),
    ("embed", None),
    ("kv", None),
    ("vocab", None),
    ("classes", None),
)


def maybe_initialize_distributed(config) -> None:
  """Initialises multi-process JAX when asked to.

  Triggered by `config.distributed.enabled` or by the standard environment variables
  (JAX_COORDINATOR_ADDRESS). Explicit coordinator/process settings in the config are
  passed through; on managed clusters (TPU pods, SLURM) `initialize()` discovers them.
  """
  dist = config.get("distributed") or {}
  if not (dist.get("enabled", False) or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  if dist.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", dist["cpu_collectives"])
  kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id")
            if dist.get(k) not in (None, "", -1)}
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a ("data", "model") mesh.

  Args:
    shape: (data, model) sizes; one entry may be -1 (all remaining devices).
    devices: devices to use (default: all global devices).

  Returns:
    A `Mesh` of shape `shape` over `devices`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 2:
    raise ValueError(f"mesh.shape must be (data, model); got {tuple(shape)}.")
  if shape.count(-1) > 1:
    raise ValueError("At most one mesh dimension may be -1.")
  if -1 in shape:
    other = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % other:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {tuple(shape)}.")
    shape[shape.index(-1)] = len(devices) // other
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
        f"Mesh {tuple(shape)} needs {int(np.prod(shape))} devices but {len(devices)} are "
        "available; set config.mesh.shape to match (use -1 for 'the rest'), e.g. (-1, 1).")
  # Auto axes: XLA's sharding propagation places intermediates (GSPMD); parameters and
  # batches get explicit shardings from the logical rules.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_from_config(rules) -> tuple[tuple[str, str | None], ...]:
  """Normalises config rules (list of [logical, mesh-axis-or-None]) into a tuple."""
  out = []
  for r in rules:
    logical, axis = r
    if axis not in (None, DATA, MODEL):
      raise ValueError(f"Logical rule {tuple(r)} maps to unknown mesh axis {axis!r}; "
                       f"use one of {MESH_AXES} or None.")
    out.append((str(logical), axis))
  return tuple(out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a pytree whose leaves may carry logical partitioning boxes.

  Args:
    abstract_boxed: e.g. `jax.eval_shape(init_fn, ...)` output with `nn.Partitioned`
      leaves (unboxed leaves are replicated).
    mesh: the device mesh.
    rules: logical-to-mesh rules.

  Returns:
    A pytree of `NamedSharding` with the structure of the unboxed tree.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Shards the leading (batch) axis over "data"; the rest replicated."""
  return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local slice into global arrays sharded over "data".

  Args:
    local_batch: this process's rows, dict of [B_local, ...] numpy arrays.
    mesh: the device mesh.

  Returns:
    Dict of global [B_local * process_count, ...] jax.Arrays.
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local_batch.items()}


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  """Errors unless the global batch splits evenly over the data axis and processes."""
  data = mesh.shape[DATA]
  if global_batch_size % data or global_batch_size % jax.process_count():
    raise ValueError(
        f"Global batch size {global_batch_size} must be divisible by the data-parallel "
        f"size {data} and by the process count {jax.process_count()}.")

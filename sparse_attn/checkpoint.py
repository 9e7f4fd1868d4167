"""Checkpoints: one orbax CheckpointManager per workdir, holding state, masks and config.

Items of every checkpoint step (directory `<workdir>/checkpoints/<step>/`):
  state        the TrainState pytree (params, structure params, optimizer state, step, rng)
  masks        the binarised structural masks {"layer_i": bool [H|1, n, n]} (when any)
  masks_meta   JSON: method, sequence length, per-layer/per-head densities, step, ...
  config       JSON: the experiment config
  checksums    JSON: a 64-bit fingerprint of every array of `state` and `masks`

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it
when complete), so a checkpoint directory is never half-written. Kept: the latest
`keep` steps and the best `keep_best` by the dev metric.

Integrity: the fingerprints are computed on device when a save starts and checked after
every restore; any mismatch (a flipped bit on disk) makes that step unreadable, so it
falls back like a step that does not parse. A single flipped bit always changes the
fingerprint (see `fingerprints`).

Resume order (train.py): the latest restorable step in the workdir (a corrupted latest
step is skipped with a warning, falling back to the previous one, and renamed to
`<step>.unreadable-<n>` so the resumed run can write that step again); else
`config.init_from`; else random initialisation.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from sparse_attn.errors import UserError


class CheckpointError(UserError, RuntimeError):
  """No usable checkpoint could be restored."""


class IntegrityError(CheckpointError):
  """A restored array differs from the one that was saved (its fingerprint changed)."""


def _fingerprint_leaf(x: jax.Array) -> jax.Array:
  """Two uint32 sums of the array's bits: sum(u * (2i + 1)) and sum(u ^ (i * phi)).

  u is the leaf's bit pattern as uint32 words, i the flat word index. Changing one bit of
  word i changes the first sum by +-2^k (2i + 1) mod 2^32, which is never 0 (an odd
  factor), so a single flipped bit is always detected; the second sum mixes positions
  so that swapped or shifted words are caught too.
  """
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  else:
    word = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
  i = _flat_index(u.shape)  # Built from iotas: no reshape of a sharded array.
  a = jnp.sum(u * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  b = jnp.sum(u ^ (i * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)
  return jnp.stack([a, b])


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major flat index of every element of an array of `shape`."""
  out = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    out = out + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return out


@jax.jit
def _fingerprint_tree(tree: Any) -> Any:
  return jax.tree.map(_fingerprint_leaf, tree)


def fingerprints(tree: Any) -> dict[str, str]:
  """{"path/to/leaf": 16 hex digits} for every array leaf of `tree` (host or device).

  Computed on the arrays' own devices and shardings (one elementwise pass), so it costs
  no host copy and gives the same value on any mesh.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  if not leaves:
    return {}
  paths = [_path_name(p) for p, _ in leaves]
  values = _fingerprint_tree([jnp.asarray(v) if isinstance(v, np.ndarray) else v
                              for _, v in leaves])
  out = {}
  for path, v in zip(paths, values):
    if isinstance(v, jax.Array) and not v.is_fully_addressable:
      v = v.addressable_data(0)  # Replicated: every process holds the value.
    a, b = (int(w) for w in np.asarray(v))
    out[path] = f"{a:08x}{b:08x}"
  return out


def _path_name(path) -> str:
  """"opt_state/1/mu/..." for a key path, the same for a typed and an untyped restore."""
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(name(k) for k in path)


def _verify(kind: str, tree: Any, expected: dict[str, str] | None, where: str) -> None:
  """Raises IntegrityError when a restored tree's fingerprints differ from the saved."""
  if expected is None:
    return  # Saved before fingerprints were recorded.
  got = fingerprints(tree)
  bad = sorted(k for k in set(got) | set(expected) if expected.get(k) != got.get(k))
  if bad:
    raise IntegrityError(f"{where}: {len(bad)} array(s) of '{kind}' differ from what was "
                         f"saved (fingerprint mismatch: {bad[:3]}); the files are corrupted.")


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying shardings, the restore target for StandardRestore."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


class Checkpointer:
  """The workdir's CheckpointManager with this library's items.

  Args:
    directory: `<workdir>/checkpoints`.
    keep: how many of the latest steps to keep.
    keep_best: how many of the best steps (by `best_metric`, higher is better) to keep.
    best_metric: name of the metric in the `metrics` dict passed to `save`.
    async_save: write in a background thread.
    read_only: only restore: the directory is never created (a missing one raises
      CheckpointError) and `save` is refused.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, keep_best: int = 1,
               best_metric: str | None = None, async_save: bool = True,
               read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric = best_metric
    self.read_only = read_only
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"No checkpoints directory {self.directory}: check the path, "
                            "or train that run first.")
    policies = [LatestN(n=max(1, keep))]
    if best_metric and keep_best > 0:
      policies.append(BestN(get_metric_fn=lambda m: _rank(m[best_metric]), n=keep_best,
                            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, save_interval_steps=0 if read_only else 1)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    if read_only:  # orbax announces read-only managers with warnings: expected here.
      absl_log.setLevel(logging.ERROR)
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_names=("state", "masks", "masks_meta", "config", "checksums"))
    finally:
      absl_log.setLevel(level)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def has_step(self, step: int) -> bool:
    return step in self.manager.all_steps()

  def _check_step(self, step: int | None) -> None:
    if step is not None and not self.has_step(step):
      raise CheckpointError(f"No checkpoint of step {step} in {self.directory}; the steps "
                            f"there are {self.all_steps()}. Pass one of them (or no step "
                            "for the latest).")

  def save(self, step: int, state: Any, *, masks: dict[str, np.ndarray] | None = None,
           masks_meta: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an (async) save of `step`; returns whether a save was started.

    The fingerprints of `state` and `masks` are computed before the save starts (the
    caller may donate `state` to the next step right after).
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only; nothing is saved.")
    items = {"state": ocp.args.StandardSave(state)}
    sums = {"state": fingerprints(state)}
    if masks:
      masks = {k: np.asarray(v) for k, v in masks.items()}
      items["masks"] = ocp.args.StandardSave(masks)
      sums["masks"] = fingerprints(masks)
    if masks or (masks_meta or {}).get("gates") is not None:  # Gates live in the metadata.
      items["masks_meta"] = ocp.args.JsonSave(_jsonable(masks_meta or {}))
    items["checksums"] = ocp.args.JsonSave(sums)
    if config is not None:
      items["config"] = ocp.args.JsonSave(_jsonable(config))
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                             force=force)

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def restore_state(self, target: Any, step: int | None = None, *,
                    set_aside_unreadable: bool = False) -> tuple[Any, int] | None:
    """Restores the state of `step`, or of the newest restorable step.

    Args:
      target: a state pytree (arrays or ShapeDtypeStructs) giving structure, dtypes and
        shardings; restoring onto another mesh only needs other shardings here.
      step: a specific step, or None for the newest one that restores cleanly.
      set_aside_unreadable: rename the newer steps that failed to restore to
        `<step>.unreadable-<n>` (kept for inspection), so a resumed run can save those
        step numbers again.

    Returns:
      (state, step), or None when the directory holds no checkpoint.
    """
    target = abstract(target)

    def restore(s):
      out = self.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      _verify("state", out["state"], self._checksums(s, "state"), str(self.directory / str(s)))
      return out["state"]
    return self._newest_restorable(step, restore, set_aside_unreadable)

  def restore_params(self, step: int | None = None) -> tuple[Any, int] | None:
    """The parameters ({"model": ..., "structure": ...}) of `step` or the newest readable one.

    Restores without a target (host arrays), so nothing of the run that saved them (its
    optimizer, its data) has to be rebuilt: how a finished run is loaded for evaluation,
    distillation or pruned-model extraction. Unreadable newer steps are skipped (logged),
    never moved.

    Returns:
      (params, step), or None when the directory holds no checkpoint.
    """
    def restore(s):
      target = self._local_target(s)
      out = self.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      state = out["state"]
      _verify("state", state, self._checksums(s, "state"), str(self.directory / str(s)))
      params = state["params"] if isinstance(state, dict) else state.params
      return jax.tree.map(np.asarray, dict(params))
    return self._newest_restorable(step, restore, set_aside_unreadable=False)

  def _local_target(self, step: int) -> Any:
    """The saved state's tree as ShapeDtypeStructs on this process's first device.

    A target-less restore refuses a checkpoint saved on another topology (another mesh or
    process count); this target lays every array on one local device instead.
    """
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that an item-level metadata file is absent.
    try:
      meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
    finally:
      absl_log.setLevel(level)
    tree = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))

  def _newest_restorable(self, step: int | None, restore, set_aside_unreadable: bool
                         ) -> tuple[Any, int] | None:
    """`restore(step)` of `step`, or of the newest step that restores cleanly."""
    self._check_step(step)
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      return None
    errors, failed = [], []
    for s in steps:
      try:
        out = restore(s)
        if errors:
          logging.warning("Restored step %d after skipping unreadable checkpoint(s): %s",
                          s, "; ".join(errors))
          if set_aside_unreadable:
            self._set_aside(failed)
        return out, s
      except Exception as e:  # noqa: BLE001 - any failure means "try an older step".
        msg = f"step {s}: {type(e).__name__}: {str(e)[:300]}"
        logging.warning("Checkpoint %s could not be restored (%s); trying an older one.",
                        self.directory / str(s), msg)
        errors.append(msg)
        failed.append(s)
    raise CheckpointError(f"No checkpoint in {self.directory} could be restored:\n  " +
                          "\n  ".join(errors) + "\nMove the directory away to start afresh.")

  def _checksums(self, step: int, item: str) -> dict[str, str] | None:
    """The fingerprints saved with `step` for `item`, or None (an older checkpoint)."""
    if not (self.directory / str(step) / "checksums").exists():
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(
        checksums=ocp.args.JsonRestore()))["checksums"]
    return dict(out).get(item)

  def set_aside(self, steps: list[int], reason: str = "unreadable") -> None:
    """Renames step directories to `<step>.<reason>-<n>`, out of the manager's view.

    Kept for inspection; the run can save those step numbers again. Process 0 renames,
    every process reloads.
    """
    self._set_aside(steps, reason)

  def _set_aside(self, steps: list[int], reason: str = "unreadable") -> None:
    if jax.process_index() == 0:
      for s in steps:
        src = self.directory / str(s)
        n = 0
        while (dst := self.directory / f"{s}.{reason}-{n}").exists():
          n += 1
        src.rename(dst)
        logging.warning("Moved %s checkpoint %s to %s.", reason, src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("sparse_attn_checkpoint_set_aside")
    self.manager.reload()

  def restore_model_params(self, step: int | None = None) -> Any:
    """The model weights ("params"/"model") of `step` (default: newest readable), host arrays.

    Restores without a target, so the other items of the state (optimizer, structure
    params) may differ from the caller's: this is how `init_from="run:<dir>"` starts a new
    run, with a new structure or optimizer, from another run's weights.
    """
    got = self.restore_params(step)
    return None if got is None else got[0]["model"]

  def restore_masks(self, step: int | None = None) -> tuple[dict[str, np.ndarray],
                                                            dict[str, Any]] | None:
    """Restores (masks, metadata) of `step` (default latest), or None if it saved none.

    A structure of gates only (attention-layer pruning) has metadata and no mask arrays:
    ({}, metadata).
    """
    step = self.latest_step() if step is None else step
    if step is None or not (self.directory / str(step) / "masks_meta").exists():
      return None
    has_masks = (self.directory / str(step) / "masks").exists()
    items = {"masks_meta": ocp.args.JsonRestore()}
    if has_masks:
      items["masks"] = ocp.args.StandardRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if not has_masks:
      return {}, dict(out["masks_meta"])
    _verify("masks", out["masks"], self._checksums(step, "masks"),
            str(self.directory / str(step)))
    return {k: np.asarray(v) for k, v in out["masks"].items()}, dict(out["masks_meta"])

  def restore_config(self, step: int | None = None) -> dict[str, Any] | None:
    """The experiment config saved with `step` (default latest), or None."""
    self._check_step(step)
    step = self.latest_step() if step is None else step
    if step is None or not (self.directory / str(step) / "config").exists():
      return None
    return dict(self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"])


def _rank(value: Any) -> float:
  """A dev metric as a sort key: NaN (e.g. Pearson of constant predictions) ranks last."""
  value = float(value)
  return -np.inf if np.isnan(value) else value


def _jsonable(obj: Any) -> Any:
  """Converts numpy / tuple values so json.dumps accepts them."""
  return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                               else str(o)))

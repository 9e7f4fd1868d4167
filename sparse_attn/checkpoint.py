"""Checkpoints: one orbax CheckpointManager per workdir, holding state, masks and config.

Items of every checkpoint step (directory `<workdir>/checkpoints/<step>/`):
  state        the TrainState pytree (params, structure params, optimizer state, step, rng)
  masks        the binarised structural masks {"layer_i": bool [H|1, n, n]} (when any)
  masks_meta   JSON: method, sequence length, per-layer/per-head densities, step, ...
  config       JSON: the experiment config

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it
when complete), so a checkpoint directory is never half-written. Kept: the latest
`keep` steps and the best `keep_best` by the dev metric.

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
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN


class CheckpointError(RuntimeError):
  """No usable checkpoint could be restored."""


def _abstract(tree: Any) -> Any:
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
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, keep_best: int = 1,
               best_metric: str | None = None, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric = best_metric
    policies = [LatestN(n=max(1, keep))]
    if best_metric and keep_best > 0:
      policies.append(BestN(get_metric_fn=lambda m: _rank(m[best_metric]), n=keep_best,
                            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("state", "masks", "masks_meta", "config"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, masks: dict[str, np.ndarray] | None = None,
           masks_meta: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an (async) save of `step`; returns whether a save was started."""
    items = {"state": ocp.args.StandardSave(state)}
    if masks:
      items["masks"] = ocp.args.StandardSave(
          {k: np.asarray(v) for k, v in masks.items()})
      items["masks_meta"] = ocp.args.JsonSave(_jsonable(masks_meta or {}))
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
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      return None
    abstract = _abstract(target)
    errors, failed = [], []
    for s in steps:
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
        if errors:
          logging.warning("Restored step %d after skipping unreadable checkpoint(s): %s",
                          s, "; ".join(errors))
          if set_aside_unreadable:
            self._set_aside(failed)
        return out["state"], s
      except Exception as e:  # noqa: BLE001 - any failure means "try an older step".
        msg = f"step {s}: {type(e).__name__}: {str(e)[:300]}"
        logging.warning("Checkpoint %s could not be restored (%s); trying an older one.",
                        self.directory / str(s), msg)
        errors.append(msg)
        failed.append(s)
    raise CheckpointError(f"No checkpoint in {self.directory} could be restored:\n  " +
                          "\n  ".join(errors) + "\nMove the directory away to start afresh.")

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable step directories out of the manager's view (process 0 only)."""
    if jax.process_index() == 0:
      for s in steps:
        src = self.directory / str(s)
        n = 0
        while (dst := self.directory / f"{s}.unreadable-{n}").exists():
          n += 1
        src.rename(dst)
        logging.warning("Moved unreadable checkpoint %s to %s.", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("sparse_attn_checkpoint_set_aside")
    self.manager.reload()

  def restore_model_params(self, step: int | None = None) -> Any:
    """The model weights ("params"/"model") of `step` (default latest), host arrays.

    Restores without a target, so the other items of the state (optimizer, structure
    params) may differ from the caller's: this is how `init_from="run:<dir>"` starts a new
    run, with a new structure or optimizer, from another run's weights.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    state = out["state"]
    params = state["params"] if isinstance(state, dict) else state.params
    return jax.tree.map(np.asarray, params["model"])

  def restore_masks(self, step: int | None = None) -> tuple[dict[str, np.ndarray],
                                                            dict[str, Any]] | None:
    """Restores (masks, metadata) of `step` (default latest), or None if it has none."""
    step = self.latest_step() if step is None else step
    if step is None or not (self.directory / str(step) / "masks").exists():
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(
        masks=ocp.args.StandardRestore(), masks_meta=ocp.args.JsonRestore()))
    return {k: np.asarray(v) for k, v in out["masks"].items()}, dict(out["masks_meta"])

  def restore_config(self, step: int | None = None) -> dict[str, Any] | None:
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

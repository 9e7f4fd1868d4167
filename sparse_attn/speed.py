"""The speed-up a run's structure buys: its train step against the same model dense.

`compare_with_dense(run, state, batch, repeats)` times, on one batch of the longest length
bucket, the run's own jitted train step (its masks on the backend they were prepared for)
and the train step of the same model without any mask (attention_backend='dense'), each
compiled first and then run `repeats` times in turn; medians. Nothing is updated: the
steps run on copies of the state. This is what `train.compare_dense_steps` reports next
to the accuracy (results.json `timing.dense_comparison`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from sparse_attn.train_steps import make_train_step


def _time_steps(fns: dict[str, Any], args: tuple, repeats: int) -> dict[str, float]:
  for f in fns.values():
    jax.block_until_ready(f(*args))            # Compile and warm up.
  walls: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():                   # Round-robin: load hits both alike.
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      walls[k].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in walls.items()}


def pad_batch(batch: dict[str, Any], length: int) -> dict[str, Any]:
  """A batch padded to `length` tokens: [B, L] arrays get zeros (padding: attention_mask
  and label_mask 0), other entries (the [B, P] masked-LM position lists) are kept."""
  def pad(k, x):
    x = np.asarray(x)
    if k == "example_mask" and x.shape[-1] < length:   # Padding keeps its diagonal only.
      out = np.zeros((x.shape[0], length, length), bool)
      out[:, np.arange(length), np.arange(length)] = True
      out[:, :x.shape[1], :x.shape[2]] = x
      return out
    if x.ndim == 2 and x.shape[1] < length and not k.startswith("mlm_"):
      return np.pad(x, ((0, 0), (0, length - x.shape[1])))
    return x
  return {k: pad(k, v) for k, v in batch.items()}


def compare_with_dense(run: Any, state: Any, batch: dict[str, Any], repeats: int,
                       length: int | None = None) -> dict[str, Any]:
  """Median train-step seconds of the run and of its model dense, and their ratio.

  Args:
    run: the built run (`train.Run`: module, structure, optimizer, task).
    state: a train state (not modified).
    batch: one batch (e.g. the last training batch).
    repeats: timed steps of each.
    length: pad the batch to this length first (the longest bucket, data.max_len).

  Returns:
    {"length": L, "batch": B, "train_step_s": ..., "dense_train_step_s": ...,
     "speedup_vs_dense": dense / run}.
  """
  module = run.module
  dense_module = module.clone(config=dataclasses.replace(module.config,
                                                         attention_backend="dense"))
  dense_structure = dataclasses.replace(run.structure, fixed=None, learned=None,
                                        backend="dense", executors={}, _fixed={})
  fns = {"run": jax.jit(make_train_step(module, run.structure, run.tx, run.task)),
         "dense": jax.jit(make_train_step(dense_module, dense_structure, run.tx, run.task))}
  if length:
    batch = jax.tree.map(jax.numpy.asarray, pad_batch(jax.device_get(batch), length))
  t = _time_steps(fns, (state, batch), repeats)
  return {"length": int(batch["input_ids"].shape[1]),
          "batch": int(batch["input_ids"].shape[0]), "train_step_s": t["run"],
          "dense_train_step_s": t["dense"], "speedup_vs_dense": t["dense"] / t["run"]}

"""Evaluation: a model over a split with its frozen structure, and a finished run re-evaluated.

Metrics are the task's official ones (`data.compute_metrics`) plus the mean loss and the
attention density in two accountings, per layer and over all layers:

  attention_density / attention_sparsity   over each example's valid (non-padding) query-
      key pairs, averaged over the split's examples (what the model computes on this data);
  attention_density_nxn / attention_sparsity_nxn   over the whole n x n matrix at the
      masks' length n (`nxn_length`), padding or not: SparseBERT's accounting, a property
      of the masks alone. Token-defined links (`masks.sink_tokens`) are not position
      links and count in the first accounting only.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import jax
import numpy as np

from sparse_attn import checkpoint as ckpt_lib
from sparse_attn import config as config_lib
from sparse_attn import data as data_lib
from sparse_attn import example_masks
from sparse_attn import process
from sparse_attn import restore
from sparse_attn import sharding
from sparse_attn.errors import UserError
from sparse_attn.train_steps import make_eval_step


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss (or an evaluation of the model) became NaN or infinite."""


def check_finite_metrics(metrics: dict[str, dict[str, float]], where: str) -> None:
  """Raises NonFiniteLossError when an evaluation's loss or metric is NaN / infinite.

  (Correlations of constant predictions are reported as 0.0 by `data.metrics`, so any
  non-finite value here means NaN / infinite weights or inputs.)
  """
  for split, m in metrics.items():
    bad = sorted(k for k, v in m.items() if not math.isfinite(float(v)))
    if not bad:
      continue
    raise NonFiniteLossError(
        f"{where}: non-finite evaluation metrics on {split}: "
        + ", ".join(f"{k}={m[k]}" for k in bad) + ". The model's weights or its inputs hold "
        "NaN / infinite values; evaluate an earlier step (--step), or retrain with a lower "
        "optimizer.learning_rate or optimizer.grad_clip_norm set.")


def evaluate(eval_step, params, dataset, task, mesh, batch_size: int, frozen,
             max_batches: int = 0, structure=None) -> dict[str, float]:
  """Runs `eval_step` (`train_steps.make_eval_step`) over a split.

  Args:
    eval_step: the jitted eval step.
    params: {"model": ..., "structure": ...}.
    dataset: the split's dataset (batched in order, every example once).
    task: the data Task.
    mesh: the device mesh batches are laid out on.
    batch_size: global batch size.
    frozen: the frozen structure (`learn.Frozen`) the model runs with.
    max_batches: stop after this many batches (0 = the whole split).
    structure: the run structure: the frozen masks are prepared for the fast path
      (`RunStructure.prepare`) once per length bucket; None passes them as they are.

  Returns:
    The task's official metrics, "loss", "num_scored" (examples, or tokens for token
    tasks), "density/layer_i", "attention_density" and "attention_sparsity" (over valid
    pairs); with `structure`, also "density_nxn/layer_i", "attention_density_nxn",
    "attention_sparsity_nxn" and "nxn_length" (over the n x n matrix).
  """
  preds, labels, weights, losses, density = [], [], [], [], []
  prepared: dict[int, Any] = {}   # Length bucket -> the masks the backend runs.
  for i, batch in enumerate(dataset.batches(batch_size, shuffle=False, drop_remainder=False,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())):
    if max_batches and i >= max_batches:
      break
    masks = frozen.masks
    if structure is not None:
      length = batch["input_ids"].shape[1]
      if length not in prepared:
        prepared[length] = structure.prepare(frozen.masks, length).masks
      masks = prepared[length]
    out = eval_step(params, sharding.global_batch(batch, mesh), masks, frozen.gates)
    out = jax.tree.map(_to_host, out)
    preds.append(out["predictions"])
    labels.append(out["labels"])
    weights.append(out["weights"])
    losses.append((out["loss_sum"], out["loss_count"]))
    density.append((out["density_sum"], out["examples"]))
  if not preds:
    raise ValueError("The evaluation split produced no batches.")
  metrics = data_lib.compute_metrics(task, preds, labels, weights)
  total, count = (sum(float(a) for a, _ in losses), sum(float(b) for _, b in losses))
  metrics["loss"] = total / max(count, 1.0)
  metrics["num_scored"] = count   # Examples (tokens for token tasks) the metrics score.
  per_layer = sum(d for d, _ in density) / max(sum(float(n) for _, n in density), 1.0)
  for i, d in enumerate(per_layer):
    metrics[f"density/layer_{i}"] = float(d)
  metrics["attention_density"] = float(np.mean(per_layer))
  metrics["attention_sparsity"] = 1.0 - metrics["attention_density"]
  if structure is not None:
    nxn = nxn_density(frozen.masks, frozen.gates, structure.layer_heads
                      or (structure.num_heads,) * structure.num_layers)
    ex = getattr(dataset, "example_masks", None)
    for i in structure.example_layers:   # Per-example masks: kept valid pairs / n^2.
      if ex is not None and nxn[i] > 0:
        nxn[i] *= ex.density(structure.max_len)
    for i, d in enumerate(nxn):
      metrics[f"density_nxn/layer_{i}"] = d
    metrics["attention_density_nxn"] = float(np.mean(nxn))
    metrics["attention_sparsity_nxn"] = 1.0 - metrics["attention_density_nxn"]
    sized = [np.shape(m)[-1] for m in (frozen.masks or ()) if m is not None]
    metrics["nxn_length"] = float(sized[0] if sized else structure.max_len)
  return metrics


def nxn_density(masks: Any, gates: Any, layer_heads: tuple[int, ...]) -> list[float]:
  """Per layer, the kept fraction of the whole n x n matrix (SparseBERT's accounting).

  Args:
    masks: a frozen structure's masks: None (all dense) or a tuple per layer of None
      (dense) / bool [H|1, n, n] arrays.
    gates: None or a tuple per layer of None / {0, 1} scalars or [H] arrays (a closed
      head keeps nothing).
    layer_heads: heads per layer (0 = no attention sublayer: density 0).

  Returns:
    [num_layers] floats in [0, 1]; heads averaged.
  """
  out = []
  for i, heads in enumerate(layer_heads):
    m = None if masks is None else masks[i]
    d = 0.0 if heads == 0 else (1.0 if m is None else float(np.mean(np.asarray(m, bool))))
    g = None if gates is None else gates[i]
    if g is not None:
      d *= float(np.mean(np.asarray(g, np.float32)))
    out.append(d)
  return out


ACCOUNTING = ("mean over the split's examples of kept / valid (query, key) pairs, heads "
              "averaged, then the mean over layers (a dense layer counts 1, a layer without "
              "attention 0); recompute it from masks.npz with "
              "sum(masks.stats.pair_weights(lengths, n) * mask.mean(0))")


def with_reported_density(frozen: Any, metrics: dict[str, dict[str, float]]) -> Any:
  """`frozen` with the density its evaluation reported recorded in its metadata.

  An exported mask then carries both accountings: `element_density` (the n x n matrix) and
  `reported_density` (per split: `attention_density` and the per-layer values over the
  split's valid pairs, the numbers the run printed), so the export and the report agree.

  Args:
    frozen: the `learn.Frozen` the metrics were computed with.
    metrics: per split, `evaluate`'s metrics.

  Returns:
    A `learn.Frozen` with `metadata["reported_density"]`.
  """
  reported = {"accounting": ACCOUNTING}
  for split, m in metrics.items():
    reported[split] = {"attention_density": float(m["attention_density"]),
                       "per_layer": per_layer_density(m)}
    if "attention_density_nxn" in m:
      reported[split]["attention_density_nxn"] = float(m["attention_density_nxn"])
  return dataclasses.replace(frozen, metadata=dict(frozen.metadata,
                                                   reported_density=reported))


def per_layer_density(metrics: dict[str, float], prefix: str = "density/") -> list[float]:
  """The `density/layer_i` values of `evaluate`'s metrics, in layer order (i = 0, 1, ...);
  prefix "density_nxn/" gives the n x n accounting's."""
  keys = [k for k in metrics if k.startswith(prefix + "layer_")]
  return [float(metrics[k]) for k in sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))]


def format_metrics(split: str, m: dict[str, float]) -> str:
  """`evaluate`'s metrics of one split as log lines: the metrics, then the sparsity in both
  accountings, each named, with the per-layer densities."""
  main = {k: v for k, v in m.items()
          if not k.startswith(("density", "attention_", "nxn_", "num_"))}
  lines = [f"[{split}] " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(main.items()))]
  per = " ".join(f"{d:.3f}" for d in per_layer_density(m))
  lines.append(f"[{split}] attention sparsity {m['attention_sparsity']:.1%} of valid pairs "
               f"(density per layer {per})")
  if "attention_sparsity_nxn" in m:
    n = int(m["nxn_length"])
    per = " ".join(f"{d:.3f}" for d in per_layer_density(m, "density_nxn/"))
    lines.append(f"[{split}] attention sparsity {m['attention_sparsity_nxn']:.1%} of the "
                 f"{n} x {n} matrix, SparseBERT's accounting (density per layer {per})")
  return "\n".join(lines)


def _to_host(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def evaluate_workdir(workdir: str | pathlib.Path, config=None, step: int | None = None
                     ) -> tuple[dict[str, dict], restore.LoadedRun, Any]:
  """Re-evaluates a run's checkpoint (default: newest readable) on its eval splits.

  The run is loaded with `restore.load_run` (its saved config unless `config` is given; no
  training data, no optimizer); only the eval splits are built. Read-only: nothing in
  `workdir` is created or written. The process-wide settings (allocator, compilation
  cache) come from `config` when given, else the defaults, never from the saved config.

  Returns:
    (metrics per split, the loaded run, the frozen structure used).

  Raises:
    CheckpointError: no such workdir, no checkpoint there, or no checkpoint of `step`
      (the message lists the steps there).
  """
  workdir = pathlib.Path(workdir).absolute()
  if not (workdir / "checkpoints").is_dir():
    raise ckpt_lib.CheckpointError(
        f"No run in {workdir} (no checkpoints/ directory): check the path, or train first.")
  # Before the checkpointer starts JAX. The saved `distributed` section describes how the
  # training job was launched (coordinator, process ids), not this one.
  process.prepare_process(config_lib.validate(config if config is not None
                                               else config_lib.base_config()))
  run = restore.load_run(workdir, step, config=config)
  c = run.config
  mesh = sharding.make_mesh(c.mesh.shape)
  sharding.check_batch_divisible(c.train.eval_batch_size, mesh)
  eval_sets = example_masks.datasets(c, c.train.eval_splits, run.tokenizer)
  example = next(next(iter(eval_sets.values())).batches(
      c.train.eval_batch_size, shuffle=False, drop_remainder=False))
  params = dict(run.params, model=restore.place_params(
      run.module, run.params["model"], example, mesh, sharding.rules_from_config(c.mesh.rules)))
  eval_step = jax.jit(make_eval_step(run.module, run.task, run.structure))
  out = {s: evaluate(eval_step, params, ds, run.task, mesh, c.train.eval_batch_size,
                     run.frozen, c.train.max_eval_batches, structure=run.structure)
         for s, ds in eval_sets.items()}
  return out, run, with_reported_density(run.frozen, out)

"""Run observability: a progress line, metrics as JSON lines and TensorBoard event files.

Only process 0 writes. `metrics.jsonl` in the workdir has one JSON object per logged step
({"step": s, "split": "train"|"validation"|..., name: value, ...}); TensorBoard events go to
`<workdir>/tb` (tensorboardX, no TensorFlow needed).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np


def _scalar(v: Any) -> float | None:
  try:
    a = np.asarray(v)
  except Exception:  # noqa: BLE001
    return None
  return float(a) if a.size == 1 and np.issubdtype(a.dtype, np.number) else None


class MetricWriter:
  """Writes scalar metrics to JSON lines and TensorBoard; prints a progress line."""

  def __init__(self, workdir: str | pathlib.Path, total_steps: int):
    self.workdir = pathlib.Path(workdir)
    self.total_steps = total_steps
    self.active = jax.process_index() == 0
    self._tb = None
    self._t0, self._s0 = time.perf_counter(), None
    if self.active:
      self.workdir.mkdir(parents=True, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.workdir / "tb"))
      except ImportError:
        logging.warning("tensorboardX not installed: TensorBoard events are not written.")

  def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
    """Records scalar `metrics` of `step`; array-valued entries are expanded per index."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
      s = _scalar(v)
      if s is not None:
        flat[k] = s
        continue
      arr = np.asarray(v).reshape(-1)
      if arr.size > 1 and np.issubdtype(arr.dtype, np.number) and arr.size <= 64:
        flat.update({f"{k}/{i}": float(x) for i, x in enumerate(arr)})
    if self.active:
      with open(self.workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": int(step), "split": split, **flat}) + "\n")
      if self._tb is not None:
        for k, v in flat.items():
          if math.isfinite(v):
            self._tb.add_scalar(f"{split}/{k}", v, int(step))
    return flat

  def progress(self, step: int, loss: float, extra: str = "") -> None:
    """Prints `step/total loss steps/s ETA` (rate measured since the first call)."""
    now = time.perf_counter()
    if self._s0 is None:
      self._t0, self._s0 = now, step
    rate = (step - self._s0) / max(now - self._t0, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
    if self.active:
      print(f"step {step:>6}/{self.total_steps}  loss {loss:.4f}  {rate:5.2f} steps/s  "
            f"ETA {eta_s}{('  ' + extra) if extra else ''}", flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class StepTimer:
  """Wall time between consecutive training steps, for `results.json`'s `timing`.

  The loop waits for each step's metrics one step later, so it is paced by the device and
  the interval between two iterations is one step's time. The first `skip` intervals
  (compilation, the first bucket shapes) are left out; the median ignores the later
  recompilations of new length buckets and evaluation pauses.
  """

  def __init__(self, skip: int = 2):
    self.skip, self._last, self._dt = skip, None, []

  def tick(self) -> None:
    """Marks the start of a step."""
    now = time.perf_counter()
    if self._last is not None:
      self._dt.append(now - self._last)
    self._last = now

  def pause(self) -> None:
    """The next interval is not a step (evaluation, checkpointing): do not count it."""
    self._last = None

  def median(self) -> float | None:
    """Median step time in seconds, or None with too few steps."""
    dt = self._dt[self.skip:]
    return float(np.median(dt)) if dt else None


def timing_section(timer: StepTimer, eval_examples: int, eval_s: float,
                   executors: Mapping[int, tuple[str, ...]]) -> dict[str, Any]:
  """`results.json`'s `timing`: median train step, evaluation throughput, and per length
  bucket which attention executor each layer ran (and why)."""
  return {"train_step_s": timer.median(),
          "eval_examples_per_s": eval_examples / eval_s if eval_s > 0 else None,
          "attention_backend": {str(length): {f"layer_{i}": w for i, w in enumerate(why)}
                                for length, why in sorted(executors.items())}}


def mask_summary(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
  """`results.json`'s `masks`: the frozen (and exported) masks' element density and block
  density per block size (means over the masked layers; the n x n accounting), and the
  density evaluation reported for them per split (`reported_density`: over each split's
  valid pairs, as `evaluation.with_reported_density` recorded it); None without masks."""
  layers = metadata.get("layers") or {}
  if not layers:
    return None
  sizes = sorted({b for m in layers.values() for b in m.get("block_density", {})}, key=int)
  return {"element_density": metadata.get("element_density"),
          "block_density": {b: float(np.mean([m["block_density"][b] for m in layers.values()
                                              if b in m.get("block_density", {})]))
                            for b in sizes},
          "seq_len": metadata.get("seq_len"),
          "reported_density": {split: r["attention_density"] for split, r
                               in (metadata.get("reported_density") or {}).items()
                               if isinstance(r, dict)}}

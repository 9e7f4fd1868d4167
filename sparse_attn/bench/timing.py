"""Step timers (warm-up excluded; median, min, CPU time), matmul peak, machine line."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def timeit(fn: Callable[..., Any], *args, repeats: int = 5) -> dict[str, float]:
  """Median / min wall time and median process CPU time of fn(*args), after warm-up.

  fn(*args) runs once (compile + warm-up, not timed), then `repeats` times, each with
  jax.block_until_ready. Returns {"median", "min", "cpu"} in seconds.
  """
  jax.block_until_ready(fn(*args))
  walls, cpus = [], []
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  return {"median": float(np.median(walls)), "min": float(np.min(walls)),
          "cpu": float(np.median(cpus))}


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict]:
  """Times several thunks round-robin (so machine load hits them alike).

  Each thunk runs once untimed, then the thunks run in turn `repeats` times. Returns
  {name: {"median", "min", "cpu"}} in seconds, as `timeit`.
  """
  for f in fns.values():
    jax.block_until_ready(f())
  walls = {k: [] for k in fns}
  cpus = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(f())
      walls[k].append(time.perf_counter() - t0)
      cpus[k].append(time.process_time() - c0)
  return {k: {"median": float(np.median(walls[k])), "min": float(np.min(walls[k])),
              "cpu": float(np.median(cpus[k]))} for k in fns}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul rate in FLOP/s: 2 n^3 / min time of [n, n] @ [n, n]."""
  x = jnp.ones((n, n), jnp.float32)
  t = timeit(jax.jit(lambda a: a @ a), x, repeats=repeats)
  return 2 * n ** 3 / t["min"]


def machine_description() -> str:
  """One line: processor, cores, jax version and backend, load average, XLA_FLAGS."""
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices), "
          f"load average {os.getloadavg()[0]:.1f}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

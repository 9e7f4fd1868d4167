"""Host allocator settings for XLA:CPU: keep freed memory for reuse across steps.

XLA:CPU allocates every temporary of a step (activations, [B, H, Q, K] scores, new
parameter and optimizer buffers) with malloc and frees it when the step ends. glibc hands
blocks above its mmap threshold (and any large block requested from a worker thread's
arena) straight back to the kernel, so the next step faults every page in again (the
page-fault and kernel-time measurements are in docs/benchmarks.md). `reuse_freed_memory` makes glibc keep freed memory in one heap that it never
trims. Once the heap has grown to the steps' working set (a few steps; it still grows
now and then while it settles), steps stop faulting pages in. A block that a thread
attached to an older arena allocates beyond that arena's 64 MB heap is still mapped
afresh, so this is a large reduction, not a guarantee for every call.

The settings are process-wide. The arena limit only binds threads that have not
allocated yet, so call it before JAX's first computation (the entry points do:
`train.setup` and `train.evaluate_workdir` honour the `train.host_memory` config key);
applied later it still helps, partly. The cost is resident memory: freed memory is never
returned to the OS and one heap fragments more, so the process's peak RSS grows (the
README gives the measured trade on the dense fine-tuning run). Use 'default' where host
RAM is tight. On accelerators the big buffers live in device
memory, so 'auto' leaves the host allocator alone when an accelerator plugin is
installed.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

MODES = ("auto", "reuse", "default")
_applied = False


def _accelerator_plugin_installed() -> bool:
  """True if a TPU / GPU backend for jax is installed (without initialising JAX)."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  for dist in importlib.metadata.distributions():
    name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
    if name.startswith(("jax-cuda", "jax-rocm", "jaxlib-cuda")):
      return True
  return False


def _wants_cpu() -> bool:
  """JAX_PLATFORMS (or JAX_PLATFORM_NAME) puts the CPU first."""
  platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
  return platforms.strip().lower().split(",")[0].strip() == "cpu"


def _jax_started() -> bool:
  """Whether JAX has created its backends (and with them its worker threads)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # Private API moved: assume not started.
    return False


def wanted(mode: str) -> bool:
  """Whether `mode` asks for the reuse settings here ('auto' resolved; no side effect)."""
  if mode not in MODES:
    raise ValueError(f"host_memory must be one of {MODES}; got {mode!r}.")
  if mode == "auto":
    return _wants_cpu() or not _accelerator_plugin_installed()
  return mode == "reuse"


def reuse_freed_memory(mode: str = "auto") -> bool:
  """Makes glibc keep freed host memory for reuse (one arena, no mmap, no trimming).

  Args:
    mode: 'reuse' (apply), 'default' (leave the allocator alone), or 'auto' (apply
      unless a TPU / GPU plugin for jax is installed and JAX_PLATFORMS does not start
      with 'cpu').

  Returns:
    Whether the settings are in effect: False on non-glibc systems, with 'default', or
    when 'auto' decides against it.

  Raises:
    ValueError: an unknown mode.
  """
  global _applied  # pylint: disable=global-statement
  if not wanted(mode):
    return _applied
  if _applied:
    return True
  try:
    mallopt = ctypes.CDLL(None).mallopt  # The C library this process already runs on.
  except (OSError, AttributeError):
    return False  # Not glibc (macOS, musl): nothing to tune.
  if _jax_started():
    # Worker threads keep the arenas they already have, so blocks above an arena's 64 MB
    # heap can still be mapped afresh; the other settings act at once.
    logging.log(logging.WARNING if mode == "reuse" else logging.INFO,
                "host_memory=%r applied after JAX started: only partly effective. Call "
                "sparse_attn.hostmem.reuse_freed_memory() before JAX's first "
                "computation.", mode)
  results = [mallopt(param, value) for param, value in (
      (_M_ARENA_MAX, 1),              # One heap: worker threads' blocks are reusable too.
      (_M_MMAP_MAX, 0),               # Big blocks from the heap, not fresh mappings.
      (_M_TRIM_THRESHOLD, 2**31 - 1),  # Never give the heap's top back to the kernel.
      (_M_TOP_PAD, 64 << 20))]        # Grow the heap in 64 MB steps.
  _applied = all(r == 1 for r in results)
  return _applied

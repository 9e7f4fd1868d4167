"""This process's settings, applied once by an entry point: host allocator, multi-process
JAX, compilation cache. Always from the current command's config, never a restored run's."""

from __future__ import annotations

import pathlib

import jax
import ml_collections

from sparse_attn import assets
from sparse_attn import hostmem
from sparse_attn import sharding


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` ("" = leave JAX's setting,
  "auto" = `xla/` in the asset cache, ``$SPARSE_ATTN_CACHE`` or ~/.cache/sparse_attn).

  A rerun, a resumed run or `eval.py` then loads the compiled train / eval steps (one per
  length bucket) instead of compiling them again, which on CPU saves tens of seconds.
  """
  if path == "auto":
    path = str(assets.cache_dir() / "xla")
  if path:
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(path).expanduser()))


def prepare_process(config: ml_collections.ConfigDict) -> None:
  """Applies `config.train.host_memory`, `config.distributed` and
  `config.train.compilation_cache` to this process (before its first JAX computation)."""
  hostmem.reuse_freed_memory(config.train.host_memory)
  sharding.maybe_initialize_distributed(config)
  enable_compilation_cache(config.train.compilation_cache)

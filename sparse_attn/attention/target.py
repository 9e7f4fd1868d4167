"""The platform attention is traced for: the default backend, or a target set for a block.

Executor choices are made when a function is traced (the seam's 'auto', the policy's
cost models, whether the compiled CPU kernel or a Pallas kernel in interpret mode runs),
and they read `platform()`. By default that is the running backend; inside
`with target_platform("gpu"):` it is the named one, so a function traced there (e.g. for
`jax.export(..., platforms=["cuda"])` on a CPU-only host, `sparse_attn.lowering`) makes
the choices it would make on that platform. Nothing is executed differently: arrays still
live on the running backend's devices.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_state = threading.local()   # Per thread: the innermost target, or None.


def _name(backend: str) -> str:
  return "gpu" if backend in ("cuda", "rocm") else backend


def platform() -> str:
  """The platform executor choices are made for: 'cpu', 'gpu' or 'tpu' (the innermost
  `target_platform`, else the default JAX backend)."""
  target = getattr(_state, "target", None)
  return target if target is not None else _name(jax.default_backend())


@contextlib.contextmanager
def target_platform(name: str) -> Iterator[str]:
  """Within the block, `platform()` is `name` ('cpu', 'gpu' / 'cuda' / 'rocm', 'tpu').

  Functions traced inside choose executors for that platform; a jitted function traced
  before keeps its earlier choices (jit caches traces), so trace fresh functions here.
  Nests; the previous value is restored on exit, also after an error.

  Yields:
    The platform name in `platform()`'s spelling.
  """
  plat = _name(name)
  if plat not in PLATFORMS:
    raise ValueError(f"Unknown target platform {name!r}; use one of {PLATFORMS} "
                     "(or 'cuda' / 'rocm').")
  before = getattr(_state, "target", None)
  _state.target = plat
  try:
    yield plat
  finally:
    _state.target = before

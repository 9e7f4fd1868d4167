"""Skip or fail a test whose optional build is missing (the compiled CPU kernel).

Locally such a test skips (a machine without a C++ compiler still runs the suite). Under
CI (`CI=true`, which GitHub Actions and most CI services set) it fails instead: there a
kernel that stopped building must turn the run red, not pass as a row of skips while the
pure-JAX fallback quietly gives the same numbers.
"""

from __future__ import annotations

import os

import pytest


def under_ci() -> bool:
  """Whether $CI asks for missing builds to fail (true / 1 / yes / on)."""
  return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes", "on")


def unavailable(reason: str) -> None:
  """Skips the calling test (fails it under CI) because `reason`."""
  if under_ci():
    pytest.fail(f"{reason} (CI is set: a missing optional build fails the test instead "
                "of skipping it)", pytrace=False)
  pytest.skip(reason)


def cpu_kernel() -> None:
  """Returns if the compiled CPU kernel is loaded; otherwise `unavailable`."""
  from sparse_attn.attention.kernels import cpu as kernel_lib  # pylint: disable=import-outside-toplevel
  ok, why = kernel_lib.load()
  if not ok:
    unavailable(f"CPU kernel unavailable: {why}")


def compiler() -> str:
  """The C++ compiler the kernel builds with; `unavailable` if there is none."""
  from sparse_attn.attention.kernels import cpu as kernel_lib  # pylint: disable=import-outside-toplevel
  cxx = kernel_lib._compiler()  # pylint: disable=protected-access
  if cxx is None:
    unavailable("no C++ compiler")
  return cxx


def torch():
  """The `torch` module (CPU build); `unavailable` if it is not installed (CI installs
  it, see .ci/run)."""
  try:
    import torch as torch_lib  # pylint: disable=import-outside-toplevel
  except ImportError:
    unavailable("PyTorch not installed in this environment")
  return torch_lib

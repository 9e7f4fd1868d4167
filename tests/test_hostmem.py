"""Tests for sparse_attn.hostmem: the reuse settings stop repeated steps page-faulting."""

import json
import os
import subprocess
import sys

import pytest

from sparse_attn import hostmem

_PROBE = r"""
import json, resource, sys
from sparse_attn import hostmem
applied = hostmem.reuse_freed_memory(sys.argv[1])
import jax, jax.numpy as jnp
w = jnp.ones((512, 512)) / 512
def loss(x):
  for _ in range(4):
    x = jnp.tanh(x @ w) + x
  return x.sum()
f = jax.jit(jax.grad(loss))  # Temporaries of 8 MB, as in a small train step.
x = jnp.ones((4096, 512))
for _ in range(8):  # Warm-up: the heap grows to the call's working set.
  f(x).block_until_ready()
faults = []
for _ in range(24):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
late = hostmem.reuse_freed_memory("reuse") if sys.argv[1] == "default" else None
print(json.dumps({"applied": applied, "faults": faults, "late": late}))
"""


def _probe(mode):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  return dict(json.loads(out.stdout.strip().splitlines()[-1]), stderr=out.stderr)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reuse_stops_repeated_calls_faulting_their_temporaries_in():
  default, reuse = _probe("default"), _probe("reuse")
  assert reuse["applied"] and not default["applied"]
  median = lambda xs: sorted(xs)[len(xs) // 2]
  # glibc's default returns the worker threads' blocks to the kernel after every call:
  # ~14k page faults per call here. With reuse the heap still grows now and then while
  # it settles (some calls fault), but most calls fault nothing.
  assert median(default["faults"]) > 4000, default
  assert sum(reuse["faults"]) < 0.5 * sum(default["faults"]), (reuse, default)
  quiet = sum(n < 100 for n in reuse["faults"])
  assert quiet >= len(reuse["faults"]) // 2, (reuse, default)
  assert default["late"] is True  # After JAX started: applied (partly effective), warned.
  assert "only partly effective" in default["stderr"]


def test_modes(monkeypatch):
  with pytest.raises(ValueError, match="host_memory must be one of"):
    hostmem.wanted("always")
  assert hostmem.wanted("reuse") and not hostmem.wanted("default")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.delenv("JAX_PLATFORM_NAME", raising=False)
  monkeypatch.setattr(hostmem, "_accelerator_plugin_installed", lambda: True)
  assert not hostmem.wanted("auto")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert hostmem.wanted("auto")
  monkeypatch.setattr(hostmem, "_accelerator_plugin_installed", lambda: False)
  monkeypatch.delenv("JAX_PLATFORMS")
  assert hostmem.wanted("auto")


def test_unknown_config_value_is_rejected_by_setup(tmp_path):
  from sparse_attn import config as config_lib
  from sparse_attn import train
  config = config_lib.base_config()
  config.train.host_memory = "sometimes"
  with pytest.raises(ValueError, match="host_memory must be one of"):
    train.setup(config, tmp_path)

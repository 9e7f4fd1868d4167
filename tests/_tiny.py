"""A tiny, fast training config for the training-stack tests, and helpers to run train.py.

Usable three ways:
  * from tests: `import _tiny; c = _tiny.tiny_config({"train.num_steps": 4})`;
  * as an experiment file: `python train.py --config tests/_tiny.py:'{"train.num_steps": 4}'`
    (the argument after ":" is a JSON object of dotted-key overrides);
  * `run(...)` / `env(...)`: subprocess helpers with a shared persistent JAX compilation
    cache, so repeated runs of the same tiny model compile once.

The model is a 2-layer, 32-wide BERT with the MiniLM (BERT uncased) vocabulary, trained
from random initialisation on 64 offline Rotten Tomatoes examples at length 32.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any, Mapping

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PYTHON = sys.executable

TINY_MODEL = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


def tiny_config(overrides: Mapping[str, Any] | None = None):
  """base_config() shrunk to a few seconds of training; `overrides`: {"a.b": value}."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from sparse_attn import config as config_lib
  c = config_lib.base_config()
  c.init_from = ""
  c.model = dict(TINY_MODEL)
  c.data.max_len = 32
  c.data.buckets = []
  c.data.max_train_examples = 64
  c.data.max_eval_examples = 32
  c.optimizer.learning_rate = 1e-3
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.num_steps = 6
  c.train.log_every = 1
  c.train.host_memory = "default"  # Keep the test process's allocator independent of order.
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def get_config(arg: str | None = None):
  """Entry point for `train.py --config tests/_tiny.py[:JSON overrides]`."""
  return tiny_config(json.loads(arg) if arg else None)


def config_flag(overrides: Mapping[str, Any] | None = None) -> str:
  """The --config value selecting this file with `overrides`."""
  path = str(TESTS / "_tiny.py")
  return f"--config={path}:{json.dumps(dict(overrides))}" if overrides else f"--config={path}"


def jax_cache_dir() -> str:
  """A persistent compilation cache shared by the test subprocesses (per user)."""
  d = os.environ.get("SPARSE_ATTN_TEST_JAX_CACHE") or os.path.join(
      tempfile.gettempdir(), f"sparse_attn_test_jax_cache_{os.getuid()}")
  os.makedirs(d, exist_ok=True)
  return d


def env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """Environment for a JAX subprocess: CPU, `devices` fake host devices, shared cache."""
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
           JAX_COMPILATION_CACHE_DIR=jax_cache_dir(),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  flags = [f for f in e.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  e["XLA_FLAGS"] = " ".join(flags)
  e.update(extra)
  return e


def train_cmd(workdir, overrides: Mapping[str, Any] | None = None, *flags: str) -> list[str]:
  """The command line of `train.py` on the tiny config."""
  return [PYTHON, str(REPO / "train.py"), config_flag(overrides), f"--workdir={workdir}",
          *flags]


def run(cmd: list[str], *, devices: int | None = None, timeout: float = 900,
        check: bool = True) -> subprocess.CompletedProcess:
  """Runs `cmd` from the repository root; on `check`, a failure shows its output."""
  p = subprocess.run(cmd, cwd=REPO, env=env(devices), capture_output=True, text=True,
                     timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"{cmd} exited with {p.returncode}\n--- stdout\n{p.stdout[-5000:]}"
                         f"\n--- stderr\n{p.stderr[-8000:]}")
  return p


def read_metrics(workdir, split: str = "train") -> list[dict[str, Any]]:
  """The metrics.jsonl records of `split`, in file order."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r["split"] == split]


def losses_by_step(workdir) -> dict[int, float]:
  """{step: train loss} from metrics.jsonl (the last record of a step wins)."""
  return {r["step"]: r["loss"] for r in read_metrics(workdir)}

"""Tests for sparse_attn/sharding.py and sharded training: meshes, rules, sharded == unsharded.

The multi-device tests run tests/_sharded_worker.py in subprocesses, because
XLA_FLAGS=--xla_force_host_platform_device_count=8 only takes effect before JAX starts:
one process with 1 CPU device (the reference) and one with 8 fake CPU devices training the
same tiny config under meshes (8, 1), (4, 2) and (2, 4), then restoring the (8, 1)
checkpoint under (2, 4).

Tolerances: per-step train losses and eval losses agree within 1e-5 absolute (observed:
~1e-7, float32 reduction-order noise). Dropout is on (rate 0.1), so a mesh-dependent
dropout mask would show: it moves the step-1 loss by ~2e-3. The random bits do not depend
on the mesh, and jax_threefry_partitionable (on by default in this JAX) lets each device
generate its own shard of them. Eval accuracy is equal exactly; a state restored onto
another mesh is bitwise equal to the one restored on the mesh it was saved from.
"""

from __future__ import annotations

import json
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
from sparse_attn import sharding

LOSS_ATOL = 1e-5
MESHES = ["8x1", "4x2", "2x4"]


# ------------------------------------------------------------------- in-process units


def test_threefry_partitionable_is_on():
  """Shard-local random bits for dropout (the JAX default the library relies on)."""
  import sparse_attn.train  # noqa: F401 - whatever the library sets at import.
  assert jax.config.jax_threefry_partitionable


def test_make_mesh_resolves_minus_one_and_names_axes():
  n = jax.device_count()
  mesh = sharding.make_mesh((-1, 1))
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": n, "model": 1}
  assert dict(sharding.make_mesh((1, -1)).shape) == {"data": 1, "model": n}


@pytest.mark.parametrize("shape,match", [
    ((jax.device_count() + 1, 1), r"needs \d+ devices but \d+ are available.*\(-1, 1\)"),
    ((-1, -1), "At most one"),
    ((1, 1, 1), r"must be \(data, model\)"),
])
def test_make_mesh_bad_shape(shape, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(shape)


def test_rules_from_config():
  rules = sharding.rules_from_config([["batch", "data"], ["heads", "model"], ["kv", None]])
  assert rules == (("batch", "data"), ("heads", "model"), ("kv", None))
  with pytest.raises(ValueError, match="unknown mesh axis 'tensor'"):
    sharding.rules_from_config([["heads", "tensor"]])


def test_check_batch_divisible():
  mesh = types.SimpleNamespace(shape={"data": 4, "model": 2})
  sharding.check_batch_divisible(8, mesh)
  with pytest.raises(ValueError, match="Global batch size 6 .* data-parallel size 4"):
    sharding.check_batch_divisible(6, mesh)


def test_logical_rules_place_heads_and_mlp_on_model_axis():
  from sparse_attn import model as model_lib
  cfg = model_lib.BertConfig(**_tiny.TINY_MODEL)
  module = model_lib.BertForSequenceClassification(cfg, 2)
  ids = jnp.zeros((2, 8), jnp.int32)
  abstract = jax.eval_shape(lambda r: module.init(r, ids, ids, ids), jax.random.PRNGKey(0))
  mesh = sharding.make_mesh((-1, 1))
  shard = sharding.logical_shardings(abstract, mesh, sharding.DEFAULT_RULES)
  layer = shard["params"]["bert"]["layer_0"]
  P = jax.sharding.PartitionSpec
  assert layer["attention"]["query"]["kernel"].spec == P(None, "model", None)
  assert layer["attention"]["output"]["kernel"].spec == P("model", None, None)
  assert layer["intermediate"]["kernel"].spec == P(None, "model")
  assert layer["output"]["kernel"].spec == P("model", None)
  assert shard["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"].spec == P(
      None, None)


def test_global_batch_shards_rows_over_data():
  mesh = sharding.make_mesh((-1, 1))
  local = {"input_ids": np.arange(24, dtype=np.int32).reshape(4, 6),
           "weights": np.ones(4, np.float32)}
  out = sharding.global_batch(local, mesh)
  assert out["input_ids"].shape == (4 * jax.process_count(), 6)
  assert out["input_ids"].sharding.spec == jax.sharding.PartitionSpec("data", None)
  np.testing.assert_array_equal(np.asarray(out["input_ids"]), local["input_ids"])


# --------------------------------------------------------- 1 device vs 8 fake devices


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
  """Runs the 1-device reference and the 8-device meshes concurrently."""
  out = tmp_path_factory.mktemp("sharded")
  worker = str(_tiny.TESTS / "_sharded_worker.py")
  jobs = {
      "one": ([_tiny.PYTHON, worker, str(out / "one"), "1,1"], 1),
      "eight": ([_tiny.PYTHON, worker, str(out / "eight"), "8,1", "4,2", "2,4",
                 "--restore_as", "2,4"], 8),
  }
  procs = {k: subprocess.Popen(cmd, cwd=_tiny.REPO, env=_tiny.env(devices=d),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k, (cmd, d) in jobs.items()}
  results = {}
  for k, p in procs.items():
    stdout, stderr = p.communicate(timeout=1200)
    if p.returncode != 0:
      for q in procs.values():
        if q.poll() is None:
          q.kill()
      raise AssertionError(f"worker {k} failed ({p.returncode}):\n{stderr[-8000:]}")
    results[k] = json.loads(stdout.strip().splitlines()[-1])
  return results


@pytest.mark.slow
def test_workers_have_the_devices_and_threefry(worker_results):
  """(slow: two subprocesses train 4 runs of the tiny model, ~30-120 s.)"""
  assert worker_results["one"]["device_count"] == 1
  assert worker_results["eight"]["device_count"] == 8
  assert worker_results["one"]["threefry_partitionable"]
  assert worker_results["eight"]["threefry_partitionable"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_loss_trajectory_equals_one_device(worker_results, mesh):
  """(slow: shares the worker fixture.) Same losses at every step, dropout on."""
  ref = worker_results["one"]["runs"]["1x1"]
  got = worker_results["eight"]["runs"][mesh]
  assert len(ref["losses"]) == len(got["losses"]) >= 5
  # The trajectory moves (so agreement means something) ...
  assert max(ref["losses"]) - min(ref["losses"]) > 1e-3
  # ... and the sharded one follows it.
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=0, atol=LOSS_ATOL)
  assert got["validation"]["accuracy"] == ref["validation"]["accuracy"]
  assert abs(got["validation"]["loss"] - ref["validation"]["loss"]) <= LOSS_ATOL


@pytest.mark.slow
def test_checkpoint_saved_under_8x1_restores_under_2x4(worker_results):
  """(slow: shares the worker fixture.) Same state bits, same eval metrics."""
  restored = worker_results["eight"]["restored"]
  saved = worker_results["eight"]["runs"]["8x1"]["validation"]
  assert restored["step"] == len(worker_results["eight"]["runs"]["8x1"]["losses"])
  assert restored["mesh_shapes"] == [[2, 4]]
  assert restored["model_axis_used"]
  assert restored["bitwise_equal"]
  assert restored["validation"]["accuracy"] == saved["accuracy"]
  assert abs(restored["validation"]["loss"] - saved["loss"]) <= LOSS_ATOL

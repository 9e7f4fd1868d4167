"""Tests for sparse_attn/checkpoint.py: retention, exact round trips, corrupt-step fallback."""

from __future__ import annotations

import logging
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import checkpoint as ckpt_lib


def _tree(step: int) -> dict:
  """A small state-like pytree whose values identify `step`."""
  return {"params": {"w_4x3": jnp.full((4, 3), float(step), jnp.float32),
                     "b_3": jnp.arange(3, dtype=jnp.float32) * step},
          "count": jnp.asarray(step, jnp.int32),
          "rng": jax.random.PRNGKey(step)}


def _target() -> dict:
  return jax.tree.map(jnp.zeros_like, _tree(0))


def _saved(directory, steps, *, keep=3, **kw) -> ckpt_lib.Checkpointer:
  ck = ckpt_lib.Checkpointer(directory, keep=keep, async_save=False, **kw)
  for s in steps:
    assert ck.save(s, _tree(s))
  ck.wait()
  return ck


def _step_dirs(directory) -> list[str]:
  return sorted(p.name for p in pathlib.Path(directory).iterdir())


# ---------------------------------------------------------------------------- retention


@pytest.mark.parametrize("keep,keep_best,metrics,expected", [
    # Latest 2 are steps 5 and 6; the best accuracy (0.9) is step 2.
    (2, 1, [0.2, 0.9, 0.3, 0.1, 0.4, 0.5], [2, 5, 6]),
    # The best is also among the latest: nothing extra is kept.
    (2, 1, [0.2, 0.1, 0.3, 0.1, 0.4, 0.95], [5, 6]),
    # keep_best=0: only the latest.
    (2, 0, [0.2, 0.9, 0.3, 0.1, 0.4, 0.5], [5, 6]),
    # Periodic checkpoints without metrics (None) never count as "best".
    (1, 1, [None, 0.7, None, 0.2, None, None], [2, 6]),
    # keep_best=2: the two best by the dev metric plus the latest.
    (1, 2, [0.8, 0.1, 0.9, 0.2, 0.3, 0.4], [1, 3, 6]),
])
def test_retention_keeps_latest_and_best(tmp_path, keep, keep_best, metrics, expected):
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=keep, keep_best=keep_best,
                             best_metric="accuracy", async_save=False)
  for step, m in enumerate(metrics, 1):
    ck.save(step, _tree(step), metrics=None if m is None else {"accuracy": m, "loss": 1 - m})
  ck.close()
  assert ck.all_steps() == expected
  assert [int(n) for n in _step_dirs(tmp_path / "ck")] == expected
  # A new manager over the directory sees the same steps.
  assert ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False).all_steps() == expected


def test_retention_nan_metric_never_displaces_the_best(tmp_path):
  """A NaN dev metric (e.g. Pearson of constant predictions) ranks below every number."""
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=1, keep_best=1, best_metric="pearson",
                             async_save=False)
  for step, m in enumerate([0.5, float("nan"), 0.2, float("nan"), 0.1], 1):
    ck.save(step, _tree(step), metrics={"pearson": m})
  ck.close()
  assert ck.all_steps() == [1, 5]


def test_retention_with_async_saves(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=2, keep_best=1, best_metric="f1",
                             async_save=True)
  for step, m in enumerate([0.3, 0.8, 0.2, 0.1], 1):
    ck.save(step, _tree(step), metrics={"f1": m})
  ck.close()
  assert ck.all_steps() == [2, 3, 4]


# ---------------------------------------------------------------------------- round trip


def test_round_trip_is_exact_with_masks_and_config(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=True)
  masks = {"layer_0": np.tril(np.ones((1, 5, 5), bool)), "layer_2": np.eye(5, dtype=bool)[None]}
  meta = {"method": "fixed", "seq_len": 5, "density": np.float32(0.5), "per": (1, 2)}
  config = {"train": {"batch_size": 8}, "mesh": {"shape": (-1, 1)}}
  ck.save(7, _tree(7), masks=masks, masks_meta=meta, config=config)
  ck.close()

  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False)
  assert ck.latest_step() == 7
  state, step = ck.restore_state(_target())
  assert step == 7
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_tree(7))):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  got_masks, got_meta = ck.restore_masks()
  assert set(got_masks) == set(masks)
  for k in masks:
    assert got_masks[k].dtype == np.bool_ and np.array_equal(got_masks[k], masks[k])
  assert got_meta == {"method": "fixed", "seq_len": 5, "density": 0.5, "per": [1, 2]}
  assert ck.restore_config() == {"train": {"batch_size": 8}, "mesh": {"shape": [-1, 1]}}
  # A specific older step.
  ck.save(9, _tree(9))
  ck.wait()
  assert ck.restore_state(_target(), step=7)[1] == 7
  assert ck.restore_masks(9) is None and ck.restore_config(9) is None
  ck.close()


def test_empty_directory_restores_nothing(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False)
  assert ck.latest_step() is None
  assert ck.restore_state(_target()) is None
  assert ck.restore_masks() is None and ck.restore_config() is None


# ----------------------------------------------------------------- corrupt / partial steps


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
  assert files
  if how == "garbage":  # Every file of the state item overwritten.
    for f in files:
      f.write_bytes(b"\x00garbage")
  elif how == "truncated":  # A write cut short: every file half its size.
    for f in files:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif how == "missing_item":  # The state item never made it to disk.
    shutil.rmtree(step_dir / "state")
  elif how == "array_data":  # Metadata intact, array chunks unreadable.
    chunks = [f for f in files if f.parent.name == "d"]
    assert chunks
    for f in chunks:
      f.write_bytes(b"x" * 7)
  else:
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["garbage", "truncated", "missing_item", "array_data"])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, caplog, how):
  _saved(tmp_path / "ck", [1, 2, 3]).close()
  _corrupt(tmp_path / "ck" / "3", how)

  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False)
  with caplog.at_level(logging.WARNING):
    state, step = ck.restore_state(_target())
  assert step == 2
  assert np.array_equal(np.asarray(state["params"]["w_4x3"]), np.full((4, 3), 2.0))
  text = caplog.text
  assert "could not be restored" in text and str(tmp_path / "ck" / "3") in text
  assert "Restored step 2 after skipping" in text
  # Without set_aside_unreadable the directory is left as it was.
  assert _step_dirs(tmp_path / "ck") == ["1", "2", "3"]


def test_set_aside_unreadable_lets_a_resumed_run_save_that_step_again(tmp_path, caplog):
  _saved(tmp_path / "ck", [1, 2, 3]).close()
  _corrupt(tmp_path / "ck" / "3", "garbage")
  _corrupt(tmp_path / "ck" / "2", "truncated")

  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=3, async_save=False)
  with caplog.at_level(logging.WARNING):
    state, step = ck.restore_state(_target(), set_aside_unreadable=True)
  assert step == 1 and int(state["count"]) == 1
  assert "Moved unreadable checkpoint" in caplog.text
  assert ck.all_steps() == [1]
  assert _step_dirs(tmp_path / "ck") == ["1", "2.unreadable-0", "3.unreadable-0"]
  # The resumed run reaches steps 2 and 3 again and saves them.
  assert ck.save(2, _tree(2)) and ck.save(3, _tree(3))
  ck.close()
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False)
  assert ck.all_steps() == [1, 2, 3]
  assert ck.restore_state(_target())[1] == 3


def test_all_steps_unreadable_is_a_clear_error(tmp_path):
  _saved(tmp_path / "ck", [1, 2]).close()
  _corrupt(tmp_path / "ck" / "1", "missing_item")
  _corrupt(tmp_path / "ck" / "2", "garbage")
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"(?s)step 2:.*step 1:.*Move the"):
    ck.restore_state(_target())


@pytest.mark.parametrize("tmp_name", ["3.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1234"])
def test_leftover_orbax_tmp_dir_is_ignored(tmp_path, tmp_name):
  """A save interrupted by kill -9 leaves orbax's temporary directory: never restored."""
  _saved(tmp_path / "ck", [1, 2]).close()
  partial = tmp_path / "ck" / tmp_name
  shutil.copytree(tmp_path / "ck" / "2", partial)
  _corrupt(partial, "garbage")

  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=3, async_save=False)
  assert ck.all_steps() == [1, 2]
  state, step = ck.restore_state(_target())
  assert step == 2 and int(state["count"]) == 2
  # The rerun saves step 3 over the leftover.
  assert ck.save(3, _tree(3))
  ck.close()
  assert ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False).restore_state(
      _target())[1] == 3


def test_restore_changes_only_what_the_target_says(tmp_path):
  """The target fixes structure and dtypes; a mismatching target is an error, not garbage."""
  _saved(tmp_path / "ck", [4]).close()
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0))
  state, _ = ck.restore_state(abstract)
  assert math.isclose(float(state["params"]["b_3"][2]), 8.0)
  wrong = dict(_target(), extra=jnp.zeros(2))
  with pytest.raises(ckpt_lib.CheckpointError):
    ck.restore_state(wrong)


# ---------------------------------------------------------------------------- integrity


def _noisy(step: int) -> dict:
  """Random weights: the stored bytes are incompressible, so a flipped bit still decodes."""
  return {"w": jax.random.normal(jax.random.PRNGKey(step), (256, 256)),
          "step": jnp.asarray(step, jnp.int32)}


def _flip_one_bit_of_largest_file(step_dir: pathlib.Path) -> None:
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  big = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0x10
  big.write_bytes(bytes(data))


def test_flipped_bit_in_data_file_falls_back_to_previous_step(tmp_path, caplog):
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=3, async_save=False)
  for s in (1, 2):
    ck.save(s, _noisy(s))
  ck.close()
  _flip_one_bit_of_largest_file(tmp_path / "ck" / "2" / "state")
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=3, async_save=False)
  with caplog.at_level(logging.WARNING):
    state, step = ck.restore_state(jax.tree.map(jnp.zeros_like, _noisy(0)),
                                   set_aside_unreadable=True)
  assert step == 1
  np.testing.assert_array_equal(state["w"], _noisy(1)["w"])
  assert "IntegrityError" in caplog.text and "fingerprint mismatch" in caplog.text
  assert (tmp_path / "ck" / "2.unreadable-0").is_dir()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.bool_,
                                   jnp.uint8])
def test_fingerprint_changes_with_any_single_bit(dtype):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2, (3, 5, 7)) if dtype == jnp.bool_ else rng.normal(size=(3, 5, 7))
  x = jnp.asarray(x).astype(dtype)
  base = ckpt_lib.fingerprints({"x": x})
  words = np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint8)) if dtype != jnp.bool_ \
      else np.asarray(x)
  flat = words.reshape(-1)
  for i in rng.choice(flat.size, 20, replace=False):
    changed = flat.copy()
    changed[i] ^= 1 if dtype == jnp.bool_ else np.uint8(1 << int(rng.integers(0, 8)))
    changed = changed.reshape(words.shape)
    y = (jnp.asarray(changed) if dtype == jnp.bool_ else
         jax.lax.bitcast_convert_type(jnp.asarray(changed), dtype))
    assert ckpt_lib.fingerprints({"x": y}) != base, i


def test_fingerprint_is_the_same_on_a_sharded_array():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  y = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  assert ckpt_lib.fingerprints([x]) == ckpt_lib.fingerprints([y])
  # Swapping two rows keeps the first sum's multiset but not the fingerprint.
  assert ckpt_lib.fingerprints([x[::-1]]) != ckpt_lib.fingerprints([x])

"""Faults and bad input through the trainer and the entry points: nothing lost, nothing
silent. Finished and preempted-at-the-end reruns, the workdir lock, config ranges and
resume checks, pending saves on error, eval.py's read-only checks, process-wide settings,
one-message errors (exit 2), bitwise resume in process, a 2-device masked DAM run.

Most runs are the tiny config of tests/_tiny.py in process (a few seconds each); the
entry-point checks run `train.py` / `eval.py` as a user would, in subprocesses.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import _tiny
from sparse_attn import cli
from sparse_attn import config as config_lib
from sparse_attn import errors
from sparse_attn import lock as lock_lib
from sparse_attn import train

FOUR = {"train.num_steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep": 3,
        "train.compilation_cache": ""}


def _steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def _state(workdir, step: int):
  m = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints", item_names=("state",))
  out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  m.close()
  return out["state"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 4-step tiny run (checkpoints 2 and 4), and its results."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  results = train.train_and_evaluate(_tiny.tiny_config(FOUR), str(workdir))
  return workdir, results


def _copy(finished, tmp_path) -> pathlib.Path:
  dst = tmp_path / "run"
  shutil.copytree(finished[0], dst)
  return dst


# ------------------------------------------------------------- resume: end, bitwise


def test_rerun_of_a_finished_or_end_preempted_run_completes(finished, tmp_path):
  """A run preempted after saving its last step reruns to the end: final evaluation and
  results, no StepAlreadyExistsError; so does a plain rerun of a finished run."""
  workdir = _copy(finished, tmp_path)
  (workdir / "results.json").write_text(json.dumps({"step": 4, "preempted": True}))
  for _ in range(2):
    results = train.train_and_evaluate(_tiny.tiny_config(FOUR), str(workdir))
    assert results["step"] == 4 and "preempted" not in results
    assert results["validation"] == finished[1]["validation"]
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["validation"] == finished[1]["validation"]
    assert _steps(workdir) == [2, 4]


def test_resume_from_step_2_is_bitwise(finished, tmp_path):
  """Step 4 lost: the rerun restores step 2 and ends with the same losses and state."""
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "4")
  (workdir / "results.json").unlink()
  results = train.train_and_evaluate(_tiny.tiny_config(FOUR), str(workdir))
  assert results["validation"] == finished[1]["validation"]
  ref_losses = _tiny.losses_by_step(finished[0])
  losses = _tiny.losses_by_step(workdir)
  assert [losses[s] for s in (3, 4)] == [ref_losses[s] for s in (3, 4)]
  a, b = _state(workdir, 4), _state(finished[0], 4)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------- the lock


def test_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  with lock_lib.WorkdirLock(workdir):
    with pytest.raises(lock_lib.WorkdirLockedError, match=rf"in use by another run \(PID "
                       rf"{os.getpid()} "):
      train.train_and_evaluate(_tiny.tiny_config(FOUR), str(workdir))
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "metrics.jsonl").exists()


def test_the_lock_dies_with_its_holder(tmp_path):
  code = textwrap.dedent(f"""
      import sys, time
      from sparse_attn import lock
      with lock.WorkdirLock({str(tmp_path)!r}):
        print("locked", flush=True)
        time.sleep(600)
  """)
  p = subprocess.Popen([sys.executable, "-c", code], cwd=_tiny.REPO, env=_tiny.env(),
                       stdout=subprocess.PIPE, text=True)
  try:
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"PID {p.pid} "):
      with lock_lib.WorkdirLock(tmp_path):
        pass
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  with lock_lib.WorkdirLock(tmp_path):  # kill -9 released it.
    pass


# -------------------------------------------------------------------- config checks


@pytest.mark.parametrize("key,value,problem", [
    ("train.num_steps", -5, r"train\.num_steps' = -5 is out of range"),
    ("train.log_every", 0, r"train\.log_every' = 0 is out of range: it must be >= 1"),
    ("train.batch_size", 0, r"train\.batch_size"),
    ("train.eval_batch_size", -1, r"train\.eval_batch_size"),
    ("train.eval_every", -1, r"train\.eval_every"),
    ("checkpoint.every_steps", -2, r"checkpoint\.every_steps"),
    ("checkpoint.keep", 0, r"checkpoint\.keep' = 0"),
    ("optimizer.learning_rate", float("nan"), r"optimizer\.learning_rate"),
    ("optimizer.warmup_fraction", 1.0, r"warmup_fraction"),
    ("data.max_len", 1, r"data\.max_len"),
    ("data.max_len", 128, r"longer than the model's 64 position embeddings"),
    ("train.eval_splits", [], r"eval_splits"),
])
def test_bad_values_fail_in_validation(key, value, problem):
  with pytest.raises(errors.UserError, match=problem):
    config_lib.validate(_tiny.tiny_config({key: value}))


def test_wrong_type_in_a_config_file_is_named():
  d = _tiny.tiny_config().to_dict()
  d["train"]["log_every"] = "10"
  with pytest.raises(errors.UserError, match=r"train\.log_every' must be an int.*'10'"):
    config_lib.validate(ml_collections.ConfigDict(d))


def test_max_len_past_the_pretrained_positions_fails_before_training(tmp_path):
  """MiniLM has 512 positions; with extend_positions='off' (no copying of the learned
  ones) the check uses the loaded model's config."""
  c = _tiny.tiny_config({"data.max_len": 1024, "train.compilation_cache": ""})
  c.init_from = "minilm"
  c.extend_positions = "off"
  c.model = {}
  with pytest.raises(errors.UserError, match="512 position embeddings"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_another_experiment_lists_what_changed(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  other = _tiny.tiny_config(dict(FOUR, **{"structure": {"method": "dam_s"},
                                          "optimizer.b1": 0.8}))
  with pytest.raises(errors.UserError, match=r"(?s)written with another config.*"
                     r"optimizer\.b1: 0\.9 -> 0\.8.*structure\.method: 'none' -> 'dam_s'"
                     r".*new --workdir"):
    train.train_and_evaluate(other, str(workdir))
  # Logging, evaluation and checkpoint cadence may change; num_steps extends the run.
  longer = _tiny.tiny_config(dict(FOUR, **{"train.log_every": 3, "train.num_steps": 6}))
  assert train.train_and_evaluate(longer, str(workdir))["step"] == 6


def test_config_changes_splits_allowed_from_forbidden():
  saved = config_lib.validate(_tiny.tiny_config()).to_dict()
  now = config_lib.validate(_tiny.tiny_config({"train.log_every": 7, "data.max_len": 16,
                                               "masks.kwargs": {"k": 2}}))
  forbidden, allowed = config_lib.config_changes(saved, now)
  assert forbidden == ["data.max_len: 32 -> 16", "masks.kwargs.k: '(unset)' -> 2"]
  assert allowed == ["train.log_every: 1 -> 7"]


# ------------------------------------------------------------- errors and pending saves


@pytest.mark.slow
def test_error_after_an_async_save_started_keeps_that_checkpoint(tmp_path):
  """An exception right after a save started (here: in the progress line of the next
  step) leaves the process only once the save is on disk."""
  workdir = tmp_path / "run"
  code = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(_tiny.TESTS)!r})
      import _tiny
      from sparse_attn import observe, train
      def boom(self, step, loss):
        if step == 3:  # Right after step 2's save started: it is still in flight.
          raise RuntimeError("boom at step 3")
      observe.MetricWriter.progress = boom
      config = _tiny.tiny_config({{"train.num_steps": 6, "checkpoint.every_steps": 2,
                                   "checkpoint.async_save": True,
                                   "train.compilation_cache": ""}})
      train.train_and_evaluate(config, {str(workdir)!r})
  """)
  p = subprocess.run([sys.executable, "-c", code], cwd=_tiny.REPO, env=_tiny.env(),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 1 and "boom at step 3" in p.stderr, p.stderr[-3000:]
  assert _steps(workdir) == [2]
  assert (workdir / "checkpoints" / "2" / "commit_success.txt").exists() or \
      (workdir / "checkpoints" / "2" / "_CHECKPOINT_METADATA").exists()
  assert int(_state(workdir, 2)["step"]) == 2


# --------------------------------------------------------------------------- eval.py


def _eval(*args: str) -> subprocess.CompletedProcess:
  return _tiny.run([_tiny.PYTHON, str(_tiny.REPO / "eval.py"), *args], check=False)


def test_eval_py_user_errors_are_one_message_and_touch_nothing(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  missing = tmp_path / "nowhere"
  cases = [
      ((f"--workdir={missing}",), r"No run in .*nowhere"),
      ((f"--workdir={workdir}", "--step=999"), r"No checkpoint of step 999 .* the steps "
                                               r"there are \[2, 4\]"),
      ((f"--workdir={workdir}", f"--export_masks={workdir}"),
       r"Refusing to export masks to .*run: it holds a run's files"),
  ]
  for args, message in cases:
    p = _eval(*args)
    assert p.returncode == 2, (args, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, args
    last = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert len(last) == 1 and re.search(message, last[0]), (args, p.stderr)
  assert not missing.exists()
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
  p = _eval(f"--workdir={missing}", "--traceback")
  assert p.returncode == 1 and "Traceback" in p.stderr


def test_eval_py_fails_on_non_finite_metrics(finished, tmp_path):
  """A checkpoint whose weights are NaN (finite fingerprints: saved as such) evaluates
  to loss=nan: eval.py prints the metrics and exits 2."""
  workdir = tmp_path / "run"
  config = config_lib.validate(_tiny.tiny_config(FOUR))
  run = train.setup(config, workdir, restore=False)
  params = dict(run.state.params)
  params["model"] = jax.tree.map(lambda x: x * np.float32("nan"), params["model"])
  run.ckpt.save(1, run.state.replace(params=params), config=config.to_dict())
  run.ckpt.close()
  p = _eval(f"--workdir={workdir}")
  assert p.returncode == 2, p.stderr[-2000:]
  assert "loss=nan" in p.stdout
  assert "non-finite evaluation metrics on validation" in p.stderr


def test_eval_py_never_takes_process_settings_from_the_saved_config(finished, tmp_path):
  """The saved config's compilation cache (edited here) is not where eval.py writes."""
  workdir = _copy(finished, tmp_path)
  edited = tmp_path / "edited_cache"
  for f in (workdir / "checkpoints").glob("*/config/metadata"):
    saved = json.loads(f.read_text())
    saved["train"]["compilation_cache"] = str(edited)
    f.write_text(json.dumps(saved))
  p = _eval(f"--workdir={workdir}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert not edited.exists()


# ------------------------------------------------------------------------- train.py CLI


def test_train_py_bad_value_is_one_message_exit_2(tmp_path):
  p = _tiny.run(_tiny.train_cmd(tmp_path / "run", {"train.num_steps": -5}), check=False)
  assert p.returncode == 2
  assert p.stderr.splitlines()[0].startswith("error: Config key 'train.num_steps' = -5")
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_py_unknown_override_key_names_close_keys(tmp_path):
  p = _tiny.run(_tiny.train_cmd(tmp_path / "run", None, "--config.train.log_evry=3"),
                check=False)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert ("error: --config.train.log_evry=3: the config has no key 'log_evry' in train. "
          "Did you mean ['log_every'") in p.stderr


def test_user_errors_are_told_from_bugs():
  with pytest.raises(errors.UserError) as e:
    config_lib.validate(_tiny.tiny_config({"train.num_steps": -1}))
  assert cli.is_user_error(e.value)
  with pytest.raises((TypeError, ValueError)) as e:
    jax.numpy.ones((2, 3)) @ jax.numpy.ones((2, 3))
  assert not cli.is_user_error(e.value)  # Raised inside JAX: keeps its traceback.
  with pytest.raises(KeyError) as e:
    {}["x"]
  assert not cli.is_user_error(e.value)  # Raised here, in a test: not the library's check.
  opt = config_lib.base_config().optimizer
  opt.schedule = "nope"
  with pytest.raises(ValueError, match="Unknown schedule") as e:  # The library's own check.
    train.make_optimizer(opt, 10)
  assert cli.is_user_error(e.value)


# ----------------------------------------------------------- 2 devices, mask and DAM


@pytest.mark.slow
def test_two_device_run_with_a_mask_and_dam_matches_one_device(tmp_path):
  """Data parallel over 2 host devices with a window mask and a DAM structure: the same
  losses as on one device (to float tolerance) and the same evaluation."""
  overrides = {"train.num_steps": 3, "checkpoint.every_steps": 0,
               "train.compilation_cache": "", "masks.source": "pattern",
               "masks.pattern": "window", "masks.kwargs": {"k": 4},
               "structure": {"method": "dam_s", "per_head": True}}
  code = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {str(_tiny.TESTS)!r})
      import _tiny, jax
      from sparse_attn import train
      assert jax.device_count() == 2
      c = _tiny.tiny_config({{**json.loads(sys.argv[1]), "mesh.shape": (2, 1)}})
      r = train.train_and_evaluate(c, sys.argv[2])
      print(json.dumps(r["validation"]))
  """)
  p = _tiny.run([sys.executable, "-c", code, json.dumps(overrides), str(tmp_path / "two")],
                devices=2)
  two = json.loads(p.stdout.strip().splitlines()[-1])
  one = train.train_and_evaluate(_tiny.tiny_config(overrides), str(tmp_path / "one"))
  one = one["validation"]
  losses = [_tiny.losses_by_step(tmp_path / w) for w in ("one", "two")]
  assert sorted(losses[0]) == [1, 2, 3]
  np.testing.assert_allclose([losses[1][s] for s in (1, 2, 3)],
                             [losses[0][s] for s in (1, 2, 3)], rtol=0, atol=2e-5)
  assert two["accuracy"] == one["accuracy"]
  assert 0 < two["attention_density"] < 1
  np.testing.assert_allclose(two["attention_density"], one["attention_density"], atol=1e-6)
  np.testing.assert_allclose(two["loss"], one["loss"], atol=2e-5)

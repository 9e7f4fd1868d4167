"""Tests for sparse_attn/train.py (+ train.py / eval.py): optimizer groups, bad input,
observability, resuming after kill -9 / SIGTERM / a corrupt checkpoint, NaN losses.

Runs of the trainer go through `python train.py` in subprocesses on the tiny config of
tests/_tiny.py (2 layers, width 32, 64 training examples of length 32) with a persistent
JAX compilation cache shared by the subprocesses.

What is exactly equal (bitwise) between an uninterrupted run and one killed and resumed:
the final eval metrics in results.json, every train loss logged after the resume point, and
every leaf of the final checkpointed state. The data order is a pure function of
(seed, step), the dropout key is folded from the state's rng and step, and the restored
state is bit-identical, so the resumed run executes the same computation on the same
inputs.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import _tiny
from sparse_attn import config as config_lib
from sparse_attn import data as data_lib
from sparse_attn import train

# ----------------------------------------------------------------- optimizer groups


def _opt(**kw) -> ml_collections.ConfigDict:
  opt = config_lib.base_config().optimizer
  opt.warmup_fraction = 0.0
  for k, v in kw.items():
    opt[k] = v
  return opt


def _params():
  return {"model": {"bert": {"layer_0": {
              "intermediate": {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.full((3,), 0.5)},
              "output_LayerNorm": {"scale": jnp.full((3,), 0.5)}}},
                    "classifier": {"kernel": jnp.full((3, 2), 0.5)}},
          "structure": {"dam": {"logits_HxN": jnp.full((4,), 0.5),
                                "bias": jnp.full((2,), 0.5)}}}


def test_optimizer_labels_by_first_matching_regex():
  _, labels, _ = train.make_optimizer(_opt(), 10)
  got = labels(_params())
  assert got["structure"]["dam"] == {"logits_HxN": "group_0", "bias": "group_0"}
  layer = got["model"]["bert"]["layer_0"]
  assert layer["intermediate"] == {"kernel": "default", "bias": "group_1"}
  assert layer["output_LayerNorm"]["scale"] == "group_1"
  assert got["model"]["classifier"]["kernel"] == "default"


def test_structure_params_get_own_learning_rate_and_no_weight_decay():
  opt = _opt(grad_clip_norm=0.0)
  tx, _, schedules = train.make_optimizer(opt, total_steps=10)
  params = _params()
  state = tx.init(params)
  lr, wd = opt.learning_rate, opt.weight_decay

  # Zero gradients: only weight decay moves a parameter.
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, state, params)
  np.testing.assert_array_equal(upd["structure"]["dam"]["logits_HxN"], 0.0)
  np.testing.assert_array_equal(upd["structure"]["dam"]["bias"], 0.0)
  np.testing.assert_array_equal(upd["model"]["bert"]["layer_0"]["intermediate"]["bias"], 0.0)
  np.testing.assert_array_equal(
      upd["model"]["bert"]["layer_0"]["output_LayerNorm"]["scale"], 0.0)
  np.testing.assert_allclose(upd["model"]["classifier"]["kernel"], -lr * wd * 0.5,
                             rtol=1e-6)

  # Unit gradients: Adam's first step is lr * g / (|g| + eps) (+ decay where it applies).
  ones = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(ones, state, params)
  adam = 1.0 / (1.0 + opt.eps)
  np.testing.assert_allclose(upd["structure"]["dam"]["logits_HxN"], -0.05 * adam, rtol=1e-5)
  np.testing.assert_allclose(upd["model"]["bert"]["layer_0"]["intermediate"]["bias"],
                             -lr * adam, rtol=1e-5)
  np.testing.assert_allclose(upd["model"]["bert"]["layer_0"]["intermediate"]["kernel"],
                             -lr * (adam + wd * 0.5), rtol=1e-5)

  # The structure group's schedule is constant; the default one decays linearly.
  assert set(schedules) == {"group_0", "group_1", "default"}
  assert float(schedules["group_0"](7)) == pytest.approx(0.05)
  assert float(schedules["default"](0)) == pytest.approx(lr)
  assert float(schedules["default"](5)) == pytest.approx(lr / 2)


def test_structure_learning_rate_stays_constant_over_steps():
  tx, _, _ = train.make_optimizer(_opt(grad_clip_norm=0.0), total_steps=4)
  params = _params()
  state = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    upd, state = tx.update(ones, state, params)
  # The third update (count 2 of 4): model lr decayed to lr/2, structure still at 0.05.
  np.testing.assert_allclose(upd["structure"]["dam"]["logits_HxN"], -0.05, rtol=1e-5)
  np.testing.assert_allclose(upd["model"]["bert"]["layer_0"]["intermediate"]["bias"],
                             -5e-5 / 2, rtol=1e-5)


def test_optimizer_warmup_gradient_clipping_and_custom_groups():
  opt = _opt(warmup_fraction=0.5, grad_clip_norm=1.0,
             groups=[("model/.*kernel", dict(learning_rate=1.0, weight_decay=0.0)),
                     ("model/.*", dict(learning_rate=2.0, weight_decay=0.0))])
  tx, labels, schedules = train.make_optimizer(opt, total_steps=10)
  assert labels(_params())["model"]["classifier"]["kernel"] == "group_0"  # First match.
  assert labels(_params())["model"]["bert"]["layer_0"]["intermediate"]["bias"] == "group_1"
  assert float(schedules["group_0"](0)) == 0.0
  assert float(schedules["group_0"](5)) == pytest.approx(1.0)
  # Clipping happens before the groups: a huge gradient still gives a finite update.
  params = _params()
  huge = jax.tree.map(lambda p: jnp.full_like(p, 1e30), params)
  upd, _ = tx.update(huge, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(upd))
  assert optax.tree.norm(upd) == 0.0  # Step 0 of the warm-up: learning rate 0.


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="linear, cosine or constant"):
    train.make_optimizer(_opt(schedule="exponential"), 10)


# ---------------------------------------------------------------------------- bad input


def test_tfds_task_not_prepared_says_how_to_get_it(tmp_path):
  c = _tiny.tiny_config({"data.source": "tfds", "data.task": "glue/mrpc",
                         "data.tfds_data_dir": str(tmp_path / "no_tfds")})
  with pytest.raises(data_lib.TfdsNotPreparedError) as e:
    train.train_and_evaluate(c, tmp_path / "run")
  msg = str(e.value)
  assert "glue/mrpc" in msg and "tfds build glue/mrpc" in msg
  assert "tfds_data_dir" in msg and "source='offline'" in msg
  assert not (tmp_path / "run" / "checkpoints").exists()


def _files_config(tmp_path, train_rows, *, labels=(), kind="classification", valid_rows=None):
  tr, va = tmp_path / "train.csv", tmp_path / "valid.csv"
  tr.write_text("text,label\n" + "".join(r + "\n" for r in train_rows))
  va.write_text("text,label\n" + "".join(r + "\n" for r in (valid_rows or train_rows[:4])))
  return _tiny.tiny_config({"data.source": "files", "data.kind": kind,
                            "data.task": "my_csv", "data.labels": list(labels),
                            "data.paths.train": str(tr), "data.paths.validation": str(va),
                            "data.max_train_examples": 0, "data.max_eval_examples": 0})


_GOOD = ["a fine film,pos", "dull and slow,neg", "\"great, really great\",pos",
         "not good,neg"] * 4


@pytest.mark.parametrize("bad_row,line,problem", [
    (",pos", 4, "empty or non-text value in column 'text'"),
    ("no label here,", 4, "empty label"),
    ("one,two,three", 4, "wrong number of fields|fields"),
])
def test_malformed_csv_row_through_the_trainer(tmp_path, bad_row, line, problem):
  rows = _GOOD[:2] + [bad_row] + _GOOD[2:]
  c = _files_config(tmp_path, rows, labels=("neg", "pos"))
  with pytest.raises(data_lib.BadRowError) as e:
    train.train_and_evaluate(c, tmp_path / "run")
  msg = str(e.value)
  assert f"train.csv, line {line}" in msg, msg
  assert re.search(problem, msg), msg
  assert "on_bad_rows='skip'" in msg


def test_blank_csv_line_through_the_trainer(tmp_path):
  c = _files_config(tmp_path, _GOOD[:3] + [""] + _GOOD[3:], labels=("neg", "pos"))
  with pytest.raises(data_lib.BadRowError, match=r"train.csv, line 5"):
    train.train_and_evaluate(c, tmp_path / "run")


def test_label_outside_the_label_set_through_the_trainer(tmp_path):
  c = _files_config(tmp_path, _GOOD, labels=("neg", "pos"),
                    valid_rows=["ok film,pos", "meh,neutral"])
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, tmp_path / "run")
  msg = str(e.value)
  assert "valid.csv, line 3" in msg and "'neutral'" in msg and "['neg', 'pos']" in msg


def test_empty_csv_through_the_trainer(tmp_path):
  c = _files_config(tmp_path, [], labels=("neg", "pos"), valid_rows=["ok,pos"])
  with pytest.raises(ValueError, match="has no examples"):
    train.train_and_evaluate(c, tmp_path / "run")


# ------------------------------------------------------ an observed run: logs and eval.py

WINDOW = {"masks.source": "pattern", "masks.pattern": "window", "masks.kwargs": {"k": 2}}
OBSERVED = dict(WINDOW, **{"train.num_steps": 6, "train.eval_every": 3,
                           "checkpoint.every_steps": 0})


@pytest.fixture(scope="module")
def observed_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("observed") / "run"
  p = _tiny.run(_tiny.train_cmd(workdir, OBSERVED))
  return workdir, p.stdout, p.stderr


@pytest.mark.slow
def test_metrics_jsonl_has_train_and_eval_records(observed_run):
  """(slow: one tiny training run shared by the observability tests, ~15-60 s.)"""
  workdir, _, _ = observed_run
  train_rows = _tiny.read_metrics(workdir, "train")
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for r in train_rows:
    assert {"loss", "task_loss", "penalty", "grad_norm", "density/0", "density/1"} <= set(r)
    assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
  assert all("learning_rate" in r for r in train_rows[:-1])
  evals = _tiny.read_metrics(workdir, "validation")
  assert [r["step"] for r in evals] == [3, 6]
  assert {"accuracy", "loss"} <= set(evals[-1])
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 6
  assert results["validation"] == {k: evals[-1][k] for k in results["validation"]}


@pytest.mark.slow
def test_tensorboard_events_are_written(observed_run):
  """(slow: shares the observed run.)"""
  workdir, _, _ = observed_run
  events = list((workdir / "tb").glob("events.out.tfevents.*"))
  assert events
  blob = b"".join(e.read_bytes() for e in events)
  for tag in (b"train/loss", b"train/density/0", b"train/grad_norm", b"validation/accuracy"):
    assert tag in blob, tag


@pytest.mark.slow
def test_progress_line_has_step_loss_rate_and_eta(observed_run):
  """(slow: shares the observed run.)"""
  _, stdout, _ = observed_run
  pattern = re.compile(r"^step\s+(\d+)/6\s+loss (\d+\.\d+)\s+(\d+\.\d+) steps/s\s+"
                       r"ETA (\d+m\d\ds|\?)$")
  lines = [m for m in map(pattern.match, stdout.splitlines()) if m]
  assert [int(m.group(1)) for m in lines] == [1, 2, 3, 4, 5]
  assert all(m.group(4) != "?" for m in lines[1:])  # A rate once two steps are seen.
  assert "[validation] accuracy=" in stdout and "step=6" in stdout


@pytest.mark.slow
def test_per_layer_mask_density_is_logged(observed_run):
  """(slow: shares the observed run.) The logged density is the window's share of valid
  (non-padding) query-key pairs of that step's batch, for every layer."""
  from sparse_attn.masks import patterns
  workdir, _, _ = observed_run
  config = config_lib.validate(_tiny.tiny_config(OBSERVED))
  ds = data_lib.build_dataset(config.data, "train")
  window = patterns.build("window", config.data.max_len, k=2)
  rows = {r["step"]: r for r in _tiny.read_metrics(workdir, "train")}
  batches = ds.batches(config.train.batch_size, seed=config.data.seed)
  for step in range(1, 4):
    valid = next(batches)["attention_mask"].astype(bool)
    pair = valid[:, :, None] & valid[:, None, :]
    expected = np.mean((pair & window).sum((1, 2)) / pair.sum((1, 2)))
    for layer in (0, 1):
      assert rows[step][f"density/{layer}"] == pytest.approx(expected, abs=1e-6)
    assert expected < 0.5


@pytest.mark.slow
def test_eval_py_reproduces_results_json(observed_run):
  """(slow: two subprocesses re-evaluate the observed run.) Exactly, to the last bit."""
  workdir, _, _ = observed_run
  results = json.loads((workdir / "results.json").read_text())
  p = _tiny.run([_tiny.PYTHON, str(_tiny.REPO / "eval.py"), f"--workdir={workdir}"])
  line = next(l for l in p.stdout.splitlines() if l.startswith("[validation] "))
  printed = dict(kv.split("=") for kv in line.split()[1:])
  assert {"accuracy", "loss"} <= set(printed)
  for k, v in printed.items():  # eval.py prints 4 decimals of the same numbers.
    assert v == f"{results['validation'][k]:.4f}", k
  code = ("import json, sys\nfrom sparse_attn import train\n"
          "m, run, frozen = train.evaluate_workdir(sys.argv[1])\n"
          "print(json.dumps({'metrics': m, 'step': int(run.ckpt.latest_step()),"
          " 'density': frozen.metadata['element_density']}))")
  p = _tiny.run([_tiny.PYTHON, "-c", code, str(workdir)])
  got = json.loads(p.stdout.strip().splitlines()[-1])
  assert got["step"] == 6
  assert got["metrics"]["validation"] == results["validation"]  # Bitwise.
  from sparse_attn.masks import patterns
  assert got["density"] == pytest.approx(patterns.build("window", 32, k=2).mean())


# ------------------------------------------------- resume: kill -9, SIGTERM, corruption

RESUME = {"train.num_steps": 40, "checkpoint.every_steps": 4, "checkpoint.async_save": True}
# The same with a fixed window mask and a learned DAM structure (its logits and optimizer
# state must resume bit for bit too).
RESUME_DAM = dict(RESUME, **{"masks.source": "pattern", "masks.pattern": "window",
                             "masks.kwargs": {"k": 4},
                             "structure": {"method": "dam_s", "per_head": True}})
CONFIGS = {"dense": RESUME, "dam": RESUME_DAM}


def _finished_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _start_and_signal(workdir, sig, config=RESUME) -> tuple[int, str]:
  """Starts train.py, sends `sig` once a first checkpoint is on disk; (exit code, output)."""
  p = subprocess.Popen(_tiny.train_cmd(workdir, config), cwd=_tiny.REPO, env=_tiny.env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 900
  try:
    while not _finished_steps(workdir):
      if p.poll() is not None:
        raise AssertionError(f"train.py ended before a checkpoint:\n{p.stdout.read()}")
      if time.monotonic() > deadline:
        raise AssertionError("no checkpoint within 900 s")
      time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be interrupted"
    p.send_signal(sig)
    out, _ = p.communicate(timeout=600)
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
  return p.returncode, out


def _final_state(workdir, step: int):
  m = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints", item_names=("state",))
  out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  m.close()
  return out["state"]


def _assert_same_run(workdir, reference, after_step: int):
  got = json.loads((workdir / "results.json").read_text())
  ref = json.loads((reference / "results.json").read_text())
  assert got["step"] == ref["step"] == RESUME["train.num_steps"]
  assert "preempted" not in got
  assert got["validation"] == ref["validation"]  # Bitwise.
  losses, ref_losses = _tiny.losses_by_step(workdir), _tiny.losses_by_step(reference)
  later = [s for s in ref_losses if s > after_step]
  assert later and all(losses[s] == ref_losses[s] for s in later)
  last = RESUME["train.num_steps"]
  a, b = _final_state(workdir, last), _final_state(reference, last)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


_REFERENCES: dict = {}


@pytest.fixture
def reference(tmp_path_factory, request):
  """(name, config, uninterrupted workdir) of the config named by the test's parameter;
  each uninterrupted run is made once per session."""
  name = getattr(request, "param", "dense")
  if name not in _REFERENCES:
    workdir = tmp_path_factory.mktemp(f"uninterrupted_{name}") / "run"
    _tiny.run(_tiny.train_cmd(workdir, CONFIGS[name]))
    _REFERENCES[name] = workdir
  return name, CONFIGS[name], _REFERENCES[name]


@pytest.fixture
def uninterrupted(reference):
  return reference[2]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["dense", "dam"], indirect=True)
def test_kill_9_then_rerun_ends_like_an_uninterrupted_run(tmp_path, reference):
  """(slow: three tiny runs of 40 steps, ~40-150 s.) Dense, and with a mask and DAM."""
  _, config, uninterrupted = reference
  workdir = tmp_path / "run"
  code, out = _start_and_signal(workdir, signal.SIGKILL, config)
  assert code == -signal.SIGKILL, out
  assert not (workdir / "results.json").exists()
  resumed_from = max(_finished_steps(workdir))
  assert 0 < resumed_from < RESUME["train.num_steps"]
  _tiny.run(_tiny.train_cmd(workdir, config))  # The same command.
  _assert_same_run(workdir, uninterrupted, resumed_from)
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["dense", "dam"], indirect=True)
def test_sigterm_saves_exits_143_and_resumes(tmp_path, reference):
  """(slow: two tiny runs of 40 steps plus the shared uninterrupted one.)"""
  _, config, uninterrupted = reference
  workdir = tmp_path / "run"
  code, out = _start_and_signal(workdir, signal.SIGTERM, config)
  assert code == 143, out
  assert "SIGTERM received" in out
  results = json.loads((workdir / "results.json").read_text())
  assert results["preempted"] is True
  reached = results["step"]
  assert 0 < reached < RESUME["train.num_steps"]
  assert max(_finished_steps(workdir)) == reached  # Saved at the step reached.
  assert int(_final_state(workdir, reached)["step"]) == reached
  _tiny.run(_tiny.train_cmd(workdir, config))
  _assert_same_run(workdir, uninterrupted, reached)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_and_reaches_the_same_end(tmp_path,
                                                                        uninterrupted):
  """(slow: one tiny run resumed from the previous checkpoint.) The newest step's files
  are garbage and an orbax temporary directory is left over: the rerun warns, resumes
  from the previous step, writes the newest step again and ends bitwise like the
  uninterrupted run."""
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  (workdir / "results.json").unlink()
  steps = _finished_steps(workdir)
  assert steps[-2:] == [36, 40]
  for f in (workdir / "checkpoints" / "40" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00not a checkpoint")
  leftover = workdir / "checkpoints" / "44.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(workdir / "checkpoints" / "36", leftover)
  p = _tiny.run(_tiny.train_cmd(workdir, RESUME))
  assert "checkpoints/40 could not be restored" in p.stderr
  assert "Restored step 36 after skipping" in p.stderr
  assert (workdir / "checkpoints" / "40.unreadable-0").is_dir()
  _assert_same_run(workdir, uninterrupted, 36)


# ----------------------------------------------------------------------- NaN / Inf loss


@pytest.mark.slow
def test_huge_learning_rate_stops_with_non_finite_loss_error(tmp_path):
  """(slow: one tiny run.) lr=1e30: step 1 is finite, step 2 is not."""
  workdir = tmp_path / "run"
  p = _tiny.run(_tiny.train_cmd(workdir, {"train.num_steps": 8, "checkpoint.every_steps": 1,
                                          "optimizer.learning_rate": 1e30,
                                          "optimizer.schedule": "constant"}), check=False)
  assert p.returncode == 2, p.stderr
  assert "error: Training loss is nan at step 2" in p.stderr
  assert "Traceback" not in p.stderr
  # Step 1's loss was finite, but its updated weights (lr 1e30) evaluate to NaN / inf: it
  # is set aside, not kept as a good checkpoint.
  assert "No checkpoint is finite; rerunning starts afresh" in p.stderr
  assert "optimizer.learning_rate (now 1e+30" in p.stderr
  assert _finished_steps(workdir) == []
  assert (workdir / "checkpoints" / "1.nonfinite-0").is_dir()
  assert not (workdir / "results.json").exists()


@pytest.mark.slow
def test_nan_loss_keeps_the_last_finite_checkpoint(tmp_path):
  """(slow: one tiny regression run.) A NaN regression target placed in the batch of
  step 5: checkpoints 2 and 4 are written, the error names step 5, and checkpoint 4
  holds finite parameters; nothing later is saved."""
  n, bs, nan_step = 64, 8, 5
  order = data_lib.epoch_permutation(n, 0, 0)
  nan_row = int(order[(nan_step - 1) * bs])
  rows = [f"review number {i} {'good' if i % 2 else 'bad'},{(i % 5) / 4}" for i in range(n)]
  rows[nan_row] = f"review number {nan_row} odd,nan"
  c = {"data.source": "files", "data.kind": "regression", "data.task": "scores",
       "data.paths.train": str(tmp_path / "train.csv"),
       "data.paths.validation": str(tmp_path / "valid.csv"),
       "train.num_steps": 12, "checkpoint.every_steps": 2}
  (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
  (tmp_path / "valid.csv").write_text(
      "text,label\n" + "\n".join(r for i, r in enumerate(rows) if i != nan_row) + "\n")
  workdir = tmp_path / "run"
  p = _tiny.run(_tiny.train_cmd(workdir, c), check=False)
  assert p.returncode == 2, p.stdout
  assert f"error: Training loss is nan at step {nan_step}" in p.stderr
  assert "Kept step 4 (finite parameters and evaluation loss)" in p.stderr
  assert _finished_steps(workdir) == [2, 4]
  state = _final_state(workdir, 4)
  assert int(state["step"]) == 4
  for leaf in jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"]):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert bool(jnp.all(jnp.isfinite(leaf)))
  losses = _tiny.losses_by_step(workdir)
  assert all(math.isfinite(losses[s]) for s in range(1, nan_step))
  assert not (workdir / "results.json").exists()


def test_compilation_cache_setting(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  try:
    train.enable_compilation_cache("")
    assert jax.config.jax_compilation_cache_dir == before  # "" leaves JAX's setting.
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
    train.enable_compilation_cache("auto")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)

"""Two JAX processes on localhost (jax.distributed, gloo CPU collectives) train like one.

`python train.py` runs twice with config.distributed.enabled, coordinator 127.0.0.1:<free
port>, num_processes 2, process_id 0 / 1 and cpu_collectives "gloo" (see
sparse_attn.sharding.maybe_initialize_distributed): each process has one CPU device, feeds
its half of every global batch, and both write the same workdir. A third, plain
single-process run is the reference.

Tolerance: per-step train losses and the eval loss agree within 1e-5 absolute (float32
reduction order differs across the two devices); eval accuracy and the logged steps are
equal exactly.
"""

from __future__ import annotations

import json
import socket
import subprocess

import numpy as np
import pytest

import _tiny

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LOSS_ATOL = 1e-5
OVERRIDES = {"train.num_steps": 6, "checkpoint.every_steps": 3}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("distributed")
  port = _free_port()
  dist = ["--config.distributed.enabled=True",
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2",
          "--config.distributed.cpu_collectives=gloo"]
  cmds = {f"process_{i}": _tiny.train_cmd(base / "two", OVERRIDES, *dist,
                                          f"--config.distributed.process_id={i}")
          for i in range(2)}
  cmds["single"] = _tiny.train_cmd(base / "one", OVERRIDES)
  procs = {k: subprocess.Popen(c, cwd=_tiny.REPO, env=_tiny.env(devices=1),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k, c in cmds.items()}
  outs = {}
  try:
    for k, p in procs.items():
      outs[k] = p.communicate(timeout=1200)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  for k, p in procs.items():
    if p.returncode != 0:
      raise AssertionError(f"{k} exited with {p.returncode}:\n{outs[k][1][-6000:]}")
  return base / "two", base / "one", outs


def test_only_process_0_reports(runs):
  """(slow, multiprocess: three concurrent tiny runs, ~60-180 s.)"""
  _, _, outs = runs
  assert "step      1/6  loss" in outs["process_0"][0]
  assert "steps/s" not in outs["process_1"][0]
  for k in ("process_0", "process_1"):
    assert "[validation] accuracy=" in outs[k][0]  # Both computed the final metrics.


def test_two_processes_train_like_one(runs):
  """(slow, multiprocess: shares the runs.)"""
  two, one, _ = runs
  rows_two = _tiny.read_metrics(two)
  assert [r["step"] for r in rows_two] == [1, 2, 3, 4, 5, 6]  # Written once, by process 0.
  l2, l1 = _tiny.losses_by_step(two), _tiny.losses_by_step(one)
  assert sorted(l2) == sorted(l1)
  assert max(l1.values()) - min(l1.values()) > 1e-3
  np.testing.assert_allclose([l2[s] for s in sorted(l2)], [l1[s] for s in sorted(l1)],
                             rtol=0, atol=LOSS_ATOL)
  r2 = json.loads((two / "results.json").read_text())
  r1 = json.loads((one / "results.json").read_text())
  assert r2["step"] == r1["step"] == 6
  assert r2["validation"]["accuracy"] == r1["validation"]["accuracy"]
  assert abs(r2["validation"]["loss"] - r1["validation"]["loss"]) <= LOSS_ATOL


def test_two_process_checkpoint_evaluates_in_one_process(runs):
  """(slow, multiprocess: re-evaluates the 2-process checkpoint with eval code.)"""
  two, _, _ = runs
  steps = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 6 and 3 in steps
  code = ("import json, sys\nfrom sparse_attn import train\n"
          "print(json.dumps(train.evaluate_workdir(sys.argv[1])[0]))")
  p = _tiny.run([_tiny.PYTHON, "-c", code, str(two)], devices=1)
  got = json.loads(p.stdout.strip().splitlines()[-1])["validation"]
  want = json.loads((two / "results.json").read_text())["validation"]
  assert got["accuracy"] == want["accuracy"]
  assert abs(got["loss"] - want["loss"]) <= LOSS_ATOL

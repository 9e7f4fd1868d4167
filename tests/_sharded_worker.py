"""Subprocess worker of test_sharding.py: trains the tiny config under several meshes.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts (the
parent test does this). Usage:

  python tests/_sharded_worker.py OUT_DIR MESH [MESH ...] [--restore_as MESH]

MESH is "d,m" (data, model). For each mesh it trains the tiny config into OUT_DIR/<d>x<m>
and records the per-step train losses and the final eval metrics. With --restore_as, the
checkpoint of the first mesh is then restored under that other mesh and re-evaluated.
Prints one JSON object on the last stdout line.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _tiny  # noqa: E402

STEPS = 5


def main(argv):
  import jax
  import numpy as np
  from sparse_attn import train

  out_dir = pathlib.Path(argv[1])
  restore_as = None
  meshes = []
  args = argv[2:]
  while args:
    a = args.pop(0)
    if a == "--restore_as":
      restore_as = tuple(int(x) for x in args.pop(0).split(","))
    else:
      meshes.append(tuple(int(x) for x in a.split(",")))
  result = {"device_count": jax.device_count(),
            "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
            "runs": {}}
  for mesh in meshes:
    workdir = out_dir / f"{mesh[0]}x{mesh[1]}"
    config = _tiny.tiny_config({"mesh.shape": mesh, "train.num_steps": STEPS,
                                "checkpoint.every_steps": 0})
    results = train.train_and_evaluate(config, workdir)
    losses = _tiny.losses_by_step(workdir)
    result["runs"][f"{mesh[0]}x{mesh[1]}"] = {
        "losses": [losses[s] for s in range(1, STEPS + 1)],
        "validation": results["validation"]}

  if restore_as is not None:
    src = out_dir / f"{meshes[0][0]}x{meshes[0][1]}"
    config = _tiny.tiny_config({"mesh.shape": restore_as, "train.num_steps": STEPS,
                                "checkpoint.every_steps": 0})
    metrics, _, _ = train.evaluate_workdir(src, config)
    # The restored state, laid out on the new mesh, compared leaf by leaf with the one
    # restored on the mesh it was saved from.
    state_new = train.setup(config, src).state
    orig = train.setup(_tiny.tiny_config({"mesh.shape": meshes[0], "train.num_steps": STEPS,
                                          "checkpoint.every_steps": 0}), src).state
    pairs = list(zip(jax.tree.leaves(state_new), jax.tree.leaves(orig)))
    bitwise = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
    mesh_shapes = sorted({tuple(l.sharding.mesh.devices.shape)
                          for l in jax.tree.leaves(state_new)})
    model_sharded = any(
        "model" in str(l.sharding.spec) for l in jax.tree.leaves(state_new.params))
    result["restored"] = {"validation": metrics["validation"], "bitwise_equal": bitwise,
                          "mesh_shapes": mesh_shapes, "model_axis_used": model_sharded,
                          "step": int(state_new.step)}
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)

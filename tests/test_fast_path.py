"""The fast path in the product: fixed and frozen masks run block-sparse in training and
evaluation, prepared once per length bucket, with the same numbers as the dense run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
from sparse_attn import attention
from sparse_attn import structure as structure_lib
from sparse_attn.masks import patterns

# A band at length 32 with blocks of 8: the layout skips tiles (rho_block < 1). Attention
# dropout off: each executor draws its own keep pattern (same rate, independent draws), so
# with it on the two runs agree in distribution only; hidden dropout stays on (one stream).
BAND = {"masks.source": "pattern", "masks.pattern": "window", "masks.kwargs": {"k": 3},
        "train.num_steps": 20, "checkpoint.every_steps": 0, "data.buckets": [16],
        "train.compare_dense_steps": 2, "model.attention_probs_dropout_prob": 0.0}


def _run(tmp_path, backend):
  workdir = tmp_path / backend
  _tiny.run(_tiny.train_cmd(workdir, dict(BAND, **{"model.attention_backend": backend})))
  return json.loads((workdir / "results.json").read_text())


def _train_losses(workdir):
  return [r["task_loss"] for r in _tiny.read_metrics(workdir, "train")]


def test_block_sparse_run_equals_the_dense_run(tmp_path):
  sparse = _run(tmp_path, "blocksparse")
  dense = _run(tmp_path, "dense")
  ls, ld = _train_losses(tmp_path / "blocksparse"), _train_losses(tmp_path / "dense")
  assert len(ls) == len(ld) == 20
  np.testing.assert_allclose(ls, ld, rtol=1e-4)
  for k, v in dense["validation"].items():
    assert sparse["validation"][k] == pytest.approx(v, abs=1e-4), k
  # What ran is recorded per length bucket and layer.
  ran = sparse["timing"]["attention_backend"]
  assert "32" in ran
  assert all(w.startswith("blocksparse:") for w in ran["32"].values()), ran
  assert all(w.startswith("dense:") for w in dense["timing"]["attention_backend"]["32"]
             .values())
  assert sparse["timing"]["train_step_s"] > 0 and sparse["timing"]["eval_examples_per_s"] > 0
  # The step against the same model dense, timed at the longest bucket after training.
  t = sparse["timing"]["dense_comparison"]
  assert t["length"] == 32 and t["dense_train_step_s"] > 0
  assert t["speedup_vs_dense"] == pytest.approx(t["dense_train_step_s"] / t["train_step_s"])
  # The frozen masks' densities: element (n x n) and per block size.
  assert sparse["masks"]["element_density"] == pytest.approx(
      patterns.window(32, 3).mean(), abs=1e-6)
  assert 0 < sparse["masks"]["block_density"]["16"] <= 1
  # The density evaluation measured is a float mean reduced in each executor's order.
  reported = {m["masks"].pop("reported_density")["validation"] for m in (dense, sparse)}
  assert max(reported) == pytest.approx(min(reported), rel=1e-6)
  assert dense["masks"] == sparse["masks"]


def _structure(backend, sinks=()):
  band = patterns.window(32, 3)
  return structure_lib.RunStructure(
      learned=None, fixed=(band[None], None), combine="and", sink_ids=sinks,
      sink_tokens=("[SEP]",) * len(sinks), num_layers=2, num_heads=4, max_len=32,
      backend=backend, head_dim=8)


def test_prepare_builds_block_sparse_objects_once_per_length():
  s = _structure("blocksparse")
  batch = {"input_ids": jnp.ones((2, 16), jnp.int32)}
  first = s.sample({}, None, 0, batch).masks
  again = s.sample({}, None, 0, batch).masks
  assert isinstance(first[0], attention.BlockSparseMask) and first[1] is None
  assert first[0] is again[0]                        # Prepared once for L=16, reused.
  assert first[0].shape[-1] == 16
  assert s.executors[16][0].startswith("blocksparse:")
  assert s.executors[16][1] == "dense: no mask"


def test_auto_keeps_short_masks_dense_and_says_why():
  p = _structure("auto").prepare((patterns.window(32, 3)[None], None), 32)
  assert isinstance(p.masks[0], np.ndarray) and p.masks[0].dtype == bool
  assert p.executors[0].startswith("dense: length 32 <")


def test_sink_links_fall_back_with_a_reason():
  s = _structure("blocksparse", sinks=(102,))
  p = s.prepare(s.fixed, 32)
  assert not isinstance(p.masks[0], attention.BlockSparseMask)
  assert "sink" in p.executors[0]
  ids = jnp.asarray(np.array([[101, 5, 102] + [0] * 29] * 2), jnp.int32)
  masks = s.sample({}, None, 0, {"input_ids": ids}).masks
  assert masks[0].shape == (2, 1, 32, 32) and bool(masks[0][0, 0, 20, 2])   # Sink kept.


def test_long_band_prepares_block_sparse_under_auto():
  s = structure_lib.RunStructure(
      learned=None, fixed=(patterns.window(1024, 32)[None],), combine="and", sink_ids=(),
      sink_tokens=(), num_layers=1, num_heads=4, max_len=1024, backend="auto", head_dim=8)
  p = s.prepare(s.fixed, 1024)
  assert isinstance(p.masks[0], attention.BlockSparseMask), p.executors
  assert p.masks[0].layout.block_density < 0.3

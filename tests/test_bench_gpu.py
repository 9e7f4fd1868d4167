"""The GPU benchmark section runs end to end in its smoke mode (CPU, Pallas interpreter)."""

import json

import numpy as np

from sparse_attn.bench import gpu as gpu_bench
from sparse_attn.masks import layout as layout_lib


def test_layouts_have_the_asked_block_density():
  mask, g = gpu_bench.band_global(4096, 64, 128, 0.1)
  lay = layout_lib.from_mask(mask, 64)
  assert g % 64 == 0 and abs(lay.block_density - 0.1) < 0.02
  assert len(lay.partial_blocks) > 0                       # The band's edges.
  rand = layout_lib.from_mask(gpu_bench.random_blocks(4096, 64, 0.1), 64)
  assert abs(rand.block_density - 0.1) < 0.02 and len(rand.partial_blocks) == 0
  assert np.all(np.diagonal(rand.block_mask[0, 0]) == layout_lib.FULL)


def test_quick_run_writes_json_and_markdown_with_the_ratios(tmp_path, monkeypatch):
  monkeypatch.setenv("SPARSE_ATTN_GPU_INTERPRET", "1")      # As --quick sets it on CPU.
  res = gpu_bench.main(["--quick", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "gpu_results.json").read_text())
  assert saved["attention"] == json.loads(json.dumps(res["attention"]))
  assert [r["layout"] for r in saved["attention"]] == ["band_global", "random_blocks"]
  for r in saved["attention"]:
    assert r["of_ideal_fwd_bwd"] == r["speedup_fwd_bwd"] * r["block_density"]
    assert {"cudnn/fwd", "blocksparse/fwd_bwd", "dense_masked/fwd_bwd"} <= set(r["ms"])
    assert r["max_abs_err_vs_dense_masked"] < 2e-2            # bfloat16 inputs.
  assert saved["train_step"]["speedup"] > 0
  table = (tmp_path / "gpu_results.md").read_text()
  assert "band_global" in table and "train step" in table

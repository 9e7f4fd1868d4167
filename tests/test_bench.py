"""bench.py runs end to end on tiny shapes and writes its JSON / Markdown / PNG."""

import json

import numpy as np
import pytest

from sparse_attn import bench
from sparse_attn import model as model_lib


def _check_outputs(out):
  res = json.loads((out / "results.json").read_text())
  assert (out / "results.md").read_text().startswith("# sparse_attn benchmark")
  assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
  assert res["matmul_peak_flops"] > 0
  return res


def test_quick_attention_section(tmp_path):
  bench.main(["--out", str(tmp_path), "--quick", "--host-memory", "default",
              "--only", "attention"])
  res = _check_outputs(tmp_path)
  assert not (tmp_path / "e2e.png").exists()          # Only with the e2e section.
  row = res["attention"][0]
  for key in ("rho_elem", "rho_block", "speedup_fwd", "speedup_fwdbwd", "of_ideal_fwd",
              "of_ideal_fwdbwd"):
    assert row[key] > 0
  assert row["of_ideal_fwd"] == pytest.approx(row["speedup_fwd"] * row["rho_block"])
  assert set(row["times"]) == {f"{v}/{m}" for m in ("fwd", "fwdbwd") for v in (
      "dense", "masked", "blocksparse", "blocksparse_xla")}
  assert row["of_ideal_fwd_xla"] > 0 and isinstance(row["cpu_kernel"], bool)


@pytest.mark.slow
def test_quick_all_sections(tmp_path):
  """(slow: compiles ~20 tiny train and inference steps.)"""
  bench.main(["--out", str(tmp_path), "--quick", "--host-memory", "default",
              "--only", "attention,long,pruned"])
  res = _check_outputs(tmp_path)
  long = res["long_model"]
  for mode in ("infer", "train"):
    assert 0 <= long[mode]["attention_share_noop"] <= 1
    assert long[mode]["amdahl_bound"] >= 1
  pruned = res["pruned"][0]
  assert pruned["infer"]["flop_ratio_bound"] > 1
  assert "Attention sublayers removed" in (tmp_path / "results.md").read_text()


def test_model_flops_by_hand():
  cfg = model_lib.BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=16)
  b, length = 3, 5
  per_layer = 2 * b * length * 4 * 8 * 8 + 4 * b * length ** 2 * 8 + 2 * b * length * 2 * 8 * 16
  assert bench.model_flops(cfg, b, length) == pytest.approx(2 * per_layer + 2 * b * 64)
  half = bench.model_flops(cfg, b, length, rho=0.5)
  assert half == pytest.approx(2 * (per_layer - 2 * b * length ** 2 * 8) + 2 * b * 64)
  pruned = model_lib.BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=16, heads_per_layer=(2, 0))
  assert bench.model_flops(pruned, b, length) < bench.model_flops(cfg, b, length)


def test_keep_layers_outside_the_model_is_an_error(tmp_path):
  with pytest.raises(SystemExit, match="outside the model"):
    bench.main(["--out", str(tmp_path), "--quick", "--host-memory", "default",
                "--only", "pruned", "--keep-layers", "5"])


def test_quick_e2e_section(tmp_path):
  bench.main(["--out", str(tmp_path), "--quick", "--host-memory", "default", "--only", "e2e"])
  res = _check_outputs(tmp_path)
  row = res["e2e"][0]
  assert set(row["times"]) == {f"{v}/{m}" for m in ("infer", "train") for v in (
      "dense", "masked", "auto", "no_attention_core")}
  for mode in ("infer", "train"):
    m = row[mode]
    assert 0 <= m["attention_share"] <= 1 and m["amdahl_bound"] >= 1
    assert m["of_bound"] == pytest.approx(m["speedup_vs_dense"] / m["amdahl_bound"])
  assert "MiniLM on linux_docs" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "e2e.png").stat().st_size > 0


def test_quick_e2e_section_times_a_frozen_learned_mask(tmp_path):
  """--e2e-learned: an exported block DAM_s mask (learned at 32 tokens) extended to the
  section's 64 by its block offsets, prepared per layer and timed next to dense."""
  from sparse_attn import export, learn
  blocks = np.arange(32) // 16
  off = blocks[None, :] - blocks[:, None]
  m = np.stack([off == 0, np.abs(off) <= 1])           # [2 heads, 32, 32]
  m[:, 0, :] = m[:, :, 0] = True
  meta = {"method": "dam_s", "seq_len": 32, "num_layers": 2, "num_heads": 2}
  export.export_masks(learn.Frozen(masks=(m, m), metadata=meta), tmp_path / "masks")
  bench.main(["--out", str(tmp_path / "b"), "--quick", "--host-memory", "default",
              "--only", "e2e", "--e2e-learned", str(tmp_path / "masks")])
  res = _check_outputs(tmp_path / "b")
  row = res["e2e"][0]
  assert {"learned/infer", "learned/train"} <= set(row["times"])
  assert row["learned"]["rho_elem"] == pytest.approx(
      np.mean([(np.abs(np.arange(64)[None] // 16 - np.arange(64)[:, None] // 16) <= d)
               | (np.arange(64)[None] == 0) | (np.arange(64)[:, None] == 0)
               for d in (0, 1)]))
  for mode in ("infer", "train"):
    m = row[mode]["learned"]
    assert m["of_bound"] == pytest.approx(m["speedup_vs_dense"] / m["amdahl_bound"])
  assert "frozen learned mask" in (tmp_path / "b" / "results.md").read_text()
  assert (tmp_path / "b" / "e2e.png").stat().st_size > 0

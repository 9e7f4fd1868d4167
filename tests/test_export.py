"""Tests of mask export: files, exact round trips, FlexAttention and Splash forms."""

import json

import numpy as np
import pytest

from sparse_attn import export, fixed_masks, model
from sparse_attn.masks import patterns


def _frozen(n=40, heads=2):
  band = patterns.window(n, 3)
  m0 = np.stack([band, patterns.remove_diagonal(band)])[:heads]
  m2 = patterns.random(n, 5, seed=1)[None]
  meta = {"method": "test", "seq_len": n, "num_layers": 3, "num_heads": heads}
  return fixed_masks.FrozenStructure(masks=(m0, None, m2), gates=None, metadata=meta)


def test_export_writes_every_artifact_and_round_trips(tmp_path):
  frozen = _frozen()
  out = tmp_path / "export"
  written = export.export_masks(frozen, out, block_size=16)
  names = {p.relative_to(out).as_posix() for p in written}
  for f in ("masks.npz", "metadata.json", "flex/layer_0.npz", "flex/layer_2.npz",
            "splash/layer_0.npy", "png/layer_0.png", "png/layer_2.png"):
    assert f in names, f
  assert not list(tmp_path.glob("export.tmp-*"))  # No temporary directory left behind.
  per_layer, meta = fixed_masks.load_exported(out)
  assert per_layer[1] is None
  np.testing.assert_array_equal(per_layer[0], frozen.masks[0])
  np.testing.assert_array_equal(per_layer[2], frozen.masks[2])
  assert meta["seq_len"] == 40 and meta["export"]["block_size"] == 16
  orbax = export.load_orbax_masks(out / "orbax")
  np.testing.assert_array_equal(orbax["layer_0"], frozen.masks[0])


def test_flex_and_splash_forms_reproduce_the_mask(tmp_path):
  frozen = _frozen()
  out = tmp_path / "e"
  export.export_masks(frozen, out, block_size=16, heatmaps=False)
  m = frozen.masks[0]
  b, n = 16, m.shape[-1]
  flex = np.load(out / "flex" / "layer_0.npz")
  nq = -(-n // b)
  rebuilt = np.zeros((m.shape[0], nq * b, nq * b), bool)
  for h in range(m.shape[0]):
    for qb in range(nq):
      for key in ("kv", "full_kv"):
        cnt = flex[f"{key}_num_blocks"][0, h, qb]
        for kb in flex[f"{key}_indices"][0, h, qb, :cnt]:
          rebuilt[h, qb * b:(qb + 1) * b, kb * b:(kb + 1) * b] = True
  # Every kept entry lies in a listed block, and every listed block holds a kept entry.
  assert not (m & ~rebuilt[:, :n, :n]).any()
  splash = np.load(out / "splash" / "layer_0.npy")
  np.testing.assert_array_equal(splash[:, :n, :n], m)


def test_exported_masks_load_as_fixed_masks_with_checks(tmp_path):
  frozen = _frozen(n=40)
  out = tmp_path / "e"
  export.export_masks(frozen, out, heatmaps=False)
  cfg = model.BertConfig(num_hidden_layers=3, num_attention_heads=2, hidden_size=8,
                         intermediate_size=8)
  masks_cfg = _masks_cfg(str(out))
  loaded = fixed_masks.build(masks_cfg, cfg, 32)  # Shorter run: top-left block.
  np.testing.assert_array_equal(loaded[0], frozen.masks[0][:, :32, :32])
  with pytest.raises(ValueError, match="sequence length 40"):
    fixed_masks.build(masks_cfg, cfg, 64)
  deeper = model.BertConfig(num_hidden_layers=4, num_attention_heads=2, hidden_size=8,
                            intermediate_size=8)
  with pytest.raises(ValueError, match="3 layers"):
    fixed_masks.build(masks_cfg, deeper, 32)
  more_heads = model.BertConfig(num_hidden_layers=3, num_attention_heads=4, hidden_size=8,
                                intermediate_size=8)
  with pytest.raises(ValueError, match="heads"):
    fixed_masks.build(masks_cfg, more_heads, 32)
  with pytest.raises(FileNotFoundError, match="masks.npz"):
    fixed_masks.build(_masks_cfg(str(tmp_path / "nowhere")), cfg, 32)


def test_dense_run_has_nothing_to_export(tmp_path):
  frozen = fixed_masks.FrozenStructure(masks=None, gates=None, metadata={})
  with pytest.raises(ValueError, match="nothing to export"):
    export.export_masks(frozen, tmp_path / "x")


def test_gates_are_exported(tmp_path):
  frozen = fixed_masks.FrozenStructure(masks=None, gates=(1.0, 0.0, np.array([1.0, 0.0])),
                                       metadata={"method": "prune"})
  export.export_masks(frozen, tmp_path / "g")
  gates = json.loads((tmp_path / "g" / "gates.json").read_text())
  assert gates == {"layer_0": 1.0, "layer_1": 0.0, "layer_2": [1.0, 0.0]}


def _masks_cfg(source):
  import ml_collections
  return ml_collections.ConfigDict(dict(source=source, pattern="", kwargs={}, layers=None,
                                        start_layer=0, remove_diagonal=False))


# -------------------------------------------------------------------------------- safety


def test_export_refuses_a_users_folder_and_leaves_it_intact(tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(export.UserError, match=r"not an earlier mask export.*notes\.txt"):
    export.export_masks(_frozen(), out, block_size=16, heatmaps=False)
  assert (out / "notes.txt").read_text() == "keep me"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # No temporaries left.


@pytest.mark.parametrize("run_file", ["checkpoints", "metrics.jsonl", "results.json"])
def test_export_refuses_a_workdir_even_with_a_marker(tmp_path, run_file):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("{}\n")
  (workdir / "results.json").write_text("{}\n")
  (workdir / export.MARKER).write_text("{}")
  with pytest.raises(export.UserError, match="holds a run's files or checkpoints"):
    export.check_destination(workdir)
  with pytest.raises(export.UserError):
    export.export_masks(_frozen(), workdir, block_size=16, heatmaps=False)
  assert (workdir / "checkpoints" / "5").is_dir() and (workdir / run_file).exists()


def test_export_replaces_an_earlier_export_and_an_empty_dir(tmp_path):
  out = tmp_path / "e"
  out.mkdir()  # Empty: allowed.
  export.export_masks(_frozen(n=40), out, block_size=16, heatmaps=False)
  assert (out / export.MARKER).exists()
  export.export_masks(_frozen(n=24), out, block_size=8, heatmaps=False)
  per_layer, meta = fixed_masks.load_exported(out)
  assert meta["seq_len"] == 24 and per_layer[0].shape[-1] == 24
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_failed_export_keeps_the_earlier_export(tmp_path, monkeypatch):
  out = tmp_path / "e"
  export.export_masks(_frozen(n=40), out, block_size=16, heatmaps=False)

  def broken(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(export, "_write_orbax", broken)
  with pytest.raises(OSError, match="disk full"):
    export.export_masks(_frozen(n=24), out, block_size=16, heatmaps=False)
  _, meta = fixed_masks.load_exported(out)
  assert meta["seq_len"] == 40
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


@pytest.mark.parametrize("n", [64, 50])
def test_flex_export_runs_in_flex_attention_and_matches_ours(tmp_path, n):
  """As a FlexAttention user would: the export's flex/ files and LOADING.md's recipe."""
  import _require
  torch = _require.torch()
  flex = pytest.importorskip("torch.nn.attention.flex_attention")
  import jax.numpy as jnp
  from sparse_attn import attention
  rng = np.random.default_rng(0)
  heads, depth = 2, 8
  mask = np.stack([patterns.window(n, 5), rng.random((n, n)) < 0.3])
  mask[:, :, 0] = True                               # Every row keeps a key.
  frozen = fixed_masks.FrozenStructure(
      masks=(mask, None), metadata={"method": "fixed", "seq_len": n, "num_layers": 2,
                                    "num_heads": heads})
  out = tmp_path / "export"
  export.export_masks(frozen, out, heatmaps=False)        # Default block 128 > n.
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["export"]["block_size"] == (64 if n == 64 else 32)
  assert "seq_lengths" in (out / "LOADING.md").read_text()
  f = np.load(out / "flex" / "layer_0.npz")
  assert tuple(f["SEQ_LENGTHS"]) == (n, n)
  m = torch.as_tensor(np.load(out / "masks.npz")["layer_0"])
  mask_mod = lambda b, h, q, k: m[h, q, k]
  block_mask = flex.BlockMask.from_kv_blocks(
      *(torch.as_tensor(f[k]) for k in ("kv_num_blocks", "kv_indices",
                                        "full_kv_num_blocks", "full_kv_indices")),
      BLOCK_SIZE=int(f["BLOCK_SIZE"]), mask_mod=mask_mod,
      seq_lengths=tuple(int(x) for x in f["SEQ_LENGTHS"]))
  q, k, v = (rng.standard_normal((1, heads, n, depth)).astype(np.float32) for _ in range(3))
  theirs = flex.flex_attention(*(torch.as_tensor(x) for x in (q, k, v)),
                               block_mask=block_mask).numpy()
  to_bqhd = lambda x: jnp.asarray(np.transpose(x, (0, 2, 1, 3)))
  ours = attention.dot_product_attention(to_bqhd(q), to_bqhd(k), to_bqhd(v),
                                         mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.transpose(np.asarray(ours), (0, 2, 1, 3)), theirs,
                             atol=2e-6)

"""Tests of the block layout: tile classification, densities, round trips, exporters."""

import numpy as np
import pytest

import _require
from sparse_attn.masks import layout
from sparse_attn.masks import patterns


def _loop_reference(mask, b):
  """Tile kinds and tiles by explicit loops over a [Bm, Hm, Q, K] mask."""
  bm, hm, q, k = mask.shape
  nq, nk = -(-q // b), -(-k // b)
  kinds = np.zeros((bm, hm, nq, nk), np.int8)
  tiles = {}
  for x in range(bm):
    for h in range(hm):
      for i in range(nq):
        for j in range(nk):
          t = np.zeros((b, b), bool)
          blk = mask[x, h, i * b:(i + 1) * b, j * b:(j + 1) * b]
          t[:blk.shape[0], :blk.shape[1]] = blk
          kinds[x, h, i, j] = 2 if t.all() else (1 if t.any() else 0)
          tiles[x, h, i, j] = t
  return kinds, tiles


@pytest.mark.parametrize("shape,b", [((37, 37), 8), ((3, 40, 40), 16), ((2, 3, 33, 20), 8),
                                     ((64, 64), 64), ((5, 5), 8)])
def test_from_mask_matches_loop_reference(shape, b):
  rng = np.random.default_rng(0)
  mask = rng.random(shape) < 0.15
  if len(shape) == 2:
    mask |= patterns.window(shape[0], 3)   # Some full tiles too.
  lay = layout.from_mask(mask, b)
  m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  kinds, tiles = _loop_reference(m4, b)
  np.testing.assert_array_equal(lay.block_mask, kinds)
  for key, t in tiles.items():
    np.testing.assert_array_equal(lay.tile(*key), t)
  assert lay.block_density == pytest.approx((kinds > 0).mean())
  assert lay.element_density == pytest.approx(m4.mean())
  np.testing.assert_array_equal(lay.to_element_mask(), m4)
  assert lay.shape == m4.shape


def test_partial_tiles_are_deduplicated():
  lay = layout.from_mask(patterns.window(1024, 100), 64)
  # A band has few distinct partial tiles (the two edge shapes per offset).
  assert len(lay.partial_blocks) <= 8
  assert lay.full_block_fraction > 0.2


def test_padding_is_masked_and_edge_tiles_are_partial():
  lay = layout.from_mask(np.ones((10, 10), bool), 8)
  padded = lay.to_element_mask(padded=True)[0, 0]
  assert padded.shape == (16, 16)
  assert padded[:10, :10].all() and not padded[10:].any() and not padded[:, 10:].any()
  np.testing.assert_array_equal(lay.block_mask[0, 0], [[2, 1], [1, 1]])


def test_block_densities_match_table_in_research_notes():
  # anchors.md 9.1: L=4096 window +-128 -> 0.092 at b=128, 0.077 at b=64.
  d = layout.block_densities(patterns.window(4096, 128), (64, 128))
  assert d[128] == pytest.approx(0.092, abs=5e-4)
  assert d[64] == pytest.approx(0.077, abs=5e-4)
  assert layout.from_mask(patterns.window(4096, 128), 128).block_density == d[128]


def test_npz_round_trip(tmp_path):
  mask = np.random.default_rng(1).random((2, 30, 30)) < 0.3
  lay = layout.from_mask(mask, 8)
  lay.save_npz(tmp_path / "lay.npz")
  back = layout.load_npz(tmp_path / "lay.npz")
  assert back == lay and hash(back) == hash(lay)
  np.testing.assert_array_equal(back.to_element_mask()[0], mask)


def test_kv_lists_follow_loop_reference():
  mask = np.random.default_rng(2).random((2, 40, 40)) < 0.05
  lay = layout.from_mask(mask, 8)
  for kind, code in (("nonempty", (1, 2)), ("partial", (1,)), ("full", (2,))):
    num, idx = lay.kv_lists(kind)
    for h in range(2):
      for i in range(lay.num_q_blocks):
        expect = [j for j in range(lay.num_k_blocks) if lay.block_mask[0, h, i, j] in code]
        assert num[0, h, i] == len(expect)
        assert list(idx[0, h, i, :len(expect)]) == expect
        if expect:  # Padding repeats the last listed block.
          assert set(idx[0, h, i, len(expect):]) <= {expect[-1]}


def test_flex_block_form_reproduces_mask():
  mask = patterns.union(patterns.window(50, 5), patterns.global_tokens(50, 2))
  lay = layout.from_mask(mask, 16)
  flex = lay.to_flex()
  assert flex["BLOCK_SIZE"] == 16
  assert flex["kv_indices"].shape == (1, 1, 4, 4)
  rebuilt = np.zeros((1, 1, 4, 4), np.int8)
  for key, kind in (("kv", 1), ("full_kv", 2)):
    num, idx = flex[f"{key}_num_blocks"], flex[f"{key}_indices"]
    for i in range(4):
      for j in idx[0, 0, i, :num[0, 0, i]]:
        rebuilt[0, 0, i, j] = kind
  np.testing.assert_array_equal(rebuilt, lay.block_mask)
  # Element level: full tiles are all True, partial tiles hold exactly the mask.
  padded = np.zeros((64, 64), bool)
  padded[:50, :50] = mask
  for i in range(4):
    for j in flex["full_kv_indices"][0, 0, i, :flex["full_kv_num_blocks"][0, 0, i]]:
      assert padded[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].all()


def test_flex_block_mask_in_torch_when_available():
  _require.torch()
  flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
  import torch
  mask = patterns.window(256, 20)
  lay = layout.from_mask(mask, 128)
  f = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
       for k, v in lay.to_flex().items()}
  bm = flex_mod.BlockMask.from_kv_blocks(
      f["kv_num_blocks"], f["kv_indices"], f["full_kv_num_blocks"], f["full_kv_indices"],
      BLOCK_SIZE=f["BLOCK_SIZE"], mask_mod=lambda b, h, q, k: (q - k).abs() <= 20)
  ref = flex_mod.create_block_mask(lambda b, h, q, k: (q - k).abs() <= 20, 1, 1, 256, 256,
                                   device="cpu", BLOCK_SIZE=128)
  np.testing.assert_array_equal(bm.to_dense().numpy(), ref.to_dense().numpy())


def test_splash_masks_reproduce_element_mask():
  mask = np.random.default_rng(3).random((3, 70, 70)) < 0.2
  lay = layout.from_mask(mask, 32)
  sm = lay.to_splash_masks()
  assert sm.shape == (3, 96, 96)
  np.testing.assert_array_equal(sm[:, :70, :70], mask)
  assert not sm[:, 70:].any() and not sm[:, :, 70:].any()
  with pytest.raises(ValueError, match="per example"):
    layout.from_mask(np.ones((2, 1, 8, 8), bool), 4).to_splash_masks()


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="bool"):
    layout.from_mask(np.full((8, 8), 0.5, np.float32), 4)
  with pytest.raises(ValueError, match="shape"):
    layout.from_mask(np.ones((8,), bool), 4)
  with pytest.raises(ValueError, match="block_size"):
    layout.from_mask(np.ones((8, 8), bool), 0)
  lay = layout.from_mask(np.eye(8, dtype=np.int64), 4)   # 0/1 integers are accepted.
  assert lay.element_density == pytest.approx(1 / 8)


def test_element_density_of_a_layout_without_partial_tiles():
  # Whole blocks only (a block-diagonal mask): no partial tile list to count.
  m = np.kron(np.eye(4, dtype=bool), np.ones((8, 8), bool))
  lay = layout.from_mask(m, 8)
  assert len(lay.partial_blocks) == 0
  assert lay.element_density == pytest.approx(m.mean()) == pytest.approx(0.25)

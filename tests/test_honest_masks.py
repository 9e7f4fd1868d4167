"""Exported masks are only what was learned: no link past the longest training example, and
no silent use at a longer length (the Toeplitz extrapolation rule is explicit)."""

import jax
import ml_collections
import numpy as np
import pytest

import _tiny
from sparse_attn import fixed_masks
from sparse_attn import learn
from sparse_attn import model as model_lib
from sparse_attn import structure as structure_lib
from sparse_attn.masks import patterns

N = 32
BERT = model_lib.BertConfig(**_tiny.TINY_MODEL)
SHORT = np.array([4, 7, 9, 10, 6])            # The longest training example: 10 tokens.


def _dam_s_structure(lengths):
  cfg = learn.default_config("dam_s")
  learned = learn.build(cfg, BERT, N, lengths=lengths)
  return structure_lib.RunStructure(
      learned=learned, fixed=None, combine="and", sink_ids=(), sink_tokens=(),
      num_layers=2, num_heads=4, max_len=N,
      max_train_len=None if lengths is None else int(lengths.max()))


def _kept_offsets(m):
  i, j = np.nonzero(np.asarray(m).any(0))
  return np.abs(j - i)


def test_dam_s_on_short_sentences_keeps_no_link_past_the_longest_example():
  s = _dam_s_structure(SHORT)
  params = jax.tree.map(lambda x: x + 5.0, s.init(jax.random.key(0)))   # Keep everything.
  frozen = s.freeze(params, step=1, workdir="w")
  for m in frozen.masks:
    assert m is not None and m.shape[-1] == N
    assert not m[:, 10:, :].any() and not m[:, :, 10:].any()
    assert _kept_offsets(m).max() == 9                 # Offsets 0..9 only.
  assert frozen.metadata["learned_extent"]["max_train_len"] == 10
  assert "never trained" in frozen.metadata["learned_extent"]["rule"]
  # Without known lengths nothing is dropped (and nothing claimed).
  unknown = _dam_s_structure(None).freeze(params, step=1, workdir="w")
  assert _kept_offsets(unknown.masks[0]).max() == N - 1
  assert "learned_extent" not in unknown.metadata


def test_fixed_masks_are_not_cut_to_the_training_lengths():
  s = structure_lib.RunStructure(
      learned=None, fixed=(patterns.window(N, 20)[None], None), combine="and",
      sink_ids=(), sink_tokens=(), num_layers=2, num_heads=4, max_len=N, max_train_len=10)
  frozen = s.freeze({}, step=0, workdir="w")
  np.testing.assert_array_equal(frozen.masks[0][0], patterns.window(N, 20))


def _cfg(source, extrapolate="none"):
  return ml_collections.ConfigDict(dict(
      source=str(source), pattern="", kwargs={}, layers=None, start_layer=0,
      remove_diagonal=False, combine="and", sink_tokens=(), extrapolate=extrapolate))


def _export(tmp_path, masks, meta_extra=None):
  from sparse_attn import export
  meta = {"method": "dam_s", "seq_len": masks[0].shape[-1], "num_layers": len(masks),
          "num_heads": 4, **(meta_extra or {})}
  export.export_masks(learn.Frozen(masks=tuple(masks), metadata=meta), tmp_path / "m")
  return tmp_path / "m"


def test_a_longer_run_needs_the_explicit_toeplitz_rule(tmp_path):
  band = patterns.longformer(16, 2, 1)[None]
  src = _export(tmp_path, [band, band])
  with pytest.raises(ValueError, match="masks.extrapolate='toeplitz'"):
    fixed_masks.build(_cfg(src), BERT, 40)
  out = fixed_masks.build(_cfg(src, "toeplitz"), BERT, 40)
  np.testing.assert_array_equal(out[0][0], patterns.longformer(40, 2, 1))


def test_toeplitz_drops_offsets_past_the_learned_range(tmp_path):
  wide = patterns.window(16, 12)[None].copy()
  wide[:, 6:, :] = False
  wide[:, :, 6:] = False                   # Learned on examples of at most 6 tokens.
  src = _export(tmp_path, [wide, wide], {"learned_extent": {"max_train_len": 6}})
  out = fixed_masks.build(_cfg(src, "toeplitz"), BERT, 24)
  off = np.abs(np.arange(24)[None] - np.arange(24)[:, None])
  np.testing.assert_array_equal(out[1][0], off < 6)
  # Within the exported length too: the learned extent is what counts.
  inside = fixed_masks.build(_cfg(src, "toeplitz"), BERT, 16)
  np.testing.assert_array_equal(inside[0][0], off[:16, :16] < 6)


def test_a_mask_that_is_not_toeplitz_cannot_be_extrapolated(tmp_path):
  rnd = np.random.default_rng(0).random((1, 16, 16)) < 0.5
  src = _export(tmp_path, [rnd, rnd])
  with pytest.raises(ValueError, match="does not depend on j - i"):
    fixed_masks.build(_cfg(src, "toeplitz"), BERT, 20)


def _block_dam_s(n, b, keep_offsets, heads=4):
  """A block DAM_s mask as freezing builds it: per head, the kept block offsets (of
  j // b - i // b), OR the global [CLS] row and column."""
  from sparse_attn.learn import dam_masks
  blocks = np.arange(n) // b
  off = blocks[None, :] - blocks[:, None]
  m = np.stack([np.isin(off, keep_offsets[h % len(keep_offsets)]) for h in range(heads)])
  m[:, 0, :] = m[:, :, 0] = True
  assert np.array_equal(np.abs(off), dam_masks.toeplitz_index(n, block_size=b))
  return m


def test_block_toeplitz_masks_extend_by_block_offsets(tmp_path):
  """A block DAM_s mask (one logit per head and block offset, [CLS] global) learned at 32
  tokens extends to 56 with the same kept block offsets; offsets past the learned range
  (|d| > 3 blocks of 8) are dropped."""
  keep = [[0], [0, 1, -1], [2, -3], [0, 3]]
  m = _block_dam_s(32, 8, keep)
  src = _export(tmp_path, [m, m])
  out = fixed_masks.build(_cfg(src, "toeplitz"), BERT, 56)
  np.testing.assert_array_equal(out[0], _block_dam_s(56, 8, keep))
  np.testing.assert_array_equal(out[1][:, :32, :32], m)
  # One flipped tile breaks the block structure: refused, not guessed.
  m2 = m.copy()
  m2[1, 16:24, 8:16] = ~m2[1, 16:24, 8:16]
  with pytest.raises(ValueError, match="does not depend on j - i"):
    fixed_masks.build(_cfg(_export(tmp_path / "x", [m2, m2]), "toeplitz"), BERT, 56)

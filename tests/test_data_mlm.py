"""Tests for sparse_attn.data.mlm: BERT dynamic masking (15%, 80/10/10), determinism."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_attn import data
from sparse_attn.data.text import SpecialIds

SPECIAL = SpecialIds(pad=0, cls=101, sep=102, mask=103, unk=100, all=(0, 100, 101, 102, 103))
VOCAB = 30522


def make_rows(b, lengths, seed=0):
  """[B,L] rows of [CLS] random-word-ids [SEP] then padding; attention mask."""
  rng = np.random.default_rng(seed)
  width = max(lengths)
  ids = np.zeros([b, width], np.int32)
  for r, n in enumerate(lengths):
    ids[r, 0], ids[r, n - 1] = 101, 102
    ids[r, 1:n - 1] = rng.integers(1000, VOCAB, size=n - 2)
  att = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, att


def mask(ids, att, step=0, seed=0, rows=None, **kw):
  rows = np.arange(len(ids)) if rows is None else rows
  return data.mask_tokens(ids, att, seed=seed, step=step, rows_B=rows, special=SPECIAL,
                          vocab_size=VOCAB, **kw)


def test_80_10_10_proportions_and_15_percent_selection():
  b = 3000
  lengths = np.random.default_rng(1).integers(20, 129, size=b)
  ids, att = make_rows(b, lengths)
  out = mask(ids, att, max_predictions=1000)
  chosen = out["label_mask"] == 1
  n_real = lengths - 2
  np.testing.assert_array_equal(chosen.sum(1), np.maximum(1, np.rint(0.15 * n_real)))
  orig = ids[chosen]
  seen = out["input_ids"][chosen]
  total = chosen.sum()
  frac_mask = (seen == 103).mean()
  frac_same = (seen == orig).mean()
  frac_random = ((seen != 103) & (seen != orig)).mean()
  # ~40k predictions: binomial standard deviations are ~0.002 (80%) and ~0.0015 (10%).
  assert total > 30000
  assert abs(frac_mask - 0.8) < 0.01
  assert abs(frac_random - 0.1) < 0.008
  assert abs(frac_same - 0.1) < 0.008
  # Labels hold the original ids exactly where predicted, 0 elsewhere.
  np.testing.assert_array_equal(out["labels"], np.where(chosen, ids, 0))
  # Unchosen positions are untouched.
  np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])
  # Chosen positions are spread uniformly over the row, not clustered at its start.
  rel = (np.nonzero(chosen)[1] - 1) / (n_real[np.nonzero(chosen)[0]])
  assert abs(rel.mean() - 0.5) < 0.01


def test_special_tokens_and_padding_are_never_chosen_or_used_as_replacements():
  ids, att = make_rows(500, [10, 40] * 250)
  ids[:, 3] = 100  # An [UNK] in every row: special, never predicted.
  out = mask(ids, att, probability=0.5, max_predictions=100)
  chosen = out["label_mask"] == 1
  assert not chosen[np.isin(ids, SPECIAL.all)].any()
  assert not chosen[att == 0].any()
  replaced = chosen & (out["input_ids"] != 103) & (out["input_ids"] != ids)
  assert replaced.sum() > 100
  assert not np.isin(out["input_ids"][replaced], SPECIAL.all).any()
  assert out["input_ids"].dtype == out["labels"].dtype == out["label_mask"].dtype == np.int32


def test_counts_capped_by_max_predictions_and_at_least_one():
  ids, att = make_rows(3, [3, 4, 128])
  out = mask(ids, att, max_predictions=20)
  assert out["label_mask"].sum(1).tolist() == [1, 1, 19]  # round(.15*126)=19 <= 20.
  out = mask(ids, att, probability=0.5, max_predictions=20)
  assert out["label_mask"].sum(1).tolist() == [1, 1, 20]
  filler = np.array([[101, 102, 0, 0]]), np.array([[1, 1, 0, 0]])
  assert mask(*filler)["label_mask"].sum() == 0  # Nothing to predict in a filler row.


def test_masks_are_deterministic_per_seed_step_and_row():
  ids, att = make_rows(16, [64] * 16)
  a, b = mask(ids, att, step=5), mask(ids, att, step=5)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert (mask(ids, att, step=6)["label_mask"] != a["label_mask"]).any()
  assert (mask(ids, att, step=5, seed=1)["label_mask"] != a["label_mask"]).any()
  # A row's mask depends on its global row index only, not on its neighbours.
  one = mask(ids[7:8], att[7:8], step=5, rows=np.array([7]))
  np.testing.assert_array_equal(one["input_ids"][0], a["input_ids"][7])


def test_bad_arguments():
  ids, att = make_rows(1, [10])
  with pytest.raises(ValueError, match="mlm_probability"):
    mask(ids, att, probability=1.5)
  with pytest.raises(ValueError, match="max_predictions_per_seq"):
    mask(ids, att, max_predictions=0)


def test_uniform_is_in_unit_interval_and_reproducible():
  u = data.mlm.uniform((1, 2, 3), 10000)
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
  np.testing.assert_array_equal(u, data.mlm.uniform((1, 2, 3), 10000))

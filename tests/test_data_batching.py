"""Tests for sparse_attn.data.batching: buckets, deterministic order, resume, multi-host."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sparse_attn import data
from sparse_attn.data.tasks import Task
from sparse_attn.data.text import Encoded, SpecialIds

SPECIAL = SpecialIds(pad=0, cls=101, sep=102, mask=103, unk=100, all=(0, 100, 101, 102, 103))


def make_ds(lengths, kind="classification", buckets=(4, 8), max_len=16, seed=0, grouping=0):
  """Example i has len lengths[i]: [CLS] 1000+10i, 1000+10i+1, ... [SEP]."""
  rows = [[101, *range(1000 + 10 * i, 1000 + 10 * i + n - 2), 102]
          for i, n in enumerate(lengths)]
  flat = np.concatenate(rows).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
  tags = mask = None
  if kind == "token_classification":
    mask = np.isin(flat, (101, 102), invert=True).astype(np.int32)
    tags = (flat % 3 * mask).astype(np.int32)
  enc = Encoded(offsets, flat, np.zeros_like(flat), tags, mask)
  task = Task(name="toy", source="files", kind=kind,
              label_names=("a", "b", "c") if kind != "regression" else ())
  labels = None if kind in ("token_classification", "mlm") else (
      np.arange(len(lengths)) % 2).astype(np.float32 if kind == "regression" else np.int32)
  return data.Dataset(task, "train", enc, labels, max_len=max_len, buckets=buckets,
                      seed=seed, special=SPECIAL, vocab_size=2000, length_grouping=grouping)


def example_of(batch):
  """Example index of each row (from its first content token), -1 for filler rows."""
  return np.where(batch["weights"] > 0, (batch["input_ids"][:, 1] - 1000) // 10, -1)


def take(it, n):
  return list(itertools.islice(it, n))


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bucket_lengths():
  assert data.bucket_lengths([64, 32, 256, 128], 128) == (32, 64, 128)
  assert data.bucket_lengths([], 128) == (128,)
  assert data.bucket_lengths([32, 32, 0], 48) == (32, 48)


def test_each_batch_padded_to_smallest_fitting_bucket():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 17, size=50)
  ds = make_ds(lengths, buckets=(4, 8, 12))
  for batch in take(ds.batches(5, seed=1), 30):
    idx = example_of(batch)
    longest = lengths[idx].max()
    width = batch["input_ids"].shape[1]
    assert width == min(b for b in (4, 8, 12, 16) if b >= longest)
    for r, i in enumerate(idx):  # Content equals the ragged row, then padding.
      n = lengths[i]
      assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
      assert batch["input_ids"][r, n:].tolist() == [0] * (width - n)
      assert batch["input_ids"][r, n - 1] == 102
      assert batch["labels"][r] == i % 2
    assert {k: v.dtype for k, v in batch.items()} == dict(
        input_ids=np.int32, token_type_ids=np.int32, attention_mask=np.int32,
        weights=np.float32, labels=np.int32)


def test_training_order_is_a_pure_function_of_seed_and_step():
  ds = make_ds(np.full(23, 5))
  a = take(ds.batches(4, seed=3), 20)
  b = take(make_ds(np.full(23, 5)).batches(4, seed=3), 20)
  for x, y in zip(a, b):
    assert_batches_equal(x, y)
  c = take(ds.batches(4, seed=4), 20)
  assert any((example_of(x) != example_of(y)).any() for x, y in zip(a, c))


def test_resume_sees_the_tail_of_an_uninterrupted_run():
  ds = make_ds(np.random.default_rng(1).integers(3, 17, size=37), kind="mlm")
  full = take(ds.batches(8, seed=7), 15)  # 4 steps per epoch: crosses three epochs.
  for n in (1, 4, 9):
    resumed = take(make_ds(ds.lengths, kind="mlm").batches(8, seed=7, start_step=n), 15 - n)
    for x, y in zip(full[n:], resumed):
      assert_batches_equal(x, y)  # Includes the dynamic MLM masks.


def test_epochs_cover_every_example_once_and_reshuffle():
  ds = make_ds(np.full(24, 4))
  batches = take(ds.batches(6, seed=0), 8)  # Two epochs of 4 steps.
  e0 = np.concatenate([example_of(b) for b in batches[:4]])
  e1 = np.concatenate([example_of(b) for b in batches[4:]])
  assert sorted(e0) == list(range(24)) and sorted(e1) == list(range(24))
  assert (e0 != e1).any()
  np.testing.assert_array_equal(e0, data.epoch_permutation(24, 0, 0))


def test_drop_remainder_false_fills_last_training_batch_with_weight_zero_rows():
  ds = make_ds(np.full(10, 4))
  batches = take(ds.batches(4, seed=0, drop_remainder=False), 6)  # 3 steps per epoch.
  assert [b["weights"].sum() for b in batches] == [4, 4, 2, 4, 4, 2]
  ids = np.concatenate([example_of(b) for b in batches[:3]])
  assert sorted(ids[ids >= 0]) == list(range(10))


def test_eval_pass_in_order_with_filler_rows():
  ds = make_ds([3, 5, 4, 6, 7, 3, 3])
  batches = list(ds.batches(3, shuffle=False, drop_remainder=False))
  assert len(batches) == 3 == ds.steps_per_epoch(3, drop_remainder=False)
  assert [example_of(b).tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, -1, -1]]
  last = batches[-1]
  assert last["weights"].tolist() == [1, 0, 0]
  assert last["input_ids"][1].tolist() == [101, 102, 0, 0]  # Filler: [CLS] [SEP].
  assert last["attention_mask"][1].tolist() == [1, 1, 0, 0]
  assert last["labels"][1:].tolist() == [0, 0]
  assert len(list(ds.batches(3, shuffle=False, drop_remainder=True))) == 2
  assert len(list(ds.batches(3, shuffle=False, drop_remainder=False, start_step=2))) == 1


@pytest.mark.parametrize("kind", ["classification", "regression", "token_classification",
                                  "mlm"])
def test_multi_host_slices_concatenate_to_the_global_batch(kind):
  lengths = np.random.default_rng(2).integers(3, 17, size=41)
  ds = make_ds(lengths, kind=kind)
  for shuffle in (True, False):
    whole = take(ds.batches(8, seed=5, shuffle=shuffle, drop_remainder=False), 6)
    parts = [take(ds.batches(8, seed=5, shuffle=shuffle, drop_remainder=False,
                             process_index=p, process_count=4), 6) for p in range(4)]
    for step, batch in enumerate(whole):
      for k, v in batch.items():
        local = [parts[p][step][k] for p in range(4)]
        assert all(x.shape[0] == 2 for x in local)
        np.testing.assert_array_equal(np.concatenate(local), v, err_msg=f"{kind} {k}")


def test_token_classification_batch_carries_label_mask():
  ds = make_ds([5, 9, 4], kind="token_classification")
  b = next(ds.batches(3, shuffle=False))
  assert b["labels"].shape == b["label_mask"].shape == b["input_ids"].shape == (3, 16)
  assert (b["label_mask"][:, 0] == 0).all()  # [CLS] is never labelled.
  np.testing.assert_array_equal(b["labels"], b["input_ids"] % 3 * b["label_mask"])


def test_bad_batch_arguments_raise_clear_errors():
  ds = make_ds(np.full(5, 4))
  with pytest.raises(ValueError, match="fewer examples than one global batch"):
    next(ds.batches(8))
  with pytest.raises(ValueError, match="not divisible by process_count"):
    next(ds.batches(4, process_count=3))
  with pytest.raises(ValueError, match="process_index"):
    next(ds.batches(4, process_index=2, process_count=2))
  with pytest.raises(ValueError, match="batch_size"):
    next(ds.batches(0))


def test_length_grouping_sees_every_example_once_in_batches_of_similar_length():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 17, size=103)
  plain = make_ds(lengths, buckets=(4, 8, 12))
  grouped = make_ds(lengths, buckets=(4, 8, 12), grouping=4)
  per_epoch = len(lengths) // 8
  rows_p = [example_of(b) for b in take(plain.batches(8), per_epoch)]
  rows_g = [example_of(b) for b in take(grouped.batches(8), per_epoch)]
  seen = np.concatenate(rows_g)
  assert len(set(seen.tolist())) == len(seen) == per_epoch * 8  # Once each per epoch.
  spread = lambda rows: np.mean([np.ptp(lengths[r]) for r in rows])
  assert spread(rows_g) < 0.5 * spread(rows_p)  # Similar lengths within a batch...
  width = lambda ds: np.mean([b["input_ids"].shape[1] for b in take(ds.batches(8), per_epoch)])
  assert width(grouped) < width(plain)  # ...so less padding.
  # Pure function of (seed, step): resuming mid-epoch and in the next epoch agrees.
  again = make_ds(lengths, buckets=(4, 8, 12), grouping=4)
  for start in (5, per_epoch + 2):
    assert_batches_equal(next(again.batches(8, start_step=start)),
                         take(grouped.batches(8), start + 1)[-1])
  # Each epoch has its own order.
  second = [example_of(b) for b in take(grouped.batches(8, start_step=per_epoch), per_epoch)]
  assert not all(np.array_equal(a, b) for a, b in zip(rows_g, second))


def test_length_grouping_evaluates_in_length_order_and_keeps_every_row():
  lengths = np.array([9, 3, 14, 5, 3, 12, 7])
  ds = make_ds(lengths, buckets=(4, 8, 12), grouping=2)
  got = [example_of(b) for b in ds.batches(3, shuffle=False, drop_remainder=False)]
  order = np.concatenate(got)
  assert sorted(order[order >= 0].tolist()) == list(range(len(lengths)))
  assert list(lengths[order[order >= 0]]) == sorted(lengths)
  with pytest.raises(ValueError, match="length_grouping"):
    make_ds(lengths, grouping=-1)

"""Tests for the offline sources: documented sizes, label balance, fixed splits, end to end."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest

from sparse_attn import assets, data
from sparse_attn.data import offline


def test_split_of_is_a_fixed_hash_split():
  assert [offline.split_of(k) for k in ("a", "b", "c", "hamlet/0")] == [
      offline.split_of(k) for k in ("a", "b", "c", "hamlet/0")]
  keys = [f"example {i}" for i in range(20000)]
  counts = {s: sum(offline.split_of(k) == s for k in keys) for s in data.SPLITS}
  assert abs(counts["train"] / 20000 - 0.8) < 0.01
  assert abs(counts["validation"] / 20000 - 0.1) < 0.01
  # Pinned: a change of the hash rule would silently move examples between splits.
  h = int.from_bytes(hashlib.sha256(b"example 0").digest()[:8], "big") % 10
  assert offline.split_of("example 0") == ("train" if h < 8 else
                                           "validation" if h == 8 else "test")


def test_rotten_tomatoes_sizes_and_balance():
  want = {"train": (10173, 5872), "validation": (1303, 744), "test": (1276, 752)}
  texts = {}
  for split, (n, fresh) in want.items():
    ex = offline.rotten_tomatoes(split)
    assert (len(ex), int(ex.labels.sum())) == (n, fresh), split
    assert ex.labels.dtype == np.int32 and set(np.unique(ex.labels)) == {0, 1}
    texts[split] = {t for (t,) in ex.texts}
    assert len(texts[split]) == n  # Duplicates were dropped.
  assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
  assert sum(map(len, texts.values())) == 12752


def test_wnut16_sizes_and_tag_set():
  tags = offline.wnut16_tags()
  assert len(tags) == 21 and tags[0] == "O" and tags[1:3] == ("B-company", "I-company")
  want = {"train": (1924, 37208), "validation": (256, 5014), "test": (214, 4247)}
  for split, (n, tokens) in want.items():
    ex = offline.wnut16(split)
    assert (len(ex), sum(map(len, ex.words))) == (n, tokens), split
    assert all(len(w) == len(t) for w, t in zip(ex.words, ex.labels))
  train = offline.wnut16("train")
  counts = np.bincount(np.concatenate(train.labels), minlength=21)
  assert counts[0] / counts.sum() > 0.9 and (counts[1::2] > 0).all()  # Every B- type occurs.


def test_shakespeare_sizes():
  want = {"train": 7985, "validation": 1008, "test": 963}
  for split, n in want.items():
    assert len(offline.shakespeare(split)) == n
  assert len(offline.SHAKESPEARE_WORKS) == 10


def test_rotten_tomatoes_end_to_end_default_config():
  c = data.default_config()
  task = data.get_task(c)
  assert (task.kind, task.num_labels, task.main_metric) == ("classification", 2, "accuracy")
  ds = data.build_dataset(c, "validation")
  assert len(ds) == 1303
  batches = list(ds.batches(64, shuffle=False, drop_remainder=False))
  assert len(batches) == 21 and sum(b["weights"].sum() for b in batches) == 1303
  assert {b["input_ids"].shape[1] for b in batches} <= {32, 64, 128}
  labels = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, offline.rotten_tomatoes("validation").labels)


def test_wnut16_and_shakespeare_build():
  c = data.default_config()
  c.task = "wnut16"
  task = data.get_task(c)
  assert task.num_labels == 21 and task.main_metric == "f1"
  ds = data.build_dataset(c, "test", task=task)
  b = next(ds.batches(8, shuffle=False))
  assert b["label_mask"].sum() > 0 and b["labels"].max() < 21
  c.task = "shakespeare"
  ds = data.build_dataset(c, "validation")
  assert data.get_task(c).kind == "mlm" and len(ds) == 281  # Rows of 128 WordPieces.
  assert (ds.lengths[:-1] == 128).all() and ds.lengths.sum() - 2 * len(ds) == 35296
  b = next(ds.batches(4, seed=0))
  assert b["label_mask"].sum(1).tolist() == [19] * 4  # round(0.15 * 126) predictions.


def test_assets_read_a_member_out_of_a_source_archive(tmp_path, monkeypatch):
  payload = b"to be, or not to be\n"
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tf:
    info = tarfile.TarInfo("toy_pkg-1.0/texts/a.txt")
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))
  (tmp_path / "wheels").mkdir()
  (tmp_path / "wheels" / "toy-pkg-1.0.tar.gz").write_bytes(buf.getvalue())
  archive_sha = hashlib.sha256(buf.getvalue()).hexdigest()
  monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
  monkeypatch.setitem(assets.ASSETS, "toy/a.txt", assets.Asset(
      "toy-pkg==1.0", "toy_pkg-1.0/texts/a.txt", hashlib.sha256(payload).hexdigest(),
      sdist=True, archive_sha256=archive_sha))
  assert assets.fetch("toy/a.txt").read_bytes() == payload
  monkeypatch.setitem(assets.ASSETS, "toy/b.txt", assets.Asset(
      "toy-pkg==1.0", "toy_pkg-1.0/texts/missing.txt", "0" * 64, sdist=True,
      archive_sha256=archive_sha))
  with pytest.raises(assets.AssetError, match="lacks toy_pkg-1.0/texts/missing.txt"):
    assets.fetch("toy/b.txt")

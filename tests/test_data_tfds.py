"""Tests for the tensorflow-datasets source through tfds.testing.mock_data (no downloads)."""

from __future__ import annotations

import tempfile

import numpy as np

import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
# The GLUE and CoNLL builders register themselves on import (the reference reads need them).
import tensorflow_datasets.text.conll2003  # noqa: F401  pylint: disable=g-import-not-at-top
import tensorflow_datasets.text.glue  # noqa: F401  pylint: disable=g-import-not-at-top

from sparse_attn import data  # pylint: disable=g-import-not-at-top
from sparse_attn.data import tfds_source  # pylint: disable=g-import-not-at-top
from sparse_attn.data.tasks import TFDS_TASKS  # pylint: disable=g-import-not-at-top

N = 9


@pytest.fixture(scope="module")
def tok():
  return data.load_tokenizer()


def tfds_config(task, **kw):
  c = data.default_config()
  c.source, c.task = "tfds", task
  c.update(kw)
  return c


def mock(**kw):
  return tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE, **kw)


@pytest.mark.parametrize("name", ["glue/sst2", "glue/mrpc", "glue/stsb", "glue/mnli",
                                  "glue/qqp", "imdb_reviews"])
def test_sequence_tasks_read_and_batch(name, tok):
  task = data.get_task(tfds_config(name))
  with mock():
    raw = list(tfds.data_source(name, split=task.splits["validation"]))
    ds = data.build_dataset(tfds_config(name), "validation", tokenizer=tok)
    ex = data.load_examples(tfds_config(name), "train")
  assert len(ds) == N and len(ex) == N
  want = [tuple(r[f] if isinstance(r[f], str) else r[f].decode() for f in task.text_fields)
          for r in raw]
  assert ex.texts == want  # Mock train and validation splits hold the same records.
  b = next(ds.batches(4, shuffle=False))
  ids = data.encode_texts(tok, want[:4], 128)
  for i in range(4):
    np.testing.assert_array_equal(b["input_ids"][i, :ids.lengths[i]], ids.row(i)["input_ids"])
  np.testing.assert_allclose(b["labels"], [np.asarray(r["label"]).item() for r in raw[:4]],
                             rtol=1e-6)
  if task.kind == "regression":
    assert b["labels"].dtype == np.float32 and task.num_labels == 1
  else:
    assert b["labels"].dtype == np.int32 and task.num_labels == len(task.label_names)
  assert (b["token_type_ids"].max() == 1) == task.is_pair


def test_glue_and_conll_tasks_match_tfds_feature_specs():
  with mock():
    for name, task in TFDS_TASKS.items():
      features = tfds.builder(name).info.features
      for field in task.text_fields:
        assert field in features, (name, field)
      label = features[task.label_field]
      if task.kind == "classification":
        assert tuple(label.names) == task.label_names, name
      elif task.kind == "token_classification":
        assert tuple(label.feature.names) == task.label_names, name


def test_conll2003_words_and_tags_align(tok):
  names = data.get_task(tfds_config("conll2003")).label_names
  records = [
      dict(tokens=np.array([b"EU", b"rejects", b"German", b"call"], dtype=object),
           ner=np.array([3, 0, 7, 0]), pos=np.zeros(4, int), chunks=np.zeros(4, int)),
      dict(tokens=np.array([b"Peter", b"Blackburn"], dtype=object), ner=np.array([1, 2]),
           pos=np.zeros(2, int), chunks=np.zeros(2, int)),
  ]
  split_seen = []

  def as_data_source(self, split, **kw):
    del self, kw
    split_seen.append(split)
    return records

  with mock(as_data_source_fn=as_data_source):
    ds = data.build_dataset(tfds_config("conll2003"), "validation", tokenizer=tok)
  assert split_seen == ["dev"]
  b = next(ds.batches(2, shuffle=False))
  toks = [tok.id_to_token(i) for i in b["input_ids"][1] if i]
  assert toks == ["[CLS]", "peter", "blackburn", "[SEP]"]
  got = [[names[t] for t in row[m == 1]] for row, m in zip(b["labels"], b["label_mask"])]
  assert got == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]


def test_conll2003_token_tag_mismatch_is_reported(tok):
  with mock():  # Random mock records have unrelated token and tag counts.
    with pytest.raises(ValueError, match="tokens but .* 'ner' tags"):
      data.build_dataset(tfds_config("conll2003"), "train", tokenizer=tok)


def test_hidden_glue_test_labels_are_refused(tok):
  with pytest.raises(ValueError, match="GLUE test labels are hidden"):
    data.build_dataset(tfds_config("glue/sst2"), "test", tokenizer=tok)
  records = [dict(idx=np.array(0), label=np.array(-1), sentence=b"hidden")]
  with mock(as_data_source_fn=lambda self, split, **kw: records):
    with pytest.raises(ValueError, match="hidden labels"):
      data.build_dataset(tfds_config("glue/sst2", splits=dict(test="test")), "test",
                         tokenizer=tok)
  assert data.get_task(tfds_config("glue/mnli")).splits == dict(
      train="train", validation="validation_matched", test="validation_mismatched")


def test_unprepared_dataset_says_how_to_get_it(tmp_path, tok):
  c = tfds_config("glue/sst2", tfds_data_dir=str(tmp_path))
  with pytest.raises(data.TfdsNotPreparedError) as e:
    data.build_dataset(c, "train", tokenizer=tok)
  msg = str(e.value)
  assert "tfds build glue/sst2 --file_format=array_record" in msg
  assert str(tmp_path) in msg and "TFDS_DATA_DIR" in msg and "tfds_download" in msg


def test_unprepared_dataset_leaves_no_tfds_temp_dirs(tmp_path, tok, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  c = tfds_config("glue/sst2", tfds_data_dir=str(tmp_path / "data"))
  with pytest.raises(data.TfdsNotPreparedError):
    data.build_dataset(c, "train", tokenizer=tok)
  assert list((tmp_path / "tmp").iterdir()) == []  # tfds's empty metadata dirs removed.


def test_records_fall_back_to_single_reads():
  class Source(list):
    def __getitems__(self, keys):  # Broken batched read, as in tfds' mock.
      raise TypeError("no")
  read = tfds_source._records  # pylint: disable=protected-access
  assert read(Source(range(10))) == list(range(10))

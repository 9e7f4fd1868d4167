"""Tests for local CSV / TSV / JSONL sources: parsing, pairs, bad rows, unknown labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparse_attn import data


def write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def files_config(**kw):
  c = data.default_config()
  c.source = "files"
  c.task = "mine"
  c.update(kw)
  return c


def test_csv_classification_with_quotes_and_derived_labels(tmp_path):
  train = write(tmp_path / "train.csv", 'text,label\n"Great, really great",pos\n'
                'bad film,neg\n"multi\nline review",pos\n')
  c = files_config(paths=dict(train=train, validation=train, test=""))
  task = data.get_task(c)
  assert task.label_names == ("neg", "pos") and task.num_labels == 2
  ex = data.load_examples(c, "train", task)
  assert ex.texts == [("Great, really great",), ("bad film",), ("multi\nline review",)]
  np.testing.assert_array_equal(ex.labels, [1, 0, 1])
  ds = data.build_dataset(c, "validation", task=task)
  b = next(ds.batches(3, shuffle=False))
  assert b["labels"].tolist() == [1, 0, 1] and b["input_ids"].shape == (3, 32)
  with pytest.raises(ValueError, match="no labelled 'test' split; set config.data.paths.test"):
    data.build_dataset(c, "test", task=task)


def test_tsv_pairs_regression_and_numeric_label_order(tmp_path):
  tsv = write(tmp_path / "d.tsv", 'a\tb\tscore\nA "quoted" man\tA man\t4.5\n'
              "x\ty\t0.25\n")
  c = files_config(kind="regression", text_columns=["a", "b"], label_column="score",
                   paths=dict(train=tsv))
  task = data.get_task(c)
  assert task.is_pair and task.num_labels == 1 and task.main_metric == "pearson"
  ex = data.load_examples(c, "train", task)
  assert ex.texts[0] == ('A "quoted" man', "A man")  # TSV: bare quotes kept as text.
  np.testing.assert_allclose(ex.labels, [4.5, 0.25])
  assert ex.labels.dtype == np.float32
  b = next(data.build_dataset(c, "train", task=task).batches(2, shuffle=False))
  assert b["labels"].dtype == np.float32 and b["token_type_ids"].max() == 1
  ints = write(tmp_path / "i.csv", "text,label\na,10\nb,2\nc,1\n")
  assert data.get_task(files_config(paths=dict(train=ints))).label_names == ("1", "2", "10")


def test_jsonl_with_declared_labels_and_int_values(tmp_path):
  rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
  path = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  c = files_config(labels=[0, 1], paths=dict(train=path, validation=path))
  ex = data.load_examples(c, "validation")
  assert ex.texts == [("good",), ("bad",)] and ex.labels.tolist() == [1, 0]


def test_jsonl_token_classification(tmp_path):
  rows = [{"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}]
  path = write(tmp_path / "ner.jsonl", json.dumps(rows[0]) + "\n")
  c = files_config(kind="token_classification", text_columns=["tokens"],
                   label_column="tags", labels=["O", "B-PER", "B-LOC"], paths=dict(train=path))
  b = next(data.build_dataset(c, "train").batches(1, shuffle=False))
  assert b["labels"][b["label_mask"] == 1].tolist() == [1, 0, 0, 2]


def test_jsonl_mlm_corpus(tmp_path):
  path = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": f"line {i} of text"}) + "\n"
                                            for i in range(40)))
  c = files_config(kind="mlm", paths=dict(train=path), max_len=16)
  task = data.get_task(c)
  assert task.kind == "mlm" and task.num_labels == 0
  ds = data.build_dataset(c, "train", task=task)
  assert (ds.lengths[:-1] == 16).all()
  b = next(ds.batches(4, shuffle=False))
  assert b["label_mask"].sum(1).tolist() == [2, 2, 2, 2]  # round(0.15 * 14).


@pytest.mark.parametrize("name,content,line,problem,kept", [
    ("empty.csv", "text,label\ngood,pos\n\nbad,neg\n", 3, "empty row", 2),
    ("fields.csv", "text,label\ngood,pos\nbad,neg,extra\n", 3, "3 fields, header has 2", 1),
    ("blank.csv", "text,label\ngood,pos\n ,neg\n", 3,
     "empty or non-text value in column 'text'", 1),
    ("nolabel.tsv", "text\tlabel\ngood\tpos\nbad\t\n", 3, "empty label", 1),
    ("json.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", \n', 2, "invalid JSON", 1),
    ("list.jsonl", '{"text": "a", "label": "pos"}\n[1, 2]\n', 2, "not a JSON object", 1),
    ("col.jsonl", '{"text": "a", "label": "pos"}\n{"txt": "b", "label": "pos"}\n', 2,
     "missing column", 1),
    ("blankline.jsonl", '{"text": "a", "label": "pos"}\n\n{"text": "b", "label": "neg"}\n',
     2, "empty line", 2),
])
def test_bad_rows_name_file_and_line(tmp_path, name, content, line, problem, kept):
  path = write(tmp_path / name, content)
  c = files_config(labels=["neg", "pos"], paths=dict(train=path))
  with pytest.raises(data.BadRowError, match=f"{name}, line {line}: {problem}"):
    data.load_examples(c, "train")
  c.on_bad_rows = "skip"
  with pytest.warns(UserWarning, match="Skipped 1 empty or malformed row"):
    ex = data.load_examples(c, "train")
  assert len(ex) == kept


def test_unknown_label_lists_valid_ones(tmp_path):
  path = write(tmp_path / "d.csv", "text,label\ngood,pos\nmeh,neutral\n")
  c = files_config(labels=["neg", "pos"], paths=dict(train=path), on_bad_rows="skip")
  with pytest.raises(ValueError, match=r"d.csv, line 3: label 'neutral' is not in the "
                                       r"declared label set \['neg', 'pos'\]"):
    data.load_examples(c, "train")


def test_non_numeric_regression_target_and_missing_file(tmp_path):
  path = write(tmp_path / "r.csv", "text,label\ngood,0.5\nbad,high\n")
  c = files_config(kind="regression", paths=dict(train=path))
  with pytest.raises(data.BadRowError, match="line 3: label 'high' is not a number"):
    data.load_examples(c, "train")
  c.paths.train = str(tmp_path / "absent.csv")
  with pytest.raises(FileNotFoundError, match="absent.csv"):
    data.load_examples(c, "train")
  c.paths.train = write(tmp_path / "r.txt", "x")
  with pytest.raises(ValueError, match="file_format"):
    data.load_examples(c, "train")


def test_multiple_files_per_split_are_concatenated(tmp_path):
  a = write(tmp_path / "a.csv", "text,label\none,x\n")
  b = write(tmp_path / "b.jsonl", '{"text": "two", "label": "y"}\n')
  c = files_config(paths=dict(train=f"{a},{b}"))
  assert data.get_task(c).label_names == ("x", "y")
  assert data.load_examples(c, "train").texts == [("one",), ("two",)]


@pytest.mark.parametrize("name,content,line,offset,kept", [
    ("latin1.csv", b"text,label\ngood,pos\ncaf\xe9,neg\nbad,neg\n", 3, 23, 2),
    ("latin1.tsv", b"text\tlabel\ngood\tpos\nna\xefve\tneg\n", 3, 22, 1),
    ("latin1.jsonl", b'{"text": "a", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n'
     b'{"text": "b", "label": "neg"}\n', 2, 43, 2),
    # A quoted field spanning lines: the bad byte's line is named, the next row still reads.
    ("quoted.csv", b'text,label\n"caf\xe9\ntwo lines",pos\nok,neg\n', 2, 15, 1),
    ("quoted2.csv", b'text,label\n"two\nlines caf\xe9",pos\nok,neg\n', 3, 25, 1),
    # Byte-order mark, CRLF and lone CR line ends: offsets count the raw bytes.
    ("crlf.csv", b"\xef\xbb\xbftext,label\r\ngood,pos\rcaf\xe9,neg\r\nok,pos\r\n", 3, 27, 2),
])
def test_non_utf8_rows_name_file_line_and_offset(tmp_path, name, content, line, offset,
                                                 kept):
  (tmp_path / name).write_bytes(content)
  c = files_config(labels=["neg", "pos"], paths=dict(train=str(tmp_path / name)))
  with pytest.raises(data.BadRowError, match=(
      rf"{name}, line {line}: not valid UTF-8 \(byte 0x.. at byte offset {offset} of the "
      r"file.*re-encode the file.*iconv.*on_bad_rows='skip'")):
    data.load_examples(c, "train")
  c.on_bad_rows = "skip"
  with pytest.warns(UserWarning, match=rf"Skipped 1 empty or malformed row.*1 of them not "
                                       rf"valid UTF-8 \(first: .*{name}, line {line}\)"):
    ex = data.load_examples(c, "train")
  assert len(ex) == kept and all("\ufffd" not in t for (t,) in ex.texts)


def test_undecodable_header_and_utf16_are_errors_even_when_skipping(tmp_path):
  (tmp_path / "h.csv").write_bytes(b"t\xe9xt,label\ngood,pos\n")
  (tmp_path / "u.csv").write_bytes("text,label\ngood,pos\n".encode("utf-16"))
  for name, problem in (("h.csv", r"h.csv, line 1: header row not valid UTF-8 \(byte 0xe9 "
                                  r"at byte offset 1"), ("u.csv", "u.csv: the file is UTF-16")):
    c = files_config(labels=["neg", "pos"], on_bad_rows="skip",
                     paths=dict(train=str(tmp_path / name)))
    with pytest.raises(data.BadRowError, match=problem + ".*iconv"):
      data.load_examples(c, "train")

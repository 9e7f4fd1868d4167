"""Local files source: CSV, TSV and JSONL with text column(s) and a label column.

CSV and TSV files start with a header row naming the columns (TSV is read without quote
handling, as GLUE-style TSVs contain bare quotes). JSONL holds one JSON object per line;
for token classification its text column is a list of words and its label column a list
of tags of the same length. Files are UTF-8 (a byte-order mark is accepted).

A bad row (blank, wrong number of fields, invalid JSON, missing or empty text or label, a
non-numeric regression target, bytes that are not valid UTF-8) stops reading with an error
naming the file and line, or, with ``on_bad_rows="skip"``, is dropped and counted in a
warning. A label outside the declared label set is always an error, listing the valid
labels; so is an undecodable CSV / TSV header, or a UTF-16 file.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from sparse_attn.data.tasks import Examples
from sparse_attn.errors import UserError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".json": "jsonl"}


class BadRowError(UserError):
  """A row of a data file is empty, malformed or not UTF-8 (a ValueError)."""


def split_paths(paths: str | Sequence[str]) -> list[str]:
  """A path, comma-separated paths or a list of paths, as a list."""
  if isinstance(paths, str):
    paths = paths.split(",")
  return [p.strip() for p in paths if p and p.strip()]


def file_format(path: str, declared: str = "") -> str:
  """The format of ``path``: ``declared`` if given, else from its extension."""
  if declared:
    if declared not in ("csv", "tsv", "jsonl"):
      raise ValueError(f"Unknown file_format {declared!r}; valid: 'csv', 'tsv', 'jsonl'.")
    return declared
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise ValueError(f"Cannot tell the format of {path!r} from its extension; set "
                     f"config.data.file_format to 'csv', 'tsv' or 'jsonl'.")
  return FORMATS[ext]


_NOT_UTF8 = "not valid UTF-8"
# After a lone "\r" (old Mac line end): lines end at "\n", "\r\n" or "\r", as in text mode
# with newline="", which the csv module needs to keep quoted newlines intact.
_AFTER_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")


class _Utf8Lines:
  """A binary file's physical lines decoded as UTF-8, noting the undecodable ones.

  An undecodable line is yielded with U+FFFD in place of its bad bytes (which are never
  ASCII, so CSV quoting and JSON structure are unchanged and the reader keeps its place)
  and recorded in ``bad``: {line number: problem with the byte and its file offset}.
  """

  def __init__(self, f, path: str):
    self.f, self.path = f, path
    self.bad: dict[int, str] = {}

  def __iter__(self) -> Iterator[str]:
    line_no, offset = 0, 0
    for raw in self.f:
      for piece in _AFTER_LONE_CR.split(raw):
        if not piece:
          continue
        line_no += 1
        if line_no == 1 and piece.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark.
          piece, offset = piece[3:], 3
        try:
          text = piece.decode("utf-8")
        except UnicodeDecodeError as e:
          self.bad[line_no] = (
              f"{_NOT_UTF8} (byte 0x{piece[e.start]:02x} at byte offset {offset + e.start}"
              f" of the file: {e.reason}); data files must be UTF-8: re-encode the file, "
              f"e.g. from Windows-1252 / Latin-1 with 'iconv -f cp1252 -t utf-8 "
              f"{os.path.basename(self.path)} > fixed{os.path.splitext(self.path)[1]}'")
          text = piece.decode("utf-8", errors="replace")
        offset += len(piece)
        yield text


def _rows(path: str, fmt: str) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
  """Yields (line number, row dict or None, problem) for every data row of a file."""
  with open(path, "rb") as f:
    if f.peek(2)[:2] in (b"\xff\xfe", b"\xfe\xff"):
      raise BadRowError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order "
                        "mark); data files must be UTF-8. Re-encode it, e.g. 'iconv -f "
                        "utf-16 -t utf-8 IN > OUT'.")
    lines = _Utf8Lines(f, path)
    if fmt == "jsonl":
      for line_no, line in enumerate(lines, 1):
        if line_no in lines.bad:  # Popped: a file of bad lines is not kept in memory.
          yield line_no, None, lines.bad.pop(line_no)
          continue
        if not line.strip():
          yield line_no, None, "empty line"
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          yield line_no, None, f"invalid JSON ({e.msg})"
          continue
        yield (line_no, row, "") if isinstance(row, dict) else (
            line_no, None, "not a JSON object")
      return
    reader = (csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv"
              else csv.reader(lines))
    header = next(reader, None)
    bad_header = [n for n in lines.bad if n <= reader.line_num]
    if bad_header:
      n = bad_header[0]
      raise BadRowError(f"{path}, line {n}: header row {lines.bad[n]}.")
    if not header:
      raise BadRowError(f"{path}: empty file; expected a header row naming the columns.")
    done = reader.line_num
    for row in reader:
      # A quoted field may span lines: the row is bad if any line it took is undecodable.
      bad = [(n, lines.bad.pop(n)) for n in range(done + 1, reader.line_num + 1)
             if n in lines.bad]
      done = reader.line_num
      if bad:
        yield bad[0][0], None, bad[0][1]
      elif not any(field.strip() for field in row):
        yield reader.line_num, None, "empty row"
      elif len(row) != len(header):
        yield reader.line_num, None, f"{len(row)} fields, header has {len(header)}"
      else:
        yield reader.line_num, dict(zip(header, row)), ""


def _label_key(value: Any) -> str:
  """A label as the string it is matched by (JSON 1 and CSV "1" are the same label)."""
  return value if isinstance(value, str) else json.dumps(value)


def _parse(row: dict[str, Any], kind: str, text_columns: Sequence[str],
           label_column: str) -> tuple[Any, Any, str]:
  """(text(s) or words, raw label or tags, problem) of one row."""
  needed = text_columns if kind == "mlm" else (*text_columns, label_column)
  missing = [c for c in needed if c not in row]
  if missing:
    return None, None, f"missing column(s) {missing}; row has {sorted(row)}"
  if kind == "token_classification":
    words, tags = row[text_columns[0]], row[label_column]
    if not (isinstance(words, list) and words and all(isinstance(w, str) for w in words)):
      return None, None, (f"column {text_columns[0]!r} must be a non-empty list of words "
                          "(token classification reads JSONL)")
    if not isinstance(tags, list) or len(tags) != len(words):
      return None, None, f"column {label_column!r} must be a list of {len(words)} tags"
    return words, [_label_key(t) for t in tags], ""
  texts = tuple(row[c] for c in text_columns)
  for c, t in zip(text_columns, texts):
    if not isinstance(t, str) or not t.strip():
      return None, None, f"empty or non-text value in column {c!r}"
  if kind == "mlm":
    return texts, None, ""
  label = row[label_column]
  if label is None or (isinstance(label, str) and not label.strip()):
    return None, None, f"empty label in column {label_column!r}"
  if kind == "regression":
    try:
      return texts, float(label), ""
    except (TypeError, ValueError):
      return None, None, f"label {label!r} is not a number"
  return texts, _label_key(label).strip(), ""


def read_examples(paths: str | Sequence[str], *, kind: str, text_columns: Sequence[str],
                  label_column: str = "label", label_names: Sequence[str] | None = None,
                  fmt: str = "", on_bad_rows: str = "error") -> Examples:
  """Reads labelled (or, for mlm, plain) examples from CSV / TSV / JSONL files.

  Args:
    paths: one path, comma-separated paths, or a list; read in order.
    kind: "classification" | "regression" | "token_classification" | "mlm".
    text_columns: one column, or two for a text pair (token classification: the words).
    label_column: the label (or tag list) column; unused for mlm.
    label_names: the label set in label-id order (classification / token tags); None
      keeps raw label strings in ``labels`` (used to discover the label set).
    fmt: "csv" | "tsv" | "jsonl"; "" = from each file's extension.
    on_bad_rows: "error" or "skip" (drop, then warn with the count).

  Returns:
    Examples: texts [(text,) or (a, b)] with labels [N] int32 ids / float32 scores, or
    words with per-example int32 tag-id arrays; mlm: texts only.

  Raises:
    FileNotFoundError, BadRowError (file and line in the message; also for bytes that
    are not UTF-8, with their offset), ValueError (unknown label, listing the valid ones).
  """
  if on_bad_rows not in ("error", "skip"):
    raise ValueError(f"on_bad_rows must be 'error' or 'skip', not {on_bad_rows!r}.")
  if not 1 <= len(text_columns) <= (1 if kind == "token_classification" else 2):
    raise ValueError(f"text_columns must name 1 column (2 for a text pair); got "
                     f"{list(text_columns)}.")
  index = None if label_names is None else {str(n): i for i, n in enumerate(label_names)}
  texts, labels, skipped, undecodable = [], [], 0, []
  files = split_paths(paths)
  if not files:
    raise ValueError("No data file given; set config.data.paths.<split>.")
  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Data file {path!r} does not exist.")
    for line_no, row, problem in _rows(path, file_format(path, fmt)):
      text = label = None
      if not problem:
        text, label, problem = _parse(row, kind, text_columns, label_column)
      if problem:
        if on_bad_rows == "error":
          raise BadRowError(f"{path}, line {line_no}: {problem}. Fix the row, or set "
                            "config.data.on_bad_rows='skip' to drop bad rows.")
        skipped += 1
        if problem.startswith(_NOT_UTF8):
          undecodable.append(f"{path}, line {line_no}")
        continue
      if index is not None and kind in ("classification", "token_classification"):
        unknown = [x for x in (label if isinstance(label, list) else [label]) if x not in index]
        if unknown:
          raise ValueError(f"{path}, line {line_no}: label {unknown[0]!r} is not in the "
                           f"declared label set {list(index)}; add it to "
                           "config.data.labels or fix the row.")
        label = [index[x] for x in label] if isinstance(label, list) else index[label]
      texts.append(text)
      labels.append(label)
  if skipped:
    utf8 = (f"; {len(undecodable)} of them not valid UTF-8 (first: {undecodable[0]}): "
            "re-encode the file(s) as UTF-8 to keep them") if undecodable else ""
    warnings.warn(f"Skipped {skipped} empty or malformed row(s) in {files}{utf8}.",
                  stacklevel=2)
  if kind == "mlm":
    return Examples(texts=texts)
  if kind == "token_classification":
    if index is None:
      return Examples(words=texts, labels=labels)
    return Examples(words=texts, labels=[np.array(t, np.int32) for t in labels])
  if index is None and kind == "classification":
    return Examples(texts=texts, labels=labels)
  return Examples(texts=texts, labels=np.array(labels, np.float32 if kind == "regression"
                                                else np.int32))


def distinct_labels(examples: Examples) -> tuple[str, ...]:
  """Sorted distinct raw labels (numerically if all are integers) of unindexed examples."""
  flat = {x for y in examples.labels for x in (y if isinstance(y, list) else [y])}
  try:
    return tuple(sorted(flat, key=int))
  except ValueError:
    return tuple(sorted(flat))

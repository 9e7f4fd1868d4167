"""tensorflow-datasets source: GLUE, IMDB and CoNLL-2003 through ``tfds.data_source``.

Datasets are read by random access from array_record files (no TensorFlow needed), so
they must be prepared once in that format, on a machine with internet (the ``tfds``
command line itself needs TensorFlow)::

  tfds build glue/sst2 --file_format=array_record --data_dir=DIR

then point ``$TFDS_DATA_DIR`` (or ``config.data.tfds_data_dir``) at DIR. With
``config.data.tfds_download = True`` tfds downloads and prepares a missing dataset itself.
"""

from __future__ import annotations

import glob
import importlib
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from sparse_attn.data.tasks import Examples, Task

# Builders outside tfds' default registry: importing the module registers them.
_BUILDER_MODULES = {
    "glue": "tensorflow_datasets.text.glue",
    "conll2003": "tensorflow_datasets.text.conll2003",
    "imdb_reviews": "tensorflow_datasets.datasets.imdb_reviews.imdb_reviews_dataset_builder",
}
_CHUNK = 4096  # Records per random-access read.


class TfdsNotPreparedError(FileNotFoundError):
  """A tfds dataset is not available locally in array_record format."""


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("source='tfds' needs tensorflow-datasets and array_record: "
                      "pip install tensorflow-datasets array_record") from e
  return tfds


def open_source(name: str, split: str, data_dir: str = "",
                download: bool = False) -> Sequence[dict[str, Any]]:
  """Opens one split of a tfds dataset for random access.

  Args:
    name: tfds name, e.g. "glue/sst2", "imdb_reviews", "conll2003".
    split: tfds split spec, e.g. "train", "validation_matched", "train[:90%]".
    data_dir: tfds data directory; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets.
    download: let tfds download and prepare the dataset if it is missing.

  Returns:
    A sequence of example dicts (numpy values).

  Raises:
    TfdsNotPreparedError: the dataset is not prepared locally; the message says how to
      prepare it.
  """
  tfds = _tfds()
  importlib.import_module(_BUILDER_MODULES[name.split("/")[0]])
  # tfds's DatasetInfo.initialize_from_bucket makes a tmp*tfds directory for metadata it
  # then fails to fetch offline, and never removes it: remove the empty ones it leaves.
  pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
  before = set(glob.glob(pattern))
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=download)
  except Exception as e:  # tfds raises several types here; all mean "not usable here".
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    raise TfdsNotPreparedError(
        f"tensorflow-datasets dataset {name!r} (split {split!r}) is not available in "
        f"{where} as array_record.\n  tfds said: {type(e).__name__}: {str(e)[:600]}\n"
        "Way out: on a machine with internet (the tfds command line needs TensorFlow) run\n"
        f"    tfds build {name} --file_format=array_record --data_dir=DIR\n"
        "  copy DIR here and set TFDS_DATA_DIR=DIR (or config.data.tfds_data_dir=DIR); or set "
        "config.data.tfds_download=True on a machine with internet. Data that works with no "
        "internet: source='offline' (rotten_tomatoes, wnut16, shakespeare).") from e
  finally:
    for d in set(glob.glob(pattern)) - before:
      try:
        os.rmdir(d)  # Only if empty.
      except OSError:
        pass


def _text(value: Any) -> str:
  """A tfds text value (str, bytes or a numpy scalar of either) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _records(source: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """All records of a data source, read in chunks (batched reads are much faster)."""
  n = len(source)
  getitems = getattr(source, "__getitems__", None)
  out = []
  for start in range(0, n, _CHUNK):
    keys = list(range(start, min(n, start + _CHUNK)))
    if getitems is not None:
      try:
        out.extend(getitems(keys))
        continue
      except TypeError:  # No working batched read (e.g. tfds.testing.mock_data's).
        getitems = None
    out.extend(source[k] for k in keys)
  return out


def read_examples(task: Task, split: str, data_dir: str = "",
                  download: bool = False) -> Examples:
  """Reads one split of a tfds task into ``Examples``.

  Args:
    task: a task of ``tasks.TFDS_TASKS``.
    split: the tfds split spec to read.
    data_dir, download: see ``open_source``.

  Returns:
    Examples (texts + labels, or words + per-word tag ids for token classification).

  Raises:
    TfdsNotPreparedError: see ``open_source``.
    ValueError: hidden labels (GLUE test splits), or a word / tag count mismatch.
  """
  records = _records(open_source(task.name, split, data_dir, download))
  where = f"{task.name} split {split!r}"
  if task.kind == "token_classification":
    words = [[_text(w) for w in r[task.text_fields[0]]] for r in records]
    tags = [np.asarray(r[task.label_field], np.int32) for r in records]
    for i, (w, t) in enumerate(zip(words, tags)):
      if len(w) != len(t):
        raise ValueError(f"{where}, example {i}: {len(w)} tokens but {len(t)} "
                         f"{task.label_field!r} tags; the prepared data is corrupt.")
    return Examples(words=words, labels=tags)
  texts = [tuple(_text(r[f]) for f in task.text_fields) for r in records]
  dtype = np.float32 if task.kind == "regression" else np.int32
  labels = np.array([np.asarray(r[task.label_field]).item() for r in records], dtype)
  hidden = task.kind == "classification" or task.name == "glue/stsb"  # STS-B scores are 0..5.
  if hidden and labels.size and labels.min() < 0:
    raise ValueError(
        f"{where} has hidden labels (-1), as GLUE test splits do. Evaluate on a labelled "
        "split instead: set config.data.splits.test (e.g. 'validation', or "
        "'validation_mismatched' for MNLI).")
  return Examples(texts=texts, labels=labels)

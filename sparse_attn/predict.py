"""Apply a finished run to new text: labels and probabilities (tags for token tasks).

  run = restore.load_run("runs/dam")
  rows = run.predict(["a gripping, funny film", "dull"])   # [{"label": ..., ...}, ...]

Texts are tokenised as the run's data were (its tokenizer and `data.max_len`), sorted by
length and padded to the run's length buckets, so each bucket compiles once; the run's
frozen structure is prepared for the fast path once per bucket (`RunStructure.prepare`),
exactly as evaluation runs it. Results come back in input order.

Output rows:
  classification        {"label": name, "label_id": i, "probabilities": {name: p}}
  regression            {"value": v}
  token classification  {"tokens": [word, ...], "tags": [tag, ...]} (input split on
                        whitespace; words past data.max_len get no tag, and
                        "truncated" counts them)
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn import example_masks
from sparse_attn import learn
from sparse_attn.data import batching, text
from sparse_attn.errors import UserError


class PredictionError(UserError, ValueError):
  """Input a run cannot predict on (the message says what is wrong and what to do)."""


def _encode(run, texts: Sequence[Any]):
  task, n = run.task, int(run.config.data.max_len)
  if task.kind == "token_classification":
    words = [t.split() if isinstance(t, str) else list(t) for t in texts]
    return text.encode_words(run.tokenizer, words, [np.zeros(len(w), np.int32)
                                                    for w in words], n), words
  width = len(task.text_fields)
  rows = []
  for i, t in enumerate(texts):
    row = (t,) if isinstance(t, str) else tuple(t)
    if len(row) != width or not all(isinstance(x, str) for x in row):
      raise PredictionError(
          f"Input {i + 1}: expected {width} text field(s) {list(task.text_fields)} "
          f"(the run's task {task.name!r}), got {row!r}.")
    rows.append(row)
  return text.encode_texts(run.tokenizer, rows, n), None


def _forward(run) -> Callable:
  structure, module = run.structure, run.module

  def forward(params, batch, masks, gates):
    masks, gates = structure.inputs(learn.Frozen(masks=masks, gates=gates), batch)
    logits, _ = module.apply({"params": params["model"]}, batch["input_ids"],
                             batch["attention_mask"], batch["token_type_ids"],
                             masks=masks, gates=gates, deterministic=True)
    return logits.astype(jnp.float32)
  return jax.jit(forward)


def predict(run, texts: Sequence[Any], *, batch_size: int = 32,
            progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
  """Predictions of a loaded run (`restore.load_run`) on new texts, in input order.

  Args:
    run: a `restore.LoadedRun`.
    texts: per input a string, or a tuple of strings for sentence-pair tasks (token
      tasks: a string split on whitespace, or a list of words).
    batch_size: inputs per forward pass (the last batch is padded).
    progress: called as progress(done, total) after each batch.

  Returns:
    One dict per input (see the module docstring).

  Raises:
    PredictionError: no texts, a masked-LM run (no task head to predict with), or an
      input that does not match the run's text fields.
  """
  task = run.task
  if task.kind == "mlm":
    raise PredictionError(f"The run in {run.workdir} is a masked-LM run ({task.name!r}): "
                          "it has no task head to predict labels with. Predict with a "
                          "fine-tuned classification, regression or tagging run.")
  if not len(texts):
    raise PredictionError("Nothing to predict: the input holds no texts.")
  if batch_size < 1:
    raise PredictionError(f"batch_size must be >= 1, got {batch_size}.")
  encoded, words = _encode(run, texts)
  per_example = example_masks.build(
      run.config.masks, [(t,) if isinstance(t, str) else tuple(t) for t in texts], encoded,
      run.tokenizer, int(run.config.data.max_len))
  lengths = encoded.lengths
  buckets = batching.bucket_lengths(run.config.data.buckets, int(run.config.data.max_len))
  order = np.argsort(lengths, kind="stable")
  forward = _forward(run)
  prepared: dict[int, Any] = {}
  out: list[dict[str, Any] | None] = [None] * len(texts)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    width = next(b for b in buckets if b >= lengths[idx].max())
    batch = _batch(encoded, idx, batch_size, width)
    if per_example is not None:   # Filler rows (past the inputs) keep their diagonal.
      rows = np.concatenate([idx, np.full(batch_size - len(idx), -1)])
      batch["example_mask"] = jnp.asarray(per_example.batch(rows, width))
    if width not in prepared:
      prepared[width] = run.structure.prepare(run.frozen.masks, width).masks
    logits = np.asarray(forward(run.params, batch, prepared[width], run.frozen.gates))
    for row, i in enumerate(idx):
      out[i] = _row(task, logits[row], encoded, int(i), words)
    if progress is not None:
      progress(min(start + batch_size, len(order)), len(order))
  return out


def _batch(encoded, idx: np.ndarray, rows: int, width: int) -> dict[str, jax.Array]:
  ids = np.zeros((rows, width), np.int32)
  types = np.zeros((rows, width), np.int32)
  valid = np.zeros((rows, width), bool)
  for r, i in enumerate(idx):
    s, e = encoded.offsets[i], encoded.offsets[i + 1]
    ids[r, :e - s] = encoded.input_ids[s:e]
    types[r, :e - s] = encoded.token_type_ids[s:e]
    valid[r, :e - s] = True
  return {"input_ids": jnp.asarray(ids), "token_type_ids": jnp.asarray(types),
          "attention_mask": jnp.asarray(valid)}


def _row(task, logits: np.ndarray, encoded, i: int, words) -> dict[str, Any]:
  if task.kind == "regression":
    return {"value": float(logits[0])}
  if task.kind == "classification":
    p = np.exp(logits - logits.max())
    p = p / p.sum()
    k = int(np.argmax(p))
    return {"label": task.label_names[k], "label_id": k,
            "probabilities": {name: float(v) for name, v in zip(task.label_names, p)}}
  s, e = encoded.offsets[i], encoded.offsets[i + 1]
  first = np.flatnonzero(encoded.tag_mask[s:e])             # First piece of each word.
  tags = [task.label_names[int(np.argmax(logits[j]))] for j in first]
  row = {"tokens": list(words[i]), "tags": tags}
  if len(tags) < len(words[i]):
    row["truncated"] = len(words[i]) - len(tags)
  return row


class Progress:
  """A progress line for `predict`: done / total, rate and ETA, on one line of stderr."""

  def __init__(self, stream):
    self.stream, self.t0 = stream, time.perf_counter()

  def __call__(self, done: int, total: int) -> None:
    dt = time.perf_counter() - self.t0
    rate = done / dt if dt > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    self.stream.write(f"\rpredicted {done}/{total}  {rate:.1f} texts/s  ETA {eta:.0f}s")
    if done == total:
      self.stream.write("\n")
    self.stream.flush()


def read_inputs(path: str, text_fields: Sequence[str]) -> list[Any]:
  """Texts from a file: CSV / TSV (a header naming the run's text columns), JSONL (one
  object per line with those keys), or anything else as one text per line.

  Args:
    path: the file (.csv, .tsv, .jsonl / .json; other suffixes: plain lines).
    text_fields: the run's text columns (`task.text_fields`).

  Returns:
    Per input a string, or a tuple for pair tasks.

  Raises:
    PredictionError: unreadable or empty file, missing columns / keys, bad JSON.
  """
  import csv
  import json
  import pathlib
  p = pathlib.Path(path)
  if not p.is_file():
    raise PredictionError(f"No input file {path}.")
  try:
    raw = p.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise PredictionError(f"{path} is not UTF-8 text ({e}).") from e
  fields = list(text_fields)
  pick = lambda row: row[fields[0]] if len(fields) == 1 else tuple(row[f] for f in fields)
  suffix = p.suffix.lower()
  if suffix in (".csv", ".tsv"):
    reader = csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
    missing = [f for f in fields if f not in (reader.fieldnames or [])]
    if missing:
      raise PredictionError(f"{path}: no column {missing} (its header: "
                            f"{reader.fieldnames}); the run reads {fields}.")
    rows = [pick(r) for r in reader]
  elif suffix in (".jsonl", ".json"):
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise PredictionError(f"{path}:{n}: not JSON ({e.msg}).") from e
      if not isinstance(obj, dict) or any(f not in obj for f in fields):
        raise PredictionError(f"{path}:{n}: expected an object with keys {fields}.")
      rows.append(pick(obj))
  else:
    if len(fields) != 1:
      raise PredictionError(f"The run's task reads {len(fields)} text fields {fields}: give "
                            "a CSV or JSONL file with those columns.")
    rows = [line for line in raw.splitlines() if line.strip()]
  if not rows:
    raise PredictionError(f"{path} holds no texts.")
  return rows

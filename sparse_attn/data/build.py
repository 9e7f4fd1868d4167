"""From the data config to a task and to tokenised, batchable datasets.

``get_task(config)`` resolves the config's source and task name into a ``Task`` (kind,
labels, metrics, splits) without tokenising anything; ``build_dataset(config, split)``
reads the split's examples from the source, tokenises them and returns a ``Dataset``.
"""

from __future__ import annotations

import dataclasses

import tokenizers

from sparse_attn.data import files, linux_docs, offline, text, tfds_source
from sparse_attn.data.batching import Dataset
from sparse_attn.data.config import with_defaults
from sparse_attn.data.tasks import (KINDS, OFFLINE_TASKS, SOURCES, SPLITS, TFDS_TASKS,
                                    Examples, Task)

_REGISTRY = {"offline": OFFLINE_TASKS, "tfds": TFDS_TASKS}


def _files_task(c) -> Task:
  """The task of a "files" source: kind and columns from the config, labels declared or
  read from the training file."""
  if c.kind not in KINDS:
    raise ValueError(f"Unknown data kind {c.kind!r}; valid kinds: {list(KINDS)}.")
  labels = ()
  if c.kind in ("classification", "token_classification"):
    labels = tuple(str(x) for x in c.labels)
    if not labels:
      if not c.paths.train:
        raise ValueError("source='files' needs the label set: set config.data.labels, or "
                         "config.data.paths.train to read it from the training file.")
      raw = files.read_examples(c.paths.train, kind=c.kind, text_columns=list(c.text_columns),
                                label_column=c.label_column, fmt=c.file_format,
                                on_bad_rows=c.on_bad_rows)
      labels = files.distinct_labels(raw)
  return Task(name=c.task or "files", source="files", kind=c.kind, label_names=labels,
              text_fields=tuple(c.text_columns), label_field=c.label_column,
              splits={s: c.paths[s] for s in SPLITS})


def get_task(config) -> Task:
  """Resolves the data config (``config.data``) into its ``Task``.

  Args:
    config: the data section (ConfigDict or dict); missing keys take their defaults.

  Returns:
    The Task: kind, num_labels, label_names, metric_names, main_metric, splits.

  Raises:
    ValueError: unknown source, task or kind (the message lists the valid names).
  """
  c = with_defaults(config)
  if c.source not in SOURCES:
    raise ValueError(f"Unknown data source {c.source!r}; valid sources: {list(SOURCES)}.")
  if c.source == "files":
    return _files_task(c)
  registry = _REGISTRY[c.source]
  if c.task not in registry:
    others = {s: sorted(r) for s, r in _REGISTRY.items() if s != c.source}
    raise ValueError(f"Unknown task {c.task!r} for source {c.source!r}; valid tasks: "
                     f"{sorted(registry)}. Other sources: {others}, or source='files' for "
                     "local CSV / TSV / JSONL files.")
  task = registry[c.task]
  if task.name == "wnut16":
    task = dataclasses.replace(task, label_names=offline.wnut16_tags())
  splits = {s: c.splits[s] or task.splits[s] for s in SPLITS}
  return dataclasses.replace(task, splits=splits)


def load_examples(config, split: str, task: Task | None = None) -> Examples:
  """Reads the raw (untokenised) examples of one split.

  Args:
    config: the data section.
    split: "train" | "validation" | "test".
    task: the resolved task (None = ``get_task(config)``).

  Returns:
    Examples, cut to max_train_examples / max_eval_examples if set.
  """
  c = with_defaults(config)
  task = task or get_task(c)
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits: {list(SPLITS)}.")
  where = task.splits[split]
  if not where:
    hint = ("set config.data.paths." if task.source == "files" else
            "GLUE test labels are hidden; evaluate on 'validation' or set config.data.splits.")
    raise ValueError(f"Task {task.name!r} has no labelled {split!r} split; {hint}{split}.")
  if task.source == "offline":
    examples = {**offline.READERS, **linux_docs.READERS}[task.name](where)
  elif task.source == "tfds":
    examples = tfds_source.read_examples(task, where, c.tfds_data_dir, c.tfds_download)
  else:
    examples = files.read_examples(
        where, kind=task.kind, text_columns=list(task.text_fields),
        label_column=task.label_field,
        label_names=task.label_names if task.kind != "regression" else None,
        fmt=c.file_format, on_bad_rows=c.on_bad_rows)
  if not len(examples):
    raise ValueError(f"Split {split!r} of task {task.name!r} ({where}) has no examples.")
  return examples.take(c.max_train_examples if split == "train" else c.max_eval_examples)


def build_dataset(config, split: str, tokenizer: tokenizers.Tokenizer | None = None,
                  task: Task | None = None) -> Dataset:
  """Reads, tokenises and wraps one split for batching.

  Args:
    config: the data section (``config.data``).
    split: "train" | "validation" | "test".
    tokenizer: a BERT fast tokenizer (None = ``load_tokenizer(config.tokenizer)``).
    task: the resolved task (None = ``get_task(config)``).

  Returns:
    A Dataset; iterate with ``Dataset.batches``.
  """
  c = with_defaults(config)
  task = task or get_task(c)
  if c.max_len < 8:
    raise ValueError(f"max_len must be >= 8 tokens, got {c.max_len}.")
  examples = load_examples(c, split, task)
  tok = tokenizer or text.load_tokenizer(c.tokenizer)
  labels = None
  if task.kind == "token_classification":
    encoded = text.encode_words(tok, examples.words, examples.labels, c.max_len)
  elif task.kind == "mlm":
    encoded = text.pack_texts(tok, [t[0] for t in examples.texts], c.max_len)
  else:
    encoded = text.encode_texts(tok, examples.texts, c.max_len)
    labels = examples.labels
  return Dataset(task, split, encoded, labels, max_len=c.max_len, buckets=list(c.buckets),
                 seed=c.seed, special=text.special_ids(tok), vocab_size=tok.get_vocab_size(),
                 mlm_probability=c.mlm_probability,
                 max_predictions_per_seq=c.max_predictions_per_seq,
                 length_grouping=c.length_grouping)

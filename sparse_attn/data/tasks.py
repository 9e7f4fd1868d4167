"""Task definitions: what each known dataset is (kind, labels, metrics, fields, splits).

A ``Task`` is what a training loop needs to build the right head and report the right
numbers; it does not hold data. ``Examples`` is one split of raw examples before
tokenisation, as every source returns them.

Kinds: "classification" (labels [N] int), "regression" (labels [N] float),
"token_classification" (one tag per word, predicted on the word's first WordPiece),
"mlm" (masked-LM on packed text; no labels in the source).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

import numpy as np

KINDS = ("classification", "regression", "token_classification", "mlm")
SOURCES = ("offline", "tfds", "files")
SPLITS = ("train", "validation", "test")

# Metrics reported per kind unless a task names its own; the first is the main metric.
# Token classification reports entity (chunk) scores only for chunk tag sets (NER, BIO
# chunking); any other tag set (e.g. part-of-speech tags) gets ``TOKEN_ACCURACY_METRICS``.
DEFAULT_METRICS = {
    "classification": ("accuracy",),
    "regression": ("pearson", "spearman"),
    "token_classification": ("f1", "precision", "recall", "accuracy"),
    "mlm": ("accuracy",),
}
TOKEN_ACCURACY_METRICS = ("accuracy",)
ENTITY_METRICS = ("f1", "precision", "recall")

# "B-PER", "I-NP", "E-LOC", "S-ORG", "L-MISC", "U-X": a chunk prefix, "-", a chunk type.
_CHUNK_TAG = re.compile(r"[BIESLU]-.+", re.DOTALL)


def is_chunk_tag(tag: str) -> bool:
  """True for "O" and "<P>-<type>" tags, P one of B I E S (IOB1/IOB2/IOE/IOBES) or L U
  (BILOU)."""
  return tag == "O" or bool(_CHUNK_TAG.fullmatch(tag))


def is_chunk_tag_set(tags: Iterable[str]) -> bool:
  """Whether a tag set names chunks, so that entity-level F1 means something.

  True if every tag is ``is_chunk_tag`` and at least one is not "O". Anything else (e.g.
  part-of-speech tags NN, VBZ, DT, or bare "B" / "I" tags without a type) is scored by
  token accuracy only.
  """
  tags = list(tags)
  return all(is_chunk_tag(t) for t in tags) and any(t != "O" for t in tags)


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: its kind, label set, metrics, and where its fields and splits are.

  Attributes:
    name: e.g. "glue/sst2", "rotten_tomatoes", or a free name for local files.
    source: "offline" | "tfds" | "files".
    kind: one of ``KINDS``.
    label_names: class or tag names in label-id order; () for regression and mlm.
    metric_names: metrics ``compute_metrics`` returns; the first is ``main_metric``.
      () = the kind's defaults; for token classification those depend on the tags:
      entity F1 first for a chunk tag set (``is_chunk_tag_set``), else token accuracy.
    text_fields: source fields holding the text (two for sentence pairs; for token
      classification the word list).
    label_field: source field holding the label (tags for token classification).
    splits: split ("train" | "validation" | "test") -> source split name; "" means the
      source has no labelled data for that split.
  """
  name: str
  source: str
  kind: str
  label_names: tuple[str, ...] = ()
  metric_names: tuple[str, ...] = ()
  text_fields: tuple[str, ...] = ("text",)
  label_field: str = "label"
  splits: Mapping[str, str] = dataclasses.field(  # Not hashed: a Task may be a static arg.
      default_factory=lambda: {s: s for s in SPLITS}, hash=False)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown task kind {self.kind!r}; valid kinds: {list(KINDS)}.")
    metrics = tuple(self.metric_names) or DEFAULT_METRICS[self.kind]
    if (self.kind == "token_classification" and self.label_names
        and not is_chunk_tag_set(self.label_names)):
      entity = [m for m in metrics if m in ENTITY_METRICS]
      if metrics == DEFAULT_METRICS[self.kind]:
        # Defaulted, maybe before the tag set was known (dataclasses.replace re-runs this
        # with the tags read from the data): chunk F1 of non-chunk tags would be noise.
        metrics = TOKEN_ACCURACY_METRICS
      elif entity:
        raise ValueError(
            f"Task {self.name!r}: metrics {entity} are entity (chunk) scores, but its tags "
            f"are not a chunk tag set (every tag 'O' or B-/I-/E-/S-/L-/U-<type>; got e.g. "
            f"{[t for t in self.label_names if not is_chunk_tag(t)][:5]}). Use "
            f"metric_names={TOKEN_ACCURACY_METRICS} or BIO / IOBES tags.")
    object.__setattr__(self, "metric_names", metrics)

  @property
  def main_metric(self) -> str:
    """The metric to select checkpoints by (first of ``metric_names``)."""
    return self.metric_names[0]

  @property
  def num_labels(self) -> int:
    """Output size of the task head: classes / tags; 1 for regression; 0 for mlm."""
    if self.kind == "regression":
      return 1
    return len(self.label_names)

  @property
  def is_pair(self) -> bool:
    """True for sentence-pair tasks (token_type_ids 0 / 1)."""
    return self.kind in ("classification", "regression") and len(self.text_fields) == 2


@dataclasses.dataclass
class Examples:
  """One split of raw examples before tokenisation.

  Attributes:
    texts: sequence tasks and mlm: per example a tuple of 1 text (or 2 for a pair).
    words: token classification: per example the list of words.
    labels: classification [N] int32 label ids; regression [N] float32; token
      classification: per example an int32 array of tag ids, one per word; mlm: None.
  """
  texts: list[tuple[str, ...]] | None = None
  words: list[list[str]] | None = None
  labels: np.ndarray | list[np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self.texts if self.texts is not None else self.words)

  def take(self, n: int) -> "Examples":
    """The first ``n`` examples (all if n <= 0)."""
    if n <= 0 or n >= len(self):
      return self
    cut = lambda x: None if x is None else x[:n]
    return Examples(cut(self.texts), cut(self.words), cut(self.labels))


# --- tensorflow-datasets tasks --------------------------------------------------------
# GLUE test labels are hidden (-1), so "test" has no default except MNLI's mismatched
# validation set. Field and label names follow tensorflow_datasets/text/glue.py.
_GLUE = {
    "cola": (("sentence",), ("unacceptable", "acceptable"), ("matthews_corrcoef", "accuracy")),
    "sst2": (("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    "stsb": (("sentence1", "sentence2"), (), ("pearson", "spearman")),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             ("accuracy",)),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": (("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
}


def _glue_task(name: str) -> Task:
  fields, labels, metrics = _GLUE[name]
  splits = {"train": "train", "validation": "validation", "test": ""}
  if name == "mnli":
    splits = {"train": "train", "validation": "validation_matched",
              "test": "validation_mismatched"}
  return Task(name=f"glue/{name}", source="tfds",
              kind="regression" if name == "stsb" else "classification",
              label_names=labels, metric_names=metrics, text_fields=fields, splits=splits)


CONLL2003_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC",
                  "I-MISC")

TFDS_TASKS: dict[str, Task] = {
    **{f"glue/{n}": _glue_task(n) for n in _GLUE},
    # IMDB ships train / test only: hold out the last 10% of train for validation.
    "imdb_reviews": Task(
        name="imdb_reviews", source="tfds", kind="classification", label_names=("neg", "pos"),
        splits={"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}),
    "conll2003": Task(
        name="conll2003", source="tfds", kind="token_classification",
        label_names=CONLL2003_TAGS, text_fields=("tokens",), label_field="ner",
        splits={"train": "train", "validation": "dev", "test": "test"}),
}

# --- offline tasks (data inside pinned PyPI packages; see offline.py) ------------------
OFFLINE_TASKS: dict[str, Task] = {
    "rotten_tomatoes": Task(name="rotten_tomatoes", source="offline", kind="classification",
                            label_names=("rotten", "fresh")),
    # Tag set read from the data when the task is resolved (see offline.wnut16_tags).
    "wnut16": Task(name="wnut16", source="offline", kind="token_classification",
                   text_fields=("tokens",), label_field="tags"),
    "shakespeare": Task(name="shakespeare", source="offline", kind="mlm"),
    # Long documents: the kernel's documentation by subsystem (data/linux_docs.py).
    "linux_docs": Task(name="linux_docs", source="offline", kind="classification",
                       label_names=("admin-guide", "arm", "core-api", "driver-api",
                                    "filesystems", "hwmon", "networking", "userspace-api",
                                    "virt")),
    "linux_docs_mlm": Task(name="linux_docs_mlm", source="offline", kind="mlm"),
}

"""Per-example masks from the text itself (Breaking BERT's syntax and lexical masks).

`masks.source = "syntax"` or `"lexical"` gives every example its own mask, built on the
host from its text when its split is loaded, stored ragged (example i: an L_i x L_i bool
mask) and gathered into each batch as `example_mask` [B, L, L]; the run structure applies
it on the configured layers (`masks.layers` / `masks.start_layer`; the other layers stay
dense). The masks follow `sparse_attn.masks.data`'s special-token rule (kwarg
special_rule): "global" (default: [CLS] and [SEP] attend and are attended everywhere) or
"self" (they attend only to themselves); every token attends to itself.

  syntax   kwargs distance=D (default 1): pieces of words at most D arcs apart in the
           spaCy dependency parse (`en_core_web_sm`, the "parse" extra) connect.
  lexical  kwargs top_r=R (default 3), threshold=None, same_surface=True,
           embeddings="minilm": each token connects to the R content tokens whose input
           embeddings (the bundled MiniLM table, fixed, so that training, evaluation and
           prediction agree) are most similar, to identical tokens, and to the pieces of
           its own word.

Single-text tasks only (one text per example).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from sparse_attn.errors import UserError
from sparse_attn.masks import data as mask_data

SOURCES = ("syntax", "lexical")
_KWARGS = {"syntax": {"distance": 1, "special_rule": "global"},
           "lexical": {"top_r": 3, "threshold": None, "same_surface": True,
                       "embeddings": "minilm", "special_rule": "global"}}


def is_example_source(source: Any) -> bool:
  """Whether `masks.source` names a per-example mask."""
  return source in SOURCES


def settings(masks_cfg: Any) -> dict[str, Any]:
  """The source's kwargs with their defaults; unknown kwargs are an error."""
  source = masks_cfg.source
  given = dict(masks_cfg.kwargs or {})
  unknown = sorted(set(given) - set(_KWARGS[source]))
  if unknown:
    raise UserError(f"masks.source={source!r}: unknown masks.kwargs {unknown}; it takes "
                    f"{sorted(_KWARGS[source])}.")
  return {**_KWARGS[source], **given}


@dataclasses.dataclass(frozen=True)
class ExampleMasks:
  """Ragged per-example masks: example i is flat[offsets[i]:offsets[i+1]] as L_i x L_i."""
  offsets: np.ndarray   # [N + 1] int64.
  flat: np.ndarray      # [sum L_i^2] bool.
  lengths: np.ndarray   # [N] int.

  def mask(self, i: int) -> np.ndarray:
    """Example i's mask, bool [L_i, L_i]."""
    n = int(self.lengths[i])
    return self.flat[self.offsets[i]:self.offsets[i + 1]].reshape(n, n)

  def batch(self, indices_B: np.ndarray, width: int) -> np.ndarray:
    """bool [B, width, width]: each example's mask top-left; padding (and filler rows,
    index -1) keep only their diagonal."""
    out = np.zeros((len(indices_B), width, width), bool)
    out[:, np.arange(width), np.arange(width)] = True
    for r, i in enumerate(indices_B):
      if i >= 0:
        n = min(int(self.lengths[i]), width)
        out[r, :n, :n] = self.mask(int(i))[:n, :n]
    return out

  def density(self, n: int | None = None) -> float:
    """Kept fraction over each example's valid pairs (n None), or of the n x n matrix
    (SparseBERT's accounting: kept valid pairs / n^2), averaged over examples."""
    kept = np.add.reduceat(self.flat, self.offsets[:-1]).astype(np.float64)
    kept[self.lengths == 0] = 0.0
    area = (self.lengths.astype(np.float64) ** 2 if n is None
            else np.full(len(self.lengths), float(n) ** 2))
    return float(np.mean(kept / np.maximum(area, 1.0)))

  def __len__(self) -> int:
    return len(self.lengths)


def build(masks_cfg: Any, texts: Sequence[tuple[str, ...]], encoded: Any, tokenizer: Any,
          max_len: int) -> ExampleMasks | None:
  """The per-example masks of `texts` (None unless masks.source is per-example).

  Args:
    masks_cfg: the `masks` config section.
    texts: per example a 1-tuple (the text).
    encoded: the same texts as the dataset encoded them (`data.text.Encoded`): the masks
      are aligned to these WordPieces, and built from a re-encoding checked against them.
    tokenizer: the run's fast tokenizer.
    max_len: the truncation length the dataset used.
  """
  if not is_example_source(masks_cfg.source):
    return None
  kw = settings(masks_cfg)
  if any(len(t) != 1 for t in texts):
    raise UserError(f"masks.source={masks_cfg.source!r} builds masks from one text per "
                    "example; this task's examples have text pairs.")
  from sparse_attn.data import text as text_lib  # pylint: disable=import-outside-toplevel
  tok = text_lib._configured(tokenizer, max_len)  # pylint: disable=protected-access
  strings = [t[0] for t in texts]
  encs = tok.encode_batch(strings)
  parses = mask_data.spacy_parse(strings) if masks_cfg.source == "syntax" else None
  table = _embeddings(kw["embeddings"]) if masks_cfg.source == "lexical" else None
  sid = text_lib.special_ids(tokenizer)
  rows = []
  for i, enc in enumerate(encs):
    ids = np.asarray(enc.ids, np.int64)
    want = encoded.input_ids[encoded.offsets[i]:encoded.offsets[i + 1]]
    if not np.array_equal(ids, want):
      raise ValueError(f"Example {i}: re-encoding its text for masks.source="
                       f"{masks_cfg.source!r} gave other WordPieces than the dataset's.")
    special = np.asarray(enc.special_tokens_mask, bool)
    if parses is not None:
      words = mask_data.word_ids_from_offsets(enc.offsets, parses[i].word_spans)
      m = mask_data.dependency_mask(parses[i].heads, words, int(kw["distance"]), special,
                                    kw["special_rule"])
    else:
      words = mask_data.word_ids_from_offsets(enc.offsets, _word_spans(strings[i]))
      m = mask_data.lexical_similarity_mask(
          ids, table, threshold=kw["threshold"], top_r=kw["top_r"],
          same_surface=bool(kw["same_surface"]), word_ids=words,
          special_ids=(sid.cls, sid.sep), pad_id=None, special_rule=kw["special_rule"])
    rows.append(np.asarray(m, bool).ravel())
  lengths = np.asarray([len(e.ids) for e in encs], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths ** 2)]).astype(np.int64)
  flat = np.concatenate(rows) if rows else np.zeros(0, bool)
  return ExampleMasks(offsets=offsets, flat=flat, lengths=lengths)


def attach(config: Any, datasets: dict[str, Any], tokenizer: Any) -> None:
  """Builds and attaches the per-example masks of each split's dataset (a no-op unless
  `config.masks.source` is per-example): its batches then carry `example_mask`.

  Args:
    config: the experiment config (`masks`, `data`).
    datasets: {split: data.Dataset} built from `config.data`.
    tokenizer: the tokenizer they were encoded with.
  """
  if not is_example_source(config.masks.source):
    return
  from sparse_attn import data as data_lib  # pylint: disable=import-outside-toplevel
  c = data_lib.with_defaults(config.data)
  for split, ds in datasets.items():
    texts = data_lib.load_examples(c, split, ds.task).texts
    ds.example_masks = build(config.masks, texts, ds.encoded, tokenizer, int(c.max_len))


def datasets(config: Any, splits: Sequence[str], tokenizer: Any) -> dict[str, Any]:
  """{split: data.Dataset} built from `config.data`, each with its per-example masks
  attached when `config.masks.source` asks for them (`attach`)."""
  from sparse_attn import data as data_lib  # pylint: disable=import-outside-toplevel
  out = {s: data_lib.build_dataset(config.data, s, tokenizer=tokenizer)
         for s in dict.fromkeys(splits)}
  attach(config, out, tokenizer)
  return out


def _word_spans(s: str) -> np.ndarray:
  """Character spans of the whitespace-separated words of `s`."""
  spans, start = [], None
  for j, ch in enumerate(s + " "):
    if ch.isspace():
      if start is not None:
        spans.append((start, j))
        start = None
    elif start is None:
      start = j
  return np.asarray(spans, np.int64).reshape(-1, 2)


@functools.lru_cache(maxsize=2)
def _embeddings(name: str) -> np.ndarray:
  if name != "minilm":
    raise UserError(f"masks.kwargs.embeddings={name!r}: the lexical mask uses the bundled "
                    "MiniLM input embeddings ('minilm').")
  from sparse_attn import pretrained  # pylint: disable=import-outside-toplevel
  _, params = pretrained.load_minilm()
  # float64 once: lexical_similarity_mask would otherwise convert the table per example.
  return np.asarray(params["embeddings"]["word_embeddings"]["embedding"], np.float64)


def layers(masks_cfg: Any, num_layers: int) -> tuple[int, ...]:
  """The layers a per-example mask applies to (`masks.layers`, else start_layer..)."""
  if masks_cfg.get("layers") is not None:
    return tuple(sorted(int(i) for i in masks_cfg.layers))
  return tuple(range(int(masks_cfg.get("start_layer", 0) or 0), num_layers))

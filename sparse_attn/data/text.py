"""Tokenisation with a fast (Rust) BERT WordPiece tokenizer into ragged token arrays.

Examples are stored ragged, not padded: example i is ``x[offsets[i]:offsets[i + 1]]`` of
flat per-token arrays (T = total tokens), so a large corpus costs its real length in
memory and each batch is padded only to its own bucket (see ``batching.py``).

Token classification labels the first WordPiece of every word (alignment through the
fast tokenizer's ``word_ids``); the other pieces of the word carry tag 0 with mask 0. A
word the tokenizer turns into no piece at all (e.g. only control characters) is read as
[UNK], so every word that fits in ``max_len`` is predicted and scored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import tokenizers

from sparse_attn import assets

_CHUNK = 8192  # Texts per encode_batch call: bounds the memory of Encoding objects.


def load_tokenizer(path: str | os.PathLike | None = None) -> tokenizers.Tokenizer:
  """Loads a fast tokenizer with padding and truncation switched off.

  Args:
    path: a ``tokenizer.json``; None or "" = the MiniLM (BERT uncased, 30,522 pieces)
      tokenizer from the offline asset cache.

  Returns:
    A ``tokenizers.Tokenizer`` with [CLS] / [SEP] / [PAD] / [MASK] special tokens.
  """
  path = path or assets.fetch("minilm/tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Tokenizer file {str(path)!r} does not exist; set "
                            "config.data.tokenizer to a tokenizer.json, or '' for MiniLM's.")
  tok = tokenizers.Tokenizer.from_file(str(path))
  tok.no_padding()
  tok.no_truncation()
  special_ids(tok)  # Fails early, with a clear message, on a non-BERT tokenizer.
  return tok


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the BERT special tokens, and of every special token (never masked)."""
  pad: int
  cls: int
  sep: int
  mask: int
  unk: int
  all: tuple[int, ...]


def special_ids(tok: tokenizers.Tokenizer) -> SpecialIds:
  """The special-token ids of a BERT-style tokenizer."""
  ids = {t: tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")}
  missing = [t for t, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"Tokenizer lacks the BERT special token(s) {missing}; use a BERT "
                     "WordPiece tokenizer.json (e.g. the default MiniLM one).")
  added = tok.get_added_tokens_decoder()  # id -> AddedToken
  every = sorted({*ids.values(), *(i for i, t in added.items() if t.special)})
  return SpecialIds(ids["[PAD]"], ids["[CLS]"], ids["[SEP]"], ids["[MASK]"], ids["[UNK]"],
                    tuple(every))


@dataclasses.dataclass
class Encoded:
  """Tokenised examples, ragged: example i is tokens ``offsets[i]:offsets[i+1]``.

  Attributes:
    offsets: [N+1] int64 start of each example in the flat arrays.
    input_ids: [T] int32 WordPiece ids, [CLS] ... [SEP] (... [SEP]) included.
    token_type_ids: [T] int32 segment ids (0, or 1 for the second text of a pair).
    tag_ids: [T] int32 tag of the word at its first piece, else 0 (token tasks only).
    tag_mask: [T] int32 1 at the first piece of each word, else 0 (token tasks only).
  """
  offsets: np.ndarray
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  tag_ids: np.ndarray | None = None
  tag_mask: np.ndarray | None = None

  @property
  def lengths(self) -> np.ndarray:
    """[N] tokens per example."""
    return np.diff(self.offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def row(self, i: int) -> dict[str, np.ndarray]:
    """The arrays of example i (for inspection and tests)."""
    s = slice(self.offsets[i], self.offsets[i + 1])
    names = ("input_ids", "token_type_ids", "tag_ids", "tag_mask")
    return {n: getattr(self, n)[s] for n in names if getattr(self, n) is not None}


def _configured(tok: tokenizers.Tokenizer, max_len: int | None) -> tokenizers.Tokenizer:
  """A copy of ``tok`` truncating to ``max_len`` (longest first); the caller's is untouched."""
  out = tokenizers.Tokenizer.from_str(tok.to_str())
  out.no_padding()
  if max_len:
    out.enable_truncation(max_len, strategy="longest_first")
  else:
    out.no_truncation()
  return out


def _flat(rows: list[list[int]] | list[np.ndarray]) -> np.ndarray:
  return (np.concatenate([np.asarray(r, np.int32) for r in rows]) if rows
          else np.zeros([0], np.int32))


def _offsets(rows: Sequence[Sequence[int]]) -> np.ndarray:
  return np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)


def encode_texts(tok: tokenizers.Tokenizer, texts: Sequence[tuple[str, ...]],
                 max_len: int) -> Encoded:
  """Encodes single texts ([CLS] a [SEP]) or pairs ([CLS] a [SEP] b [SEP]).

  Args:
    tok: a BERT tokenizer (see ``load_tokenizer``).
    texts: per example a 1-tuple, or a 2-tuple for a pair (token_type_ids 0 then 1).
    max_len: truncate to this many tokens, longest text of a pair first.

  Returns:
    Encoded with input_ids and token_type_ids.
  """
  t = _configured(tok, max_len)
  ids, types = [], []
  for start in range(0, len(texts), _CHUNK):
    chunk = [x[0] if len(x) == 1 else (x[0], x[1]) for x in texts[start:start + _CHUNK]]
    for e in t.encode_batch(chunk):
      ids.append(e.ids)
      types.append(e.type_ids)
  return Encoded(_offsets(ids), _flat(ids), _flat(types))


def encode_words(tok: tokenizers.Tokenizer, words: Sequence[Sequence[str]],
                 tags: Sequence[np.ndarray], max_len: int) -> Encoded:
  """Encodes pre-split words and puts each word's tag on its first WordPiece.

  Args:
    tok: a BERT tokenizer.
    words: per example its words.
    tags: per example [W] int tag ids, one per word.
    max_len: truncate to this many tokens (words past the end are not predicted).

  Returns:
    Encoded with input_ids, token_type_ids (all 0), tag_ids and tag_mask.
  """
  unk = tok.id_to_token(special_ids(tok).unk)
  vocab = sorted({w for ws in words for w in ws})
  plain = _configured(tok, None)
  pieces = plain.encode_batch(vocab, add_special_tokens=False) if vocab else []
  empty = {w for w, e in zip(vocab, pieces) if not e.ids}
  t = _configured(tok, max_len)
  ids, tag_ids, tag_mask = [], [], []
  for start in range(0, len(words), _CHUNK):
    chunk = [[unk if w in empty else w for w in ws] for ws in words[start:start + _CHUNK]]
    for k, e in enumerate(t.encode_batch(chunk, is_pretokenized=True)):
      wid = np.array([-1 if w is None else w for w in e.word_ids], np.int64)
      first = (wid >= 0) & (wid != np.concatenate([[-1], wid[:-1]]))
      row_tags = np.zeros(len(wid), np.int32)
      row_tags[first] = np.asarray(tags[start + k], np.int32)[wid[first]]
      ids.append(e.ids)
      tag_ids.append(row_tags)
      tag_mask.append(first.astype(np.int32))
  flat_ids = _flat(ids)
  return Encoded(_offsets(ids), flat_ids, np.zeros_like(flat_ids), _flat(tag_ids),
                 _flat(tag_mask))


def pack_texts(tok: tokenizers.Tokenizer, texts: Sequence[str], max_len: int) -> Encoded:
  """Packs texts into full rows of [CLS] pieces... [SEP] for masked-LM.

  The texts' pieces are concatenated in order and cut every ``max_len - 2`` pieces, so a
  text may continue on the next row and no row wastes padding; only the last row may be
  short.

  Args:
    tok: a BERT tokenizer.
    texts: the texts (e.g. paragraphs), in reading order.
    max_len: row length including [CLS] and [SEP].

  Returns:
    Encoded with input_ids and token_type_ids (all 0).
  """
  sp = special_ids(tok)
  budget = max_len - 2
  t = _configured(tok, None)
  stream = [np.zeros([0], np.int32)]
  for start in range(0, len(texts), _CHUNK):
    stream += [np.asarray(e.ids, np.int32) for e in
               t.encode_batch(list(texts[start:start + _CHUNK]), add_special_tokens=False)]
  pieces = np.concatenate(stream)
  rows = [[sp.cls, *pieces[i:i + budget].tolist(), sp.sep]
          for i in range(0, len(pieces), budget)]
  flat_ids = _flat(rows)
  return Encoded(_offsets(rows), flat_ids, np.zeros_like(flat_ids))

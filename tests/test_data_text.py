"""Tests for sparse_attn.data.text: tokenisation, pairs, truncation, word alignment, packing."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_attn import data
from sparse_attn.data import text


@pytest.fixture(scope="module")
def tok():
  return data.load_tokenizer()


def ids(tok, *tokens):
  return [tok.token_to_id(t) for t in tokens]


def test_load_tokenizer_switches_off_padding_and_truncation(tok):
  # The shipped tokenizer.json pads and truncates to 128; ours must not.
  assert len(tok.encode("hello").ids) == 3
  assert len(tok.encode("word " * 300).ids) == 302
  sp = data.special_ids(tok)
  assert (sp.pad, sp.cls, sp.sep, sp.mask, sp.unk) == (0, 101, 102, 103, 100)
  assert set(sp.all) == {0, 100, 101, 102, 103}


def test_load_tokenizer_missing_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    data.load_tokenizer(tmp_path / "nope.json")


def test_single_and_pair_encoding(tok):
  enc = data.encode_texts(tok, [("Hello world",), ("Hello", "unaffable world")], max_len=16)
  assert len(enc) == 2
  r0, r1 = enc.row(0), enc.row(1)
  assert r0["input_ids"].tolist() == ids(tok, "[CLS]", "hello", "world", "[SEP]")
  assert r0["token_type_ids"].tolist() == [0, 0, 0, 0]
  assert r1["input_ids"].tolist() == ids(tok, "[CLS]", "hello", "[SEP]", "una", "##ffa",
                                         "##ble", "world", "[SEP]")
  assert r1["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
  assert enc.lengths.tolist() == [4, 8]
  assert enc.input_ids.dtype == np.int32 and enc.offsets.tolist() == [0, 4, 12]


def test_truncation_longest_first_keeps_both_segments(tok):
  a, b = "one two three four five six seven eight", "nine ten"
  r = data.encode_texts(tok, [(a, b)], max_len=8).row(0)
  toks = [tok.id_to_token(i) for i in r["input_ids"]]
  # 8 = [CLS] + 3 of a + [SEP] + 2 of b + [SEP]: the longer text lost its tail first.
  assert toks == ["[CLS]", "one", "two", "three", "[SEP]", "nine", "ten", "[SEP]"]
  single = data.encode_texts(tok, [(a,)], max_len=8).row(0)
  assert len(single["input_ids"]) == 8 and single["input_ids"][-1] == tok.token_to_id("[SEP]")


def test_encode_words_labels_first_piece_only(tok):
  words = [["New", "York", "unaffable", "!"]]
  tags = [np.array([1, 2, 0, 0])]
  r = data.encode_words(tok, words, tags, max_len=32).row(0)
  toks = [tok.id_to_token(i) for i in r["input_ids"]]
  assert toks == ["[CLS]", "new", "york", "una", "##ffa", "##ble", "!", "[SEP]"]
  assert r["tag_mask"].tolist() == [0, 1, 1, 1, 0, 0, 1, 0]
  assert r["tag_ids"].tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
  assert r["token_type_ids"].tolist() == [0] * 8


def test_encode_words_empty_word_becomes_unk_and_keeps_alignment(tok):
  # "\x07" and a zero-width space produce no WordPiece; they must still get a position.
  words = [["Paris", "\x07", "is", "\u200b", "nice"]]
  tags = [np.array([5, 3, 0, 4, 0])]
  r = data.encode_words(tok, words, tags, max_len=32).row(0)
  toks = [tok.id_to_token(i) for i in r["input_ids"]]
  assert toks == ["[CLS]", "paris", "[UNK]", "is", "[UNK]", "nice", "[SEP]"]
  assert r["tag_ids"][r["tag_mask"] == 1].tolist() == [5, 3, 0, 4, 0]


def test_encode_words_reference_loop(tok):
  """Alignment against a plain loop over word-by-word tokenisation."""
  words = [["Obama", "visited", "Bärlin", "yesterday", "@user12", "#tbt"], ["x"] * 40]
  tags = [np.arange(6) % 3, np.ones(40, int)]
  enc = data.encode_words(tok, words, tags, max_len=12)
  for i, (ws, ts) in enumerate(zip(words, tags)):
    want_ids, want_tags, want_mask = [101], [0], [0]
    for w, t in zip(ws, ts):
      pieces = tok.encode(w, add_special_tokens=False).ids
      for j, p in enumerate(pieces):
        want_ids.append(p)
        want_tags.append(int(t) if j == 0 else 0)
        want_mask.append(int(j == 0))
    want_ids, want_tags, want_mask = want_ids[:11] + [102], want_tags[:11] + [0], \
        want_mask[:11] + [0]
    r = enc.row(i)
    assert r["input_ids"].tolist() == want_ids
    assert r["tag_ids"].tolist() == want_tags
    assert r["tag_mask"].tolist() == want_mask


def test_pack_texts_fills_rows_and_keeps_every_piece(tok):
  texts = ["a b c", "d e", "f g h i j k l m n o p", "q"]
  enc = data.pack_texts(tok, texts, max_len=8)  # 6 pieces per row.
  rows = [[tok.id_to_token(i) for i in enc.row(k)["input_ids"]] for k in range(len(enc))]
  assert rows == [["[CLS]", "a", "b", "c", "d", "e", "f", "[SEP]"],
                  ["[CLS]", "g", "h", "i", "j", "k", "l", "[SEP]"],
                  ["[CLS]", "m", "n", "o", "p", "q", "[SEP]"]]
  assert enc.token_type_ids.tolist() == [0] * 23


def test_configured_copy_leaves_caller_tokenizer_untouched(tok):
  data.encode_texts(tok, [("a b c d e f g h i j",)], max_len=8)
  assert tok.truncation is None and tok.padding is None
  assert text.special_ids(tok).mask == 103

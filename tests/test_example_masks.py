"""Per-example (syntax, lexical) masks through data, training, evaluation and prediction."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

import _tiny
from sparse_attn import data as data_lib
from sparse_attn import example_masks, fixed_masks, restore, train
from sparse_attn.errors import UserError
from sparse_attn.masks import data as mask_data

TEXTS = [("The cat sat on the mat .",), ("A truly dreadful , boring film .",),
         ("Unbelievably good",)]


def _cfg(source, **kw):
  return ml_collections.ConfigDict(dict(source=source, kwargs=kw, layers=None,
                                        start_layer=0))


def _encoded(tok, max_len=32):
  return data_lib.encode_texts(tok, TEXTS, max_len)


def test_syntax_masks_equal_the_batched_builder():
  tok = data_lib.load_tokenizer()
  ex = example_masks.build(_cfg("syntax", distance=1), TEXTS, _encoded(tok), tok, 32)
  ref = mask_data.syntax_masks([t[0] for t in TEXTS], tok, max_len=32, distance=1)
  for i in range(len(TEXTS)):
    n = int(ex.lengths[i])
    np.testing.assert_array_equal(ex.mask(i), ref[i][:n, :n])
  assert ex.density() == pytest.approx(np.mean([ex.mask(i).mean() for i in range(3)]))
  assert ex.density(32) == pytest.approx(np.mean([ex.mask(i).sum() / 32**2
                                                  for i in range(3)]))


def test_batch_pads_with_the_diagonal_and_filler_rows():
  tok = data_lib.load_tokenizer()
  ex = example_masks.build(_cfg("lexical", top_r=1), TEXTS, _encoded(tok), tok, 32)
  b = ex.batch(np.array([2, 0, -1]), 12)
  n2 = int(ex.lengths[2])
  np.testing.assert_array_equal(b[0, :n2, :n2], ex.mask(2))
  assert b[0, n2:, :].sum() == 12 - n2 and np.all(np.diag(b[0]))   # Padding: diagonal.
  np.testing.assert_array_equal(b[2], np.eye(12, dtype=bool))       # Filler row.
  m = ex.mask(0)
  assert np.all(m[0]) and np.all(m[:, 0]) and np.all(np.diag(m))    # [CLS] global, self.


def test_special_rule_self_keeps_cls_and_sep_to_themselves():
  tok = data_lib.load_tokenizer()
  ex = example_masks.build(_cfg("syntax", special_rule="self"), TEXTS, _encoded(tok), tok, 32)
  m = ex.mask(0)
  n = m.shape[0]
  assert m[0].sum() == 1 and m[:, 0].sum() == 1 and m[n - 1].sum() == 1   # [CLS], [SEP].
  assert m[1:n - 1, 1:n - 1].sum() > n - 2                                # Syntax links.


def test_unknown_kwargs_and_pairs_are_refused():
  tok = data_lib.load_tokenizer()
  with pytest.raises(UserError, match="top_k"):
    example_masks.build(_cfg("lexical", top_k=3), TEXTS, _encoded(tok), tok, 32)
  pairs = [("a b", "c d")]
  with pytest.raises(UserError, match="pairs"):
    example_masks.build(_cfg("syntax"), pairs, data_lib.encode_texts(tok, pairs, 32), tok, 32)


@pytest.fixture(scope="module")
def syntax_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("syntax")
  c = _tiny.tiny_config({"train.num_steps": 2, "masks.source": "syntax",
                         "masks.kwargs": {"distance": 1}, "masks.start_layer": 1})
  return c, d, train.train_and_evaluate(c, str(d))


def test_reported_densities_are_those_of_the_example_masks(syntax_run):
  c, _, results = syntax_run
  v = results["validation"]
  tok = data_lib.load_tokenizer(c.data.tokenizer)
  ds = data_lib.build_dataset(c.data, "validation", tokenizer=tok)
  example_masks.attach(c, {"validation": ds}, tok)
  assert v["density/layer_0"] == 1.0
  assert v["density/layer_1"] == pytest.approx(ds.example_masks.density(), rel=1e-5)
  assert v["density_nxn/layer_1"] == pytest.approx(ds.example_masks.density(32), rel=1e-5)
  assert 0.05 < v["density/layer_1"] < 0.9


def test_a_per_example_run_predicts_and_its_masks_are_not_reused_as_positions(syntax_run):
  c, d, results = syntax_run
  run = restore.load_run(d)
  assert run.frozen.metadata["example_masks"] == {"source": "syntax", "layers": [1]}
  out = run.predict(["What a film .", "Dull and long , far too long ."])
  assert len(out) == 2 and all("label" in o for o in out)
  with pytest.raises(fixed_masks.ExportedMasksError, match="masks.source='syntax'"):
    fixed_masks.build(_cfg(str(d)), run.bert_config, 32)

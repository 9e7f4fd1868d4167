"""Tests for sparse_attn.data.metrics against hand-computed values and textbook formulas."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

from sparse_attn import data
from sparse_attn.data import metrics as metrics_lib
from sparse_attn.data.tasks import TFDS_TASKS, Task


def test_accuracy_respects_weights():
  p, y = np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])
  assert data.accuracy(p, y) == pytest.approx(0.5)
  assert data.accuracy(p, y, np.array([1, 1, 1, 0])) == pytest.approx(2 / 3)
  assert data.accuracy(p, y, np.zeros(4)) == 0.0


def test_f1_binary_hand_computed():
  p, y = np.array([1, 1, 0, 1, 0]), np.array([1, 0, 1, 1, 0])
  assert data.f1_binary(p, y) == pytest.approx(2 / 3)  # TP 2, FP 1, FN 1.
  assert data.f1_binary(p, y, np.array([1, 0, 1, 1, 1])) == pytest.approx(0.8)  # FP dropped.
  assert data.f1_binary(np.zeros(3), np.zeros(3)) == 0.0


def test_matthews_binary_formula_and_multiclass_covariance_form():
  p, y = np.array([1, 1, 0, 1, 0]), np.array([1, 0, 1, 1, 0])
  tp, tn, fp, fn = 2, 1, 1, 1
  want = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert data.matthews_corrcoef(p, y) == pytest.approx(want)
  # Multi-class: Gorodkin's R_K = cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) on one-hot rows.
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 200)
  p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))
  x1, y1 = np.eye(3)[p], np.eye(3)[y]
  cov = lambda a, b: ((a - a.mean(0)) * (b - b.mean(0))).sum()
  assert data.matthews_corrcoef(p, y) == pytest.approx(
      cov(x1, y1) / np.sqrt(cov(x1, x1) * cov(y1, y1)))
  assert data.matthews_corrcoef(np.ones(5), np.array([0, 1, 0, 1, 1])) == 0.0


def test_pearson_spearman_against_textbook_formulas():
  rng = np.random.default_rng(1)
  x = rng.normal(size=300)
  y = x + rng.normal(size=300)
  assert data.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
  # No ties: Spearman = 1 - 6 sum d^2 / (n (n^2 - 1)).
  rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
  n = len(x)
  assert data.spearman(x, y) == pytest.approx(1 - 6 * ((rx - ry) ** 2).sum() / (n * (n * n - 1)))
  # Ties take their average rank.
  np.testing.assert_array_equal(data.rankdata([3.0, 1.0, 2.0, 2.0, 5.0]), [4, 1, 2.5, 2.5, 5])
  assert data.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
      np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
  assert data.pearson(np.ones(5), np.arange(5)) == 0.0  # Undefined -> 0, not NaN.


def test_weight_zero_examples_are_ignored_by_every_metric():
  rng = np.random.default_rng(2)
  p, y = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
  s, t = rng.normal(size=50), rng.normal(size=50)
  w = (rng.random(50) < 0.7).astype(float)
  k = w > 0
  for f, a, b in [(data.accuracy, p, y), (data.f1_binary, p, y),
                  (data.matthews_corrcoef, p, y), (data.pearson, s, t), (data.spearman, s, t)]:
    assert f(a, b, w) == pytest.approx(f(a[k], b[k])), f.__name__


def test_entity_scores_hand_computed():
  true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
  # Entities: true {PER, LOC, ORG}, predicted {PER, ORG@3, ORG}; 2 correct.
  got = data.entity_scores(true, pred)
  assert got == pytest.approx(dict(precision=2 / 3, recall=2 / 3, f1=2 / 3))
  partial = data.entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])  # Boundary wrong.
  assert partial["f1"] == 0.0


def test_compute_metrics_glue_tasks_with_logits_and_batches():
  mrpc, cola, stsb = TFDS_TASKS["glue/mrpc"], TFDS_TASKS["glue/cola"], TFDS_TASKS["glue/stsb"]
  logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.0, 1.0], [5.0, 0.0]])
  y, w = np.array([1, 0, 0, 1, 1]), np.array([1, 1, 1, 1, 0.0])
  got = data.compute_metrics(mrpc, [logits[:3], logits[3:]], [y[:3], y[3:]], [w[:3], w[3:]])
  assert got == pytest.approx(dict(f1=0.8, accuracy=0.75))  # Last row is filler.
  assert mrpc.main_metric == "f1" and cola.main_metric == "matthews_corrcoef"
  assert list(data.compute_metrics(cola, logits, y, w)) == ["matthews_corrcoef", "accuracy"]
  pred = np.array([[1.0], [2.0], [3.0], [4.5]])
  got = data.compute_metrics(stsb, pred, np.array([1.5, 2.0, 3.5, 4.0]), np.ones(4))
  assert got["pearson"] == pytest.approx(np.corrcoef(pred[:, 0], [1.5, 2, 3.5, 4])[0, 1])
  assert got["spearman"] == pytest.approx(1.0)


def test_compute_metrics_token_classification_batches_of_different_lengths():
  task = Task(name="ner", source="files", kind="token_classification",
              label_names=("O", "B-PER", "I-PER", "B-LOC", "I-LOC"))
  # Batch 1 (L=5): one sentence; batch 2 (L=3): one sentence and a filler row.
  y1, p1 = np.array([[0, 1, 2, 0, 0]]), np.array([[0, 1, 2, 0, 3]])
  m1 = np.array([[0, 1, 1, 1, 0]])  # [CLS] and the last (sub-word) position unscored.
  y2, p2 = np.array([[0, 3, 0], [0, 1, 0]]), np.array([[0, 3, 0], [0, 0, 0]])
  m2 = np.array([[0, 1, 0], [0, 0, 0]])  # Filler row: nothing scored.
  got = data.compute_metrics(task, [p1, p2], [y1, y2], [m1, m2])
  assert got == pytest.approx(dict(f1=1.0, precision=1.0, recall=1.0, accuracy=1.0))
  p1_bad = np.array([[0, 1, 0, 0, 3]])  # I-PER lost: the PER span is now wrong.
  got = data.compute_metrics(task, [p1_bad, p2], [y1, y2], [m1, m2])
  assert got["accuracy"] == pytest.approx(3 / 4)
  assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="label_mask"):
    data.compute_metrics(task, p1, y1, np.ones(1))


def test_compute_metrics_mlm_accuracy_over_predicted_positions():
  task = Task(name="lm", source="offline", kind="mlm")
  logits = np.zeros([1, 4, 10])
  logits[0, np.arange(4), [5, 6, 7, 8]] = 1.0
  got = data.compute_metrics(task, logits, np.array([[5, 0, 7, 9]]), np.array([[1, 0, 1, 1]]))
  assert got == pytest.approx(dict(accuracy=2 / 3))


POS_TAGS = ("DT", "NN", "VBZ", "JJ", "O")  # "O" alone does not make a chunk tag set.


@pytest.mark.parametrize("tags,chunked", [
    (("O", "B-PER", "I-PER"), True),                    # IOB2 (CoNLL-2003, WNUT).
    (("I-PER", "O", "B-PER"), True),                    # IOB1.
    (("O", "B-LOC", "I-LOC", "E-LOC", "S-LOC"), True),  # IOBES.
    (("O", "B-X", "I-X", "L-X", "U-X"), True),          # BILOU.
    (("B-NP", "I-NP", "B-VP", "O"), True),              # CoNLL-2000 chunking.
    (POS_TAGS, False),
    (("O",), False),
    (("B", "I", "O"), False),                           # No chunk type.
    (("B-PER", "NN"), False),                           # Mixed.
])
def test_chunk_tag_set_rule(tags, chunked):
  assert data.is_chunk_tag_set(tags) == chunked
  task = Task(name="t", source="files", kind="token_classification", label_names=tags)
  assert task.main_metric == ("f1" if chunked else "accuracy")
  assert task.metric_names == (("f1", "precision", "recall", "accuracy") if chunked
                               else ("accuracy",))


def test_tag_set_known_later_still_decides_the_metrics():
  # As get_task does for wnut16: the Task is made first, its tags read from the data later.
  pending = Task(name="t", source="files", kind="token_classification")
  assert dataclasses.replace(pending, label_names=POS_TAGS).metric_names == ("accuracy",)
  assert dataclasses.replace(pending, label_names=("O", "B-X")).main_metric == "f1"
  with pytest.raises(ValueError, match=r"\['f1'\] are entity.*'DT'.*metric_names"):
    Task(name="t", source="files", kind="token_classification", label_names=POS_TAGS,
         metric_names=("f1", "accuracy"))


def _score(task, monkeypatch=None):
  """compute_metrics on two sentences (one token wrong), recording every warning."""
  y = np.array([[0, 1, 2, 0], [1, 3, 0, 0]])
  p = np.array([[0, 1, 2, 0], [1, 2, 0, 0]])
  w = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = data.compute_metrics(task, p, y, w)
  return got, [str(c.message) for c in caught]


def test_pos_tags_score_token_accuracy_without_seqeval(tmp_path, monkeypatch):
  rows = [{"tokens": ["the", "dog", "runs"], "tags": ["DT", "NN", "VBZ"]},
          {"tokens": ["a", "big", "cat"], "tags": ["DT", "JJ", "NN"]}]
  path = tmp_path / "pos.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = data.default_config()
  c.update(source="files", kind="token_classification", text_columns=["tokens"],
           label_column="tags", paths=dict(train=str(path)))
  task = data.get_task(c)
  assert task.label_names == ("DT", "JJ", "NN", "VBZ") and task.main_metric == "accuracy"

  def no_entity_scores(*args):
    raise AssertionError("seqeval must not score part-of-speech tags")
  monkeypatch.setattr(metrics_lib, "entity_scores", no_entity_scores)
  got, caught = _score(task)
  assert got == pytest.approx({"accuracy": 6 / 7}) and caught == []
  with pytest.raises(ValueError, match=r"need chunk tags.*\['DT'"):
    data.entity_scores([["DT", "NN"]], [["DT", "NN"]])


def test_chunk_tags_score_entities_without_warnings():
  bio = Task(name="t", source="files", kind="token_classification",
             label_names=("O", "B-PER", "I-PER", "B-LOC"))
  got, caught = _score(bio)
  assert caught == [] and got["accuracy"] == pytest.approx(6 / 7)
  # 3 true entities (PER; PER, LOC), 2 predicted (PER; PER PER as one), 1 right.
  assert got["precision"] == pytest.approx(1 / 2) and got["recall"] == pytest.approx(1 / 3)
  # BILOU is read as IOBES (seqeval's CoNLL mode would not know L- and U-).
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bilou = data.entity_scores([["B-X", "L-X", "U-Y", "O"]], [["B-X", "L-X", "O", "U-Y"]])
  assert [str(c.message) for c in caught] == []
  assert bilou == pytest.approx(dict(precision=0.5, recall=0.5, f1=0.5))

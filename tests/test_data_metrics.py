"""Tests for sparse_attn.data.metrics against hand-computed values and textbook formulas."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_attn import data
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

"""Official task metrics, weighted so that filler rows (weight 0) never count.

Accuracy, binary F1 and Matthews correlation (CoLA) for classification; Pearson and
Spearman correlation (STS-B) for regression, both in plain numpy (Spearman = Pearson of
average-tie ranks, as scipy.stats.spearmanr); entity-level precision / recall / F1 for
NER and chunking through seqeval (CoNLL-style chunking) plus token accuracy, or token
accuracy alone when the tags are not chunk tags (e.g. part-of-speech tagging; see
``tasks.is_chunk_tag_set``); token accuracy for masked-LM (the loss, and so perplexity,
is the training loop's).

A correlation of a constant input is undefined; it is reported as 0.0 rather than NaN so
that "best checkpoint" comparisons stay meaningful early in training.

Shapes: N examples, L padded length, C classes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sparse_attn.data.tasks import ENTITY_METRICS, Task, is_chunk_tag

ArrayOrBatches = np.ndarray | Sequence[np.ndarray]


def _weights(w: np.ndarray | None, like: np.ndarray) -> np.ndarray:
  return np.ones(like.shape, np.float64) if w is None else np.asarray(w, np.float64)


def accuracy(predictions: np.ndarray, labels: np.ndarray,
             weights: np.ndarray | None = None) -> float:
  """Weighted fraction of ``predictions == labels`` (any matching shapes)."""
  w = _weights(weights, np.asarray(labels))
  hits = w * (np.asarray(predictions) == np.asarray(labels))
  return float(hits.sum() / w.sum()) if w.sum() else 0.0


def f1_binary(predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
              positive: int = 1) -> float:
  """Weighted F1 of the ``positive`` class: 2 TP / (2 TP + FP + FN); 0 if undefined."""
  p, y = np.asarray(predictions) == positive, np.asarray(labels) == positive
  w = _weights(weights, y)
  tp, fp, fn = (w * (p & y)).sum(), (w * (p & ~y)).sum(), (w * (~p & y)).sum()
  return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray,
                      weights: np.ndarray | None = None) -> float:
  """Weighted Matthews correlation (multi-class R_K form); 0 if undefined.

  From the weighted confusion matrix C: with t = row sums (true), p = column sums
  (predicted), c = trace and s = total, MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)).
  """
  y, p = np.asarray(labels).astype(np.int64), np.asarray(predictions).astype(np.int64)
  w = _weights(weights, y)
  k = int(max(y.max(initial=0), p.max(initial=0))) + 1
  conf = np.zeros([k, k])
  np.add.at(conf, (y, p), w)
  t, q, c, s = conf.sum(1), conf.sum(0), np.trace(conf), conf.sum()
  denom = np.sqrt((s * s - q @ q) * (s * s - t @ t))
  return float((c * s - t @ q) / denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
  """Weighted Pearson correlation of x and y [N]; 0.0 if either is constant."""
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  w = _weights(weights, x).ravel()
  if w.sum() <= 0:
    return 0.0
  w = w / w.sum()
  dx, dy = x - w @ x, y - w @ y
  var = (w @ (dx * dx)) * (w @ (dy * dy))
  return float((w @ (dx * dy)) / np.sqrt(var)) if var > 0 else 0.0


def rankdata(x: np.ndarray) -> np.ndarray:
  """[N] ranks 1..N of x, ties sharing their average rank (scipy's "average" method)."""
  x = np.asarray(x).ravel()
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  # Runs of equal values: each run gets the mean of the ordinal ranks it spans.
  starts = np.flatnonzero(np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]]))
  ends = np.concatenate([starts[1:], [len(x)]])
  avg = (starts + ends + 1) / 2.0
  ranks = np.empty(len(x))
  ranks[order] = np.repeat(avg, ends - starts)
  return ranks


def spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
  """Spearman correlation: Pearson of ranks among the examples with weight > 0."""
  x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
  w = _weights(weights, x).ravel()
  keep = w > 0
  return pearson(rankdata(x[keep]), rankdata(y[keep]), w[keep])


# seqeval's default (CoNLL) mode reads IOB1/IOB2/IOE/IOBES; BILOU is IOBES renamed.
_BILOU_TO_IOBES = {"L-": "E-", "U-": "S-"}


def entity_scores(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, float]:
  """Entity-level precision, recall and F1 (seqeval, CoNLL chunking) of tag sequences.

  Raises:
    ValueError: a tag that is not a chunk tag ("O" or B-/I-/E-/S-/L-/U-<type>), for
      which entity scores are meaningless (score such tags by token accuracy).
  """
  bad = sorted({t for seq in (*true_tags, *pred_tags) for t in seq if not is_chunk_tag(t)})
  if bad:
    raise ValueError(f"Entity scores need chunk tags ('O' or B-/I-/E-/S-/L-/U-<type>); got "
                     f"{bad[:5]}. Score such tags by token accuracy.")
  if not any(true_tags) and not any(pred_tags):
    return dict(precision=0.0, recall=0.0, f1=0.0)
  from seqeval import metrics as seqeval  # pylint: disable=g-import-not-at-top  (slow import)
  fix = lambda seqs: [[_BILOU_TO_IOBES.get(t[:2], t[:2]) + t[2:] if t != "O" else t
                       for t in seq] for seq in seqs]
  true_tags, pred_tags = fix(true_tags), fix(pred_tags)
  kw = dict(zero_division=0)
  return dict(precision=float(seqeval.precision_score(true_tags, pred_tags, **kw)),
              recall=float(seqeval.recall_score(true_tags, pred_tags, **kw)),
              f1=float(seqeval.f1_score(true_tags, pred_tags, **kw)))


def _batches(x: ArrayOrBatches) -> list[np.ndarray]:
  return [np.asarray(b) for b in x] if isinstance(x, (list, tuple)) else [np.asarray(x)]


def compute_metrics(task: Task, predictions: ArrayOrBatches, labels: ArrayOrBatches,
                    weights: ArrayOrBatches | None = None) -> dict[str, float]:
  """The task's metrics (``task.metric_names``) over all examples of positive weight.

  Each argument is one array or a list of per-batch arrays (token-level batches may have
  different padded lengths L).

  Args:
    task: the task.
    predictions: classification [N] class ids or [N,C] logits; regression [N] or [N,1];
      token classification / mlm [N,L] ids or [N,L,C] logits.
    labels: batch["labels"]: [N] or [N,L].
    weights: sequence tasks: batch["weights"] [N]; token tasks: per-position weights
      [N,L] = batch["label_mask"] * batch["weights"][:, None]. None = all ones.

  Returns:
    dict metric name -> float.
  """
  preds, labs = _batches(predictions), _batches(labels)
  wts = [np.ones(y.shape) for y in labs] if weights is None else _batches(weights)
  if not len(preds) == len(labs) == len(wts):
    raise ValueError(f"Got {len(preds)} prediction, {len(labs)} label and {len(wts)} weight "
                     "batches; pass one of each per batch.")
  token_level = task.kind in ("token_classification", "mlm")
  for i, (p, y, w) in enumerate(zip(preds, labs, wts)):
    if p.ndim == y.ndim + 1:  # Logits (or [N,1] regression outputs).
      preds[i] = p = p.argmax(-1) if p.shape[-1] > 1 else p[..., 0]
    if p.shape != y.shape or w.shape != y.shape:
      hint = " (token tasks weigh positions: label_mask * weights[:, None])" if token_level else ""
      raise ValueError(f"Shapes disagree: predictions {p.shape}, labels {y.shape}, weights "
                       f"{w.shape}{hint}.")
  if not token_level:
    p, y, w = (np.concatenate(a) for a in (preds, labs, wts))
    out = dict(accuracy=lambda: accuracy(p, y, w), f1=lambda: f1_binary(p, y, w),
               matthews_corrcoef=lambda: matthews_corrcoef(p, y, w),
               pearson=lambda: pearson(p, y, w), spearman=lambda: spearman(p, y, w))
    return {m: out[m]() for m in task.metric_names}
  flat = [np.concatenate([a[w > 0] for a, w in zip(arrs, wts)]) for arrs in (preds, labs)]
  fw = np.concatenate([w[w > 0] for w in wts])
  result = dict(accuracy=accuracy(flat[0], flat[1], fw))
  # Task picked entity metrics only for chunk tag sets; else seqeval is never called.
  if task.kind == "token_classification" and set(ENTITY_METRICS) & set(task.metric_names):
    names = np.array(task.label_names)
    true, pred = [], []
    for p, y, w in zip(preds, labs, wts):
      for pr, yr, wr in zip(p, y, w):
        if (wr > 0).any():
          true.append(list(names[yr[wr > 0]]))
          pred.append(list(names[pr[wr > 0]]))
    result.update(entity_scores(true, pred))
  return {m: result[m] for m in task.metric_names}

"""Deterministic, resumable, multi-host batching of tokenised examples into padded buckets.

Training order is a pure function of (seed, step): step s belongs to epoch
``s // steps_per_epoch`` whose order is a permutation drawn from (seed, epoch). A run
resumed at ``start_step=n`` therefore sees exactly batches n, n+1, ... of an uninterrupted
run. Every process computes the same global batch and keeps its contiguous slice of rows,
so all processes agree on the padded length without talking to each other.

Each batch is padded to the smallest length bucket that fits its longest row (max_len is
the last bucket), which keeps the number of distinct shapes, and so of compilations, small.
With ``length_grouping=G`` (the bucketing of fairseq and Hugging Face's group_by_length),
an epoch's permutation is cut into pools of G batches, each pool is sorted by length and
split into batches, and the batches are shuffled: a batch holds examples of similar
length and pads to a short bucket, while every example is still seen once per epoch in
an order that is a pure function of (seed, epoch). Evaluation then runs in length order.
Batches that are not full (the end of an evaluation pass) are filled with rows of weight 0
holding just [CLS] [SEP], so every batch has the same number of rows.

Batch (B rows on this process, L the bucket length), all numpy:
  input_ids [B,L] int32, token_type_ids [B,L] int32, attention_mask [B,L] int32 (1 = real
  token), weights [B] float32 (0 = filler row), labels: [B] int32 (classification),
  [B] float32 (regression), [B,L] int32 (token classification, mlm) with label_mask [B,L]
  int32 (1 = position predicted: first piece of a word / masked-LM target); with
  per-example masks attached (`Dataset.example_masks`), example_mask [B,L,L] bool.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from sparse_attn.data import mlm
from sparse_attn.data.tasks import Task
from sparse_attn.data.text import Encoded, SpecialIds

_SHUFFLE_TAG = 0  # Seed-sequence tag of the epoch permutations (masking uses 1).
_GROUP_TAG = 2  # Seed-sequence tag of the batch order under length grouping.


def bucket_lengths(buckets: Sequence[int], max_len: int) -> tuple[int, ...]:
  """The padded lengths in use: buckets below max_len, sorted, then max_len."""
  return tuple(sorted({int(b) for b in buckets if 0 < int(b) < max_len})) + (int(max_len),)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """[N] the example order of one training epoch, a pure function of (seed, epoch)."""
  keys = mlm.uniform((seed, _SHUFFLE_TAG, epoch), num_examples)
  return np.argsort(keys, kind="stable")


def grouped_epoch_order(lengths: np.ndarray, batch_size: int, group: int, seed: int,
                        epoch: int) -> np.ndarray:
  """[N] one epoch's example order with batches of similar length.

  The epoch permutation's first S * B examples (S = N // B full batches) are cut into
  pools of ``group`` batches; each pool is stably sorted by length and split into
  batches, and the S batches are then put in a random order. The N - S * B examples
  left over come last (the partial batch, when it is not dropped).

  Args:
    lengths: [N] tokens per example.
    batch_size: B.
    group: G >= 1, batches per sorted pool.
    seed, epoch: the order is a pure function of them.

  Returns:
    Example indices; batch s is entries [s * B, (s + 1) * B).
  """
  if group < 1:
    raise ValueError(f"length_grouping must be >= 1 batches per pool, got {group}.")
  steps = len(lengths) // batch_size
  perm, rest = np.split(epoch_permutation(len(lengths), seed, epoch), [steps * batch_size])
  pool = group * batch_size
  chunks = [perm[i:i + pool] for i in range(0, len(perm), pool)]
  chunks = [c[np.argsort(lengths[c], kind="stable")] for c in chunks]
  batches = np.concatenate(chunks).reshape(steps, batch_size)
  keys = mlm.uniform((seed, _GROUP_TAG, epoch), steps)
  return np.concatenate([batches[np.argsort(keys, kind="stable")].reshape(-1), rest])


class Dataset:
  """The tokenised examples of one split, and the batches made from them.

  Attributes:
    task: the task.
    split: "train" | "validation" | "test".
    encoded: ragged token arrays (see ``text.Encoded``).
    labels: [N] int32 / float32 sequence labels, or None (token tasks, mlm).
    max_len, buckets: padded lengths (``bucket_lengths``).
    seed: default seed of ``batches``.
    length_grouping: batches per length-sorted pool in training (0 = plain random
      batches); when > 0, evaluation passes run in length order.
  """

  def __init__(self, task: Task, split: str, encoded: Encoded, labels: np.ndarray | None,
               *, max_len: int, buckets: Sequence[int], seed: int, special: SpecialIds,
               vocab_size: int, mlm_probability: float = 0.15,
               max_predictions_per_seq: int = 20, length_grouping: int = 0):
    self.task, self.split, self.encoded, self.labels = task, split, encoded, labels
    self.max_len, self.buckets = max_len, bucket_lengths(buckets, max_len)
    self.seed, self.special, self.vocab_size = seed, special, vocab_size
    self.mlm_probability, self.max_predictions_per_seq = mlm_probability, max_predictions_per_seq
    self.lengths = encoded.lengths
    if length_grouping < 0:
      raise ValueError(f"length_grouping must be >= 0 (0 = off), got {length_grouping}.")
    self.length_grouping = int(length_grouping)
    self._order = (None, None)  # ((seed, epoch, B), order) of the last epoch used.
    self._by_length = None  # Evaluation order under length grouping.
    # Per-example masks (`sparse_attn.example_masks.ExampleMasks`), set by `attach`: each
    # batch then carries them as example_mask [B, L, L] bool.
    self.example_masks = None

  def __len__(self) -> int:
    return len(self.encoded)

  def __repr__(self) -> str:
    return (f"Dataset({self.task.name}/{self.split}: {len(self)} examples, "
            f"{int(self.lengths.sum())} tokens, buckets {self.buckets})")

  def steps_per_epoch(self, batch_size: int, drop_remainder: bool = True) -> int:
    """Global batches in one pass over the data."""
    if drop_remainder:
      return len(self) // batch_size
    return -(-len(self) // batch_size)

  def _checked_steps(self, batch_size: int, drop_remainder: bool) -> int:
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    per_epoch = self.steps_per_epoch(batch_size, drop_remainder)
    if per_epoch == 0:
      raise ValueError(
          f"{self!r} has fewer examples than one global batch ({batch_size}), so "
          "drop_remainder=True leaves no batch; lower the batch size or pass "
          "drop_remainder=False.")
    return per_epoch

  def batch_indices(self, step: int, batch_size: int, *, seed: int | None = None,
                    shuffle: bool = True, drop_remainder: bool = True) -> np.ndarray:
    """[B] example indices of global batch ``step`` (-1 = filler row).

    With ``shuffle`` the order is epoch ``step // steps_per_epoch``'s permutation;
    without it, file order (step counts batches of the single pass).
    """
    per_epoch = self._checked_steps(batch_size, drop_remainder)
    if shuffle:
      epoch, pos = divmod(step, per_epoch)
      key = (self.seed if seed is None else seed, epoch)
      if self._order[0] != key + (batch_size,):  # One order per epoch, cached.
        self._order = (key + (batch_size,),
                       grouped_epoch_order(self.lengths, batch_size, self.length_grouping, *key)
                       if self.length_grouping else epoch_permutation(len(self), *key))
      order = self._order[1]
    elif self.length_grouping:  # Evaluation in length order: short batches pad less.
      if self._by_length is None:
        self._by_length = np.argsort(self.lengths, kind="stable")
      pos, order = step, self._by_length
    else:
      pos, order = step, np.arange(len(self))
    idx = order[pos * batch_size:(pos + 1) * batch_size]
    return np.concatenate([idx, np.full(batch_size - len(idx), -1, idx.dtype)])

  def make_batch(self, indices_B: np.ndarray, *, step: int = 0, seed: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of the global batch made of examples ``indices_B``.

    Args:
      indices_B: [B] global batch example indices, -1 for filler rows.
      step: batch index (seeds MLM masking).
      seed: run seed (None = the dataset's).
      process_index, process_count: this process keeps rows
        [process_index * B/process_count, (process_index + 1) * B/process_count).

    Returns:
      The batch dict (see module docstring) with B/process_count rows.
    """
    b_global = len(indices_B)
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"Need 0 <= process_index < process_count, got {process_index} "
                       f"and {process_count}.")
    if b_global % process_count:
      raise ValueError(f"Global batch size {b_global} is not divisible by process_count "
                       f"{process_count}; each process must get the same number of rows.")
    real = indices_B >= 0
    longest = int(np.max(np.where(real, self.lengths[np.maximum(indices_B, 0)], 2)))
    width = next(b for b in self.buckets if b >= longest)  # Same on every process.
    b = b_global // process_count
    rows = np.arange(process_index * b, (process_index + 1) * b)
    idx, real = indices_B[rows], real[rows]
    lens = np.where(real, self.lengths[np.maximum(idx, 0)], 0)
    valid = np.arange(width)[None, :] < lens[:, None]
    pos = np.where(valid, self.encoded.offsets[np.maximum(idx, 0)][:, None]
                   + np.arange(width)[None, :], 0)
    gather = lambda flat: np.where(valid, flat[pos] if flat.size else 0, 0).astype(np.int32)

    batch = dict(input_ids=gather(self.encoded.input_ids),
                 token_type_ids=gather(self.encoded.token_type_ids))
    # Filler rows hold [CLS] [SEP]: no row is fully masked, and nothing in them is scored.
    batch["input_ids"][~real, :2] = (self.special.cls, self.special.sep)
    batch["attention_mask"] = (valid | (~real[:, None] & (np.arange(width) < 2))).astype(
        np.int32)
    batch["weights"] = real.astype(np.float32)
    if self.example_masks is not None:
      batch["example_mask"] = self.example_masks.batch(np.where(real, idx, -1), width)
    kind = self.task.kind
    if kind in ("classification", "regression"):
      dtype = np.float32 if kind == "regression" else np.int32
      batch["labels"] = np.where(real, self.labels[np.maximum(idx, 0)], 0).astype(dtype)
    elif kind == "token_classification":
      batch["labels"] = gather(self.encoded.tag_ids)
      batch["label_mask"] = gather(self.encoded.tag_mask)
    else:  # mlm
      batch.update(mlm.mask_tokens(
          batch["input_ids"], batch["attention_mask"], seed=self.seed if seed is None else seed,
          step=step, rows_B=rows, special=self.special, vocab_size=self.vocab_size,
          probability=self.mlm_probability, max_predictions=self.max_predictions_per_seq))
    return batch

  def batches(self, batch_size: int, *, seed: int | None = None, start_step: int = 0,
              shuffle: bool = True, drop_remainder: bool = True, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over batches, starting at ``start_step``.

    Args:
      batch_size: global batch size B (over all processes).
      seed: order and masking seed (None = config.data.seed).
      start_step: first step to produce (resume).
      shuffle: True = training: endless, reshuffled every epoch; False = one pass in
        file order (evaluation).
      drop_remainder: drop the last incomplete batch of a pass (else fill it with
        weight-0 rows).
      process_index, process_count: multi-host slice (see ``make_batch``).

    Yields:
      Batch dicts with B/process_count rows (see module docstring).
    """
    per_epoch = self._checked_steps(batch_size, drop_remainder)
    step = start_step
    while shuffle or step < per_epoch:
      idx = self.batch_indices(step, batch_size, seed=seed, shuffle=shuffle,
                               drop_remainder=drop_remainder)
      yield self.make_batch(idx, step=step, seed=seed, process_index=process_index,
                            process_count=process_count)
      step += 1

"""Dynamic masking for masked-LM: which tokens to predict and what the model sees there.

BERT's recipe: per row, ``k = min(max_predictions, max(1, round(p * n)))`` of its n
non-special real tokens are chosen uniformly; of those 80% become [MASK], 10% a random
non-special token and 10% stay unchanged. Masks are re-drawn every time a batch is made,
from (seed, step, global row index) alone, so a resumed run sees the same masks, and every
process of a multi-host run draws the rows it owns without drawing anyone else's.

Shapes: B batch rows, L padded length.
"""

from __future__ import annotations

import numpy as np

from sparse_attn.data.text import SpecialIds

_MASK_TAG = 1  # Seed-sequence tag that keeps masking draws apart from shuffling draws.


def uniform(entropy: tuple[int, ...], n: int) -> np.ndarray:
  """``n`` uniform floats in [0, 1) from a PCG64 stream seeded by ``entropy``.

  Built from the raw bit stream, which NumPy keeps stable across versions (unlike the
  ``Generator`` distribution methods), so data order and masks survive upgrades.
  """
  raw = np.random.PCG64(np.random.SeedSequence(list(entropy))).random_raw(n)
  return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def mask_tokens(input_ids_BxL: np.ndarray, attention_mask_BxL: np.ndarray, *,
                seed: int, step: int, rows_B: np.ndarray, special: SpecialIds,
                vocab_size: int, probability: float = 0.15,
                max_predictions: int = 20) -> dict[str, np.ndarray]:
  """Chooses the predicted positions of a batch and corrupts them (80/10/10).

  Args:
    input_ids_BxL: int token ids, [CLS] ... [SEP] then padding.
    attention_mask_BxL: 1 on real tokens, 0 on padding.
    seed: run seed.
    step: batch index (the training step, or the index of an evaluation batch).
    rows_B: global row index of each row in its batch (the draws depend on it only).
    special: special-token ids (never predicted, never used as random replacements).
    vocab_size: vocabulary size.
    probability: fraction of non-special tokens to predict.
    max_predictions: at most this many predictions per row.

  Returns:
    dict with input_ids [B,L] int32 (corrupted), labels [B,L] int32 (original id at
    predicted positions, else 0), label_mask [B,L] int32 (1 = predicted), and the same
    predictions as a list: mlm_positions [B,P] int32 (the predicted positions in
    ascending order, then 0) with mlm_position_mask [B,P] int32 (1 = a real entry),
    P = min(max_predictions, L), so that the head scores P positions a row, not L.
  """
  if not 0.0 < probability < 1.0:
    raise ValueError(f"mlm_probability must be in (0, 1), got {probability}.")
  if max_predictions < 1:
    raise ValueError(f"max_predictions_per_seq must be >= 1, got {max_predictions}.")
  ids = np.asarray(input_ids_BxL, np.int32)
  b, l = ids.shape
  draws = np.stack([uniform((seed, _MASK_TAG, step, int(r)), 3 * l).reshape(3, l)
                    for r in rows_B]) if b else np.zeros([0, 3, l])
  order_u, action_u, token_u = draws[:, 0], draws[:, 1], draws[:, 2]

  candidate = (np.asarray(attention_mask_BxL) > 0) & ~np.isin(ids, special.all)
  n = candidate.sum(axis=1)
  k = np.where(n > 0, np.minimum(max_predictions, np.maximum(1, np.rint(n * probability))),
               0)
  # Rank candidates by a uniform key; the k lowest are predicted (a uniform k-subset).
  key = np.where(candidate, order_u, 2.0)
  rank = np.argsort(np.argsort(key, axis=1, kind="stable"), axis=1, kind="stable")
  chosen = rank < k[:, None]

  replacements = np.setdiff1d(np.arange(vocab_size), special.all).astype(np.int32)
  random_ids = replacements[np.minimum((token_u * len(replacements)).astype(np.int64),
                                       len(replacements) - 1)]
  out = np.where(chosen & (action_u < 0.8), special.mask, ids)
  out = np.where(chosen & (action_u >= 0.8) & (action_u < 0.9), random_ids, out)
  # Chosen positions first, each group in ascending order; k <= P of them per row.
  positions = np.argsort(~chosen, axis=1, kind="stable")[:, :min(max_predictions, l)]
  position_mask = np.take_along_axis(chosen, positions, axis=1)
  return dict(input_ids=out.astype(np.int32),
              labels=np.where(chosen, ids, 0).astype(np.int32),
              label_mask=chosen.astype(np.int32),
              mlm_positions=np.where(position_mask, positions, 0).astype(np.int32),
              mlm_position_mask=position_mask.astype(np.int32))

"""Moved to `sparse_attn.attention.policy` (the choice), `attention.seam` (the executors)
and `attention.kernels` (Splash, cuDNN); this module re-exports the old names for one
release."""

from __future__ import annotations

from sparse_attn.attention import seam as _seam
from sparse_attn.attention.kernels.cudnn import attend as cudnn_attention
from sparse_attn.attention.kernels.splash import attend as splash_attention
from sparse_attn.attention.policy import (  # noqa: F401
    BLOCK_SIZES, COST_MODELS, Choice, CostModel, calibrated_choice, choose, prepare,
    prepare_masks)
from sparse_attn.attention.seam import platform  # noqa: F401
from sparse_attn.masks.layout import window_of  # noqa: F401


def execute(obj, name, query, key, value, *, key_valid=None, dropout_rng=None,
            dropout_rate=0.0):
  """Runs a `BlockSparseMask` on executor `name` ('splash', 'cudnn', 'blocksparse'),
  with the seam's fallbacks: [B, Q, H, D] from query [B, Q, H, D], key / value [B, K, H, D]."""
  drop = None
  if dropout_rng is not None and dropout_rate > 0.0:
    drop = _seam.dense.Dropout(dropout_rng, float(dropout_rate))
  return _seam.BACKENDS[name](query, key, value, mask=obj, key_valid=key_valid, bias=None,
                              dropout=drop, precision=None)


__all__ = ["BLOCK_SIZES", "COST_MODELS", "Choice", "CostModel", "calibrated_choice",
           "choose", "cudnn_attention", "execute", "platform", "prepare", "prepare_masks",
           "splash_attention", "window_of"]

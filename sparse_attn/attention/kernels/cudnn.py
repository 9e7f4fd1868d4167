"""GPU cuDNN flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`) for
the masks it can skip work on: no mask (with or without right padding: `attend_padded`),
the full layout, or one local window.

Anything else returns None from `attend`, and the caller (the seam) falls back to the
pure-JAX block-sparse executor.

Shape legend: B batch, Q / K query / key length, H heads, D head dim.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.attention.kernels.blocksparse.mask import BlockSparseMask
from sparse_attn.masks import layout as layout_lib

Array = jax.Array


def supported(dtype: Any, head_dim: int | None) -> bool:
  """cuDNN's flash attention takes half precision and head sizes that are multiples of 8
  up to 128 (head_dim None: not known yet)."""
  return (np.dtype(dtype) in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
          and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)))


def window_supported(win: tuple[int, int] | None) -> bool:
  """Whether jax.nn's cuDNN attention takes this band (-left <= j - i <= right): a left
  window only (right == 0); it refuses a right window unless causal ("cuDNN doesn't
  support right window"), so BERT's symmetric bands run block-sparse."""
  return win is not None and win[1] == 0


def attend_unmasked(query: Array, key: Array, value: Array) -> Array:
  """Unmasked, unpadded attention on cuDNN: [B, Q, H, D] from query [B, Q, H, D] and
  key / value [B, K, H, D]."""
  return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")


def right_padded_lengths(key_valid: Array) -> tuple[Array, Array]:
  """Sequence lengths of a padding mask, and whether cuDNN may take it as lengths.

  Args:
    key_valid: [B, K] bool (False = padding).

  Returns:
    (lengths int32 [B], ok bool []): ok when every row is a non-empty prefix of valid
    keys (right padding, as the library's batching pads), so that lengths express the
    mask exactly and every query has a key.
  """
  kv = key_valid.astype(jnp.bool_)
  lengths = jnp.sum(kv.astype(jnp.int32), axis=-1)
  prefix = jnp.arange(kv.shape[-1], dtype=jnp.int32)[None, :] < lengths[:, None]
  return lengths, jnp.logical_and(jnp.all(kv == prefix), jnp.all(lengths > 0))


def attend_padded(query: Array, key: Array, value: Array, key_valid: Array,
                  fallback: Callable[[], Array]) -> Array:
  """Unmasked attention with key padding: cuDNN with sequence lengths where the padding
  is right padding (checked on the device, per call), `fallback()` otherwise.

  Args:
    query: [B, Q, H, D]; key, value: [B, K, H, D].
    key_valid: [B, K] bool.
    fallback: computes the same call another way (the reference), for padding that is
      not a prefix of every row.

  Returns:
    [B, Q, H, D].
  """
  lengths, ok = right_padded_lengths(key_valid)
  return jax.lax.cond(
      ok, lambda: jax.nn.dot_product_attention(
          query, key, value, key_value_seq_lengths=lengths, implementation="cudnn"),
      fallback)


def attend(obj: BlockSparseMask, query: Array, key: Array, value: Array, *,
           key_valid: Array | None = None, right_padded: bool = False) -> Array | None:
  """cuDNN flash attention for full / local-window layouts; None if not applicable.

  Args:
    obj: the mask; only a layout shared by the batch whose element mask is full or one
      band -left <= j - i <= right applies.
    query: [B, Q, H, D]; key, value: [B, K, H, D].
    key_valid: [B, K] bool padding. cuDNN takes it as sequence lengths, which is exact
      only for right-padded batches: pass `right_padded=True` to allow it; otherwise
      padded calls return None.

  Returns:
    [B, Q, H, D], or None where cuDNN cannot run the call.
  """
  if not supported(query.dtype, query.shape[-1]):
    return None
  lay = obj.layout
  if lay.block_mask.shape[0] != 1:
    return None
  win = layout_lib.window_of(lay.to_element_mask())
  full = bool(np.all(lay.block_mask == layout_lib.FULL)) and lay.q_len % lay.block_size == 0
  if not full and not window_supported(win):
    return None
  lengths = None
  if key_valid is not None:
    if not right_padded:
      return None
    lengths = jnp.sum(key_valid.astype(jnp.int32), axis=-1)
  return jax.nn.dot_product_attention(
      query, key, value, key_value_seq_lengths=lengths,
      local_window_size=None if full else win, implementation="cudnn")

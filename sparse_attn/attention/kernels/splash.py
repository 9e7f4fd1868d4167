"""TPU Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) for a
`BlockSparseMask`: the layout's per-head numpy masks, key padding as segment ids.

`interpret=True` runs the Pallas kernel on CPU (what the tests do). The caller (the seam)
falls back to the pure-JAX block-sparse executor where Splash does not apply: attention
dropout, per-example layouts (`applies`).

Shape legend: B batch, Q / K query / key length, H heads, D head dim; Qp / Kp the lengths
padded to multiples of 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.attention import target
from sparse_attn.attention.kernels.blocksparse.mask import BlockSparseMask, row_has_key

Array = jax.Array


def applies(obj: BlockSparseMask, dropout_rate: float) -> bool:
  """Whether Splash can run `obj`: one layout shared by the batch, no attention dropout."""
  return dropout_rate == 0.0 and obj.layout.block_mask.shape[0] == 1


LANES = 128   # Splash's tile sides are multiples of the TPU lane width.


def _splash_block(length: int) -> int:
  """The largest Splash tile side (512, 256 or 128) dividing a lane-aligned length."""
  for b in (512, 256):
    if length % b == 0:
      return b
  return LANES


def attend(obj: BlockSparseMask, query: Array, key: Array, value: Array, *,
           key_valid: Array | None = None, interpret: bool | None = None) -> Array:
  """Runs a block-sparse mask through TPU Splash attention.

  Args:
    obj: the mask (no per-example layouts: Splash has no batch axis).
    query: [B, Q, H, D]; key, value: [B, K, H, D].
    key_valid: [B, K] padding mask (passed as Splash segment ids).
    interpret: run the Pallas kernel in interpret mode (default: unless the target
      platform, `attention.target.platform()`, is TPU).

  Returns:
    [B, Q, H, D]; fully masked rows are exactly zero, as in the dense reference.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  lay = obj.layout
  bsz, q_len, h, depth = query.shape
  k_len = key.shape[1]
  if interpret is None:
    interpret = target.platform() != "tpu"
  masks = lay.to_splash_masks()                        # [Hm, Qp, Kp]
  if masks.shape[0] not in (1, h):
    raise ValueError(f"Layout has {masks.shape[0]} heads; the call has {h}.")
  # Splash tiles are lane-aligned: pad to multiples of 128 (padded keys masked, padded
  # query rows fully masked and sliced away below).
  qp, kp = (-(-n // LANES) * LANES for n in masks.shape[1:])
  masks = np.pad(masks, ((0, 0), (0, qp - masks.shape[1]), (0, kp - masks.shape[2])))
  per_head = [splash.NumpyMask(masks[min(i, masks.shape[0] - 1)]) for i in range(h)]
  bq, bk = _splash_block(qp), _splash_block(kp)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                            block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                            block_kv_dq=bk)
  kernel = splash.make_splash_mha(splash.MultiHeadMask(per_head), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q = jnp.transpose(pad(query, qp), (0, 2, 1, 3)) * jnp.asarray(
      1.0 / np.sqrt(depth), query.dtype)
  k = jnp.transpose(pad(key, kp), (0, 2, 1, 3))
  v = jnp.transpose(pad(value, kp), (0, 2, 1, 3))
  kv_ok = jnp.ones((bsz, k_len), jnp.bool_) if key_valid is None else key_valid
  kv_ok = jnp.pad(kv_ok.astype(jnp.bool_), ((0, 0), (0, kp - k_len)))
  # Segment ids: queries are segment 0; valid keys 0, padding keys 1 (never attended).
  seg_kv = jnp.where(kv_ok, 0, 1).astype(jnp.int32)
  seg_q = jnp.zeros((qp,), jnp.int32)

  def one(q1, k1, v1, s1):
    return kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=seg_q, kv=s1))

  o = jax.vmap(one)(q, k, v, seg_kv)                   # [B, H, Qp, D]
  o = jnp.transpose(o, (0, 2, 1, 3))[:, :q_len]
  rows = row_has_key(obj, kv_ok[:, :k_len] if key_valid is not None else None,
                     bsz)                              # [B, Hm, Q]
  return jnp.where(jnp.transpose(rows, (0, 2, 1))[..., None], o, 0).astype(query.dtype)

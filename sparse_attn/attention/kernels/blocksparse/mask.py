"""`BlockSparseMask`: a mask leaf carrying its static block layout, and what it can say
about itself (its element mask, its density over valid pairs, which rows reach a key).

Shape legend: B batch, H heads, Q / K query / key length, b block size, NQ / NK query /
key blocks, N slot keys of a group.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.attention.kernels.blocksparse.plan import (
    Plan, device_masks, group_index, make_plan, slot_keys)
from sparse_attn.masks import layout as layout_lib

Array = jax.Array


@jax.tree_util.register_pytree_node_class
class BlockSparseMask:
  """A mask leaf that carries its static block layout: data only, no behaviour.

  A pytree (the plan's tile masks are its leaves, the plan and `preferred` are static), so
  it passes into jitted functions and the model's `masks=` like any mask array. The
  attention seam decides how it runs: `backend` 'blocksparse', 'splash', 'cudnn' or
  'dense' (the reference, on the equivalent element mask), or 'auto', which runs the
  executor named by `preferred` (what the policy chose when it prepared the mask).

  Attributes:
    plan: the static `Plan` of its layout.
    gmasks: the plan's per-group (mask, mask_t) tile masks as device arrays (None for
      groups whose tiles are all full).
    preferred: the executor 'auto' runs: 'blocksparse', 'splash' or 'cudnn'.
  """

  def __init__(self, plan: Plan, gmasks: tuple[Array | None, ...] | None = None,
               preferred: str = "blocksparse"):
    self.plan = plan
    self.preferred = preferred
    self.gmasks = device_masks(plan) if gmasks is None else tuple(gmasks)

  @classmethod
  def from_mask(cls, mask: Any, block_size: int, preferred: str = "blocksparse",
                **plan_options) -> "BlockSparseMask":
    """Builds the layout (host side) of a bool mask [Q,K] / [H,Q,K] / [B,H,Q,K]."""
    return cls(make_plan(layout_lib.from_mask(mask, block_size), **plan_options),
               preferred=preferred)

  @classmethod
  def from_layout(cls, lay: layout_lib.BlockLayout, preferred: str = "blocksparse",
                  **plan_options) -> "BlockSparseMask":
    """Wraps an existing `BlockLayout` (e.g. one the policy already built)."""
    return cls(make_plan(lay, **plan_options), preferred=preferred)

  # Mask-leaf look (schedule.is_leaf / check_leaf accept it as a bool leaf).
  @property
  def layout(self) -> layout_lib.BlockLayout:
    return self.plan.layout

  @property
  def shape(self) -> tuple[int, ...]:
    return self.plan.layout.shape

  @property
  def ndim(self) -> int:
    return 4

  @property
  def dtype(self):
    return np.dtype(bool)

  def __repr__(self):
    return (f"BlockSparseMask({self.layout!r}, slots={self.plan.num_slots}, "
            f"preferred={self.preferred!r})")

  def tree_flatten(self):
    return self.gmasks, (self.plan, self.preferred)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    obj = object.__new__(cls)
    obj.plan, obj.preferred = aux
    obj.gmasks = tuple(leaves)
    return obj

  def element_mask(self) -> Array:
    """The equivalent bool element mask [Bm, Hm, Q, K] (a constant)."""
    return jnp.asarray(self.plan.layout.to_element_mask())

  def density(self, valid_BxL: Array, per_example: bool = False) -> Array:
    """Kept fraction of valid (query, key) pairs, as `masks.tree.density` defines it.

    Args:
      valid_BxL: [B, L] bool, True for real tokens (L = Q = K).
      per_example: return the [B] densities instead of their mean.

    Returns:
      float32 [B] (per example: kept valid pairs / (Hm * valid pairs); 0 for an example
      without a valid token), or its mean (a scalar).
    """
    plan = self.plan
    lay = plan.layout
    b, nq, nk = lay.block_size, lay.num_q_blocks, lay.num_k_blocks
    bsz = valid_BxL.shape[0]
    valid = valid_BxL.astype(jnp.float32)
    qv = jnp.pad(valid, ((0, 0), (0, nq * b - lay.q_len))).reshape(bsz, 1, nq, b)
    kv = jnp.pad(valid, ((0, 0), (0, nk * b - lay.k_len))).reshape(bsz, 1, nk, b)
    hm = lay.block_mask.shape[1]
    bb = max(bsz, lay.block_mask.shape[0])
    kept = 0.0
    for g, gm in zip(plan.groups, self.gmasks):
      kvg = slot_keys(plan, g, kv[..., None], group_index(g))[..., 0]  # [B, 1|Hm, NQ, N]
      kvg = jnp.broadcast_to(kvg, (bb, hm) + kvg.shape[2:])
      qvb = jnp.broadcast_to(qv, (bb, hm) + qv.shape[2:])
      if gm is None:
        kept = kept + jnp.einsum("bhiq,bhin->b", qvb, kvg)
      else:
        gmf = jnp.broadcast_to(gm[0], (bb, hm, nq, b, gm[0].shape[-1])).astype(jnp.float32)
        kept = kept + jnp.einsum("bhiqn,bhiq,bhin->b", gmf, qvb, kvg)
    pairs = jnp.sum(valid, -1) ** 2
    d_B = kept / (jnp.maximum(pairs, 1.0) * hm)
    return d_B if per_example else jnp.mean(d_B)


def row_has_key(obj: BlockSparseMask, key_valid: Array | None, batch: int) -> Array:
  """Which query rows may attend at least one (valid) key.

  Args:
    obj: the mask.
    key_valid: [B, K] bool or None (no padding).
    batch: B.

  Returns:
    bool [B, Hm, Q] (Hm = the layout's head dim, 1 or H).
  """
  plan = obj.plan
  lay = plan.layout
  b, nq, nk = lay.block_size, lay.num_q_blocks, lay.num_k_blocks
  hm = lay.block_mask.shape[1]
  bb = max(batch, lay.block_mask.shape[0])
  kv = jnp.ones((batch, lay.k_len), jnp.float32) if key_valid is None else (
      key_valid.astype(jnp.float32))
  kv = jnp.pad(kv, ((0, 0), (0, nk * b - lay.k_len))).reshape(batch, 1, nk, b, 1)
  count = jnp.zeros((bb, hm, nq, b), jnp.float32)
  for g, gm in zip(plan.groups, obj.gmasks):
    kvg = slot_keys(plan, g, kv, group_index(g))[..., 0]     # [B, 1|Hm, NQ, N]
    kvg = jnp.broadcast_to(kvg, (bb, hm) + kvg.shape[2:])
    if gm is None:
      count = count + jnp.sum(kvg, axis=-1)[..., None]
    else:
      gmf = jnp.broadcast_to(gm[0], (bb, hm, nq, b, gm[0].shape[-1])).astype(jnp.float32)
      count = count + jnp.einsum("bhiqn,bhin->bhiq", gmf, kvg)
  return (count > 0).reshape(bb, hm, nq * b)[..., :lay.q_len]

"""The execution plan of a block layout: which tiles are computed, in which slots (host side).

The non-empty tiles of a `BlockLayout` are arranged in *slots*: a slot gives every query
block i one key block. Most masks people use are banded (windows, local + global): their
tiles lie on a few block diagonals, so a slot is an *offset* d (key block i + d) and its
keys are a contiguous shifted slice of K: no gather. Tiles off those diagonals go to
*gathered* slots (padded per-row lists of key blocks). The plan is static (numpy, hashable
by the layout's fingerprint); `slot_keys` is how traced code reads a group's keys.

Shape legend: B batch, H heads, D head dim, b block size, NQ / NK number of query / key
blocks, M slots of a group, N = M * b slot keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.masks import layout as layout_lib

Array = jax.Array


# ---- the execution plan (host side, static) ---------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """Slots computed together.

  kind 'offset': `offsets[m]` is the key-block offset of slot m (key block = i + d).
  kind 'gather': `index` int32 [Bm, Hm, NQ, M] lists key blocks per row.
  `mask`: None (every tile full), or the bool tile masks of the slots, [Bm, Hm, NQ, b,
  M*b] (query x slot keys; empty slots and out-of-range keys are False), or [Bm, Hm, NQ,
  1, M*b] when every tile is wholly on or off; `mask_t` is its transpose, which the
  backward pass uses.
  """
  kind: str
  offsets: tuple[int, ...] = ()
  index: np.ndarray | None = None
  mask: np.ndarray | None = None
  mask_t: np.ndarray | None = None

  @property
  def width(self) -> int:
    return len(self.offsets) if self.kind == "offset" else self.index.shape[-1]


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """How a layout is executed: groups of slots (see the module docstring)."""
  layout: layout_lib.BlockLayout
  groups: tuple[Group, ...]
  pad_lo: int   # Key blocks of zero padding before / after K for offset slices.
  pad_hi: int
  key: str      # Identity: layout fingerprint + plan options.

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, Plan) and self.key == other.key

  @property
  def num_slots(self) -> int:
    return sum(g.width for g in self.groups)

  @property
  def computed_density(self) -> float:
    """Tiles the plan computes / all tiles (>= rho_block: offsets and padding waste)."""
    lay = self.layout
    return self.num_slots / lay.num_k_blocks


def _tile_masks(lay: layout_lib.BlockLayout, kb_BxHxQxM: np.ndarray,
                on_BxHxQxM: np.ndarray) -> dict[str, np.ndarray | None]:
  """Masks of the tiles (row, key block) where `on`: {'mask': [Bm, Hm, NQ, b, M*b],
  'mask_t': [Bm, Hm, NQ, M*b, b]}; both None if every tile is on and full."""
  kinds = np.take_along_axis(lay.block_mask, np.clip(kb_BxHxQxM, 0, lay.num_k_blocks - 1),
                             axis=-1)
  kinds = np.where(on_BxHxQxM, kinds, layout_lib.EMPTY)
  if np.all(kinds == layout_lib.FULL):
    return {"mask": None, "mask_t": None}
  b = lay.block_size
  bm_, hm, nq, m = kinds.shape
  if not np.any(kinds == layout_lib.PARTIAL):
    # Whole tiles on or off (e.g. band edges): a per-tile flag, broadcast over the rows,
    # is much cheaper to apply than b x b element masks.
    on = np.repeat(kinds == layout_lib.FULL, b, axis=-1)          # [Bm, Hm, NQ, M*b]
    return {"mask": on[:, :, :, None, :], "mask_t": on[:, :, :, :, None]}
  pidx = np.take_along_axis(lay.partial_index, np.clip(kb_BxHxQxM, 0,
                                                       lay.num_k_blocks - 1), axis=-1)
  tiles = np.broadcast_to((kinds == layout_lib.FULL)[..., None, None],
                          kinds.shape + (b, b)).copy()
  part = kinds == layout_lib.PARTIAL
  tiles[part] = lay.partial_blocks[pidx[part]]          # [Bm, Hm, NQ, M, b, b]
  return {"mask": tiles.transpose(0, 1, 2, 4, 3, 5).reshape(bm_, hm, nq, b, m * b),
          "mask_t": tiles.transpose(0, 1, 2, 3, 5, 4).reshape(bm_, hm, nq, m * b, b)}


def group_index(g: Group) -> Array | None:
  """A gathered group's key-block lists as a device array int32 [Bm, Hm, NQ, M]; None
  for an offset group."""
  return None if g.index is None else jnp.asarray(g.index)


def make_plan(lay: layout_lib.BlockLayout, *, min_fill: float = 0.5,
              stack_offsets: bool = False) -> Plan:
  """Arranges a layout's non-empty tiles in offset and gathered slots.

  Args:
    lay: the block layout.
    min_fill: an offset d becomes a slot when at least this fraction of the rows (over
      examples and heads) with key block i + d in range use that tile; the remaining
      tiles go to gathered slots.
    stack_offsets: compute all offset slots in one stacked group (one matmul) instead of
      one group per offset.

  Returns:
    The Plan.
  """
  on = lay.block_mask != layout_lib.EMPTY            # [Bm, Hm, NQ, NK]
  bm_, hm, nq, nk = on.shape
  rows = np.arange(nq)[:, None]
  cols = np.arange(nk)[None, :]
  offs = cols - rows                                   # [NQ, NK] block offset j - i
  offsets = []
  for d in range(-(nq - 1), nk):
    diag = on[..., (offs == d)]                        # [Bm, Hm, rows in range]
    if diag.size and diag.mean() >= min_fill:
      offsets.append(d)
  covered = np.isin(offs, offsets)[None, None] & on
  rest = on & ~covered
  groups = []
  i_idx = np.arange(nq)[None, None, :, None]
  if offsets:
    per_group = [tuple(offsets)] if stack_offsets else [(d,) for d in offsets]
    for ds in per_group:
      kb = i_idx + np.asarray(ds)[None, None, None, :]
      in_range = (kb >= 0) & (kb < nk)
      kb_b = np.broadcast_to(kb, (bm_, hm, nq, len(ds)))
      on_b = np.broadcast_to(in_range, kb_b.shape)
      groups.append(Group("offset", offsets=ds, **_tile_masks(lay, kb_b, on_b)))
  m = int(rest.sum(-1).max()) if rest.size else 0
  if m:
    counts = rest.sum(-1)
    order = np.argsort(~rest, axis=-1, kind="stable")[..., :m].astype(np.int32)
    slot_on = np.arange(m)[None, None, None, :] < counts[..., None]
    # Unused slots point at a valid block (the row's last listed one) and are masked.
    index = np.where(slot_on, order, order[..., :1]).astype(np.int32)
    groups.append(Group("gather", index=index, **_tile_masks(lay, index, slot_on)))
  pad_lo = max([0] + [-d for d in offsets])
  pad_hi = max([0] + [d + nq - nk for d in offsets])
  key = f"{lay.fingerprint}/{min_fill}/{stack_offsets}"
  return Plan(layout=lay, groups=tuple(groups), pad_lo=pad_lo, pad_hi=pad_hi, key=key)



def slot_keys(plan: Plan, g: Group, x_BxHxNKxbxD: Array, idx: Array | None) -> Array:
  """Keys or values of a group's slots: [B, H, NQ, M*b, D]."""
  nq = plan.layout.num_q_blocks
  if g.kind == "offset":
    if plan.pad_lo or plan.pad_hi:
      x_BxHxNKxbxD = jnp.pad(x_BxHxNKxbxD, ((0, 0), (0, 0), (plan.pad_lo, plan.pad_hi),
                                             (0, 0), (0, 0)))
    parts = [jax.lax.slice_in_dim(x_BxHxNKxbxD, plan.pad_lo + d, plan.pad_lo + d + nq,
                                  axis=2) for d in g.offsets]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=3)
  if idx.shape[0] == 1 and idx.shape[1] == 1:
    out = jnp.take(x_BxHxNKxbxD, idx[0, 0], axis=2)    # [B, H, NQ, M, b, D]
  else:
    xb, xh = x_BxHxNKxbxD.shape[:2]
    b_, h = max(xb, idx.shape[0]), max(xh, idx.shape[1])
    idx = jnp.broadcast_to(idx, (b_, h) + idx.shape[2:])
    bi = (jnp.arange(b_) if xb > 1 else jnp.zeros(b_, jnp.int32))[:, None, None, None]
    hi = (jnp.arange(h) if xh > 1 else jnp.zeros(h, jnp.int32))[None, :, None, None]
    out = x_BxHxNKxbxD[bi, hi, idx]
  return out.reshape(out.shape[:3] + (out.shape[3] * out.shape[4],) + out.shape[5:])


def slot_keys_transpose(plan: Plan, g: Group, d_BxHxNQxNxD: Array, nk: int,
                        idx: Array | None) -> Array:
  """Adjoint of `slot_keys`: sums slot cotangents back onto key blocks [B, H, NK, b, D]."""
  nq, b = plan.layout.num_q_blocks, plan.layout.block_size
  shape = d_BxHxNQxNxD.shape
  d6 = d_BxHxNQxNxD.reshape(shape[:3] + (shape[3] // b, b) + shape[4:])
  if g.kind == "offset":
    total = None
    for m, d in enumerate(g.offsets):
      # Slot m of query block i is key block i + d: a shifted copy (zeros off the ends).
      lo, hi = max(0, d), min(nk, nq + d)
      part = jax.lax.slice_in_dim(d6[:, :, :, m], lo - d, hi - d, axis=2)
      part = jnp.pad(part, ((0, 0), (0, 0), (lo, nk - hi), (0, 0), (0, 0)))
      total = part if total is None else total + part
    return total
  idx = jnp.broadcast_to(idx, d6.shape[:4])
  out = jnp.zeros(shape[:2] + (nk,) + d6.shape[-2:], d6.dtype)
  bi = jnp.arange(shape[0])[:, None, None, None]
  hi = jnp.arange(shape[1])[None, :, None, None]
  return out.at[bi, hi, idx].add(d6)


def device_masks(plan: Plan) -> tuple[tuple[Array, Array] | None, ...]:
  """The plan's per-group tile masks as device arrays: (mask bool [Bm, Hm, NQ, b|1, N],
  mask_t bool [Bm, Hm, NQ, N, b|1]) per group, None for groups whose tiles are all full."""
  return tuple(None if g.mask is None else (jnp.asarray(g.mask), jnp.asarray(g.mask_t))
               for g in plan.groups)


def check_layout(lay: layout_lib.BlockLayout, batch: int, q_len: int, k_len: int,
                 heads: int) -> None:
  """Raises ValueError unless a layout serves inputs of B x H heads and Q x K tokens."""
  if (q_len, k_len) != (lay.q_len, lay.k_len):
    raise ValueError(f"The block layout is for Q={lay.q_len}, K={lay.k_len}; got query "
                     f"length {q_len} and key length {k_len}. Build the layout at the "
                     "model's sequence length.")
  lbm, lhm = lay.block_mask.shape[:2]
  if lbm not in (1, batch) or lhm not in (1, heads):
    raise ValueError(f"The block layout has batch x heads {lbm} x {lhm}, which does not "
                     f"broadcast to {batch} x {heads}.")

"""Block-sparse attention: only the tiles a static layout lists are computed (pure JAX).

Runs on CPU, GPU and TPU (no Pallas), forward and backward, and equals the 'dense'
reference (to float32 rounding) for bool masks, key padding, partial tiles, fully masked
rows (zero output and gradient), per-head and per-example layouts.

How a layout is executed. The non-empty tiles of a `BlockLayout` are arranged in *slots*:
a slot gives every query block i one key block. Most masks people use are banded
(windows, local + global): their tiles lie on a few block diagonals, so a slot is an
*offset* d (key block i + d) and its keys are a contiguous shifted slice of K: no gather.
Tiles off those diagonals go to *gathered* slots (padded per-row lists of key blocks).
Scores exist only for the slots ([B, H, NQ, b, S*b] in all, ~rho_block of the dense
scores); the softmax runs over all slots of a row, the output is accumulated as
sum_slots P V and normalised once. The backward is a custom VJP in the FlashAttention
style: it saves O and the row log-sum-exp only and recomputes the probabilities
key-major, so no rho-sized tensor is stored or transposed and offset slots need no
scatter. By default heads are processed one at a time (`lax.map`): each head's scores
then stay in cache, which on CPU is worth more than the loop costs. The heads are split
over independent loops, one per host core, which a runtime may run side by side (on the
2-core CPU measured in docs/benchmarks.md, one loop and two time the same).

On CPU, `attend` runs the same computation as a compiled kernel (`cpu_kernel`, a
`jax.ffi` custom call that spreads tiles over XLA's thread pool) whenever it applies
(float32, one CPU device, a C++ compiler on the host); `impl='xla'` forces
this module's executor, which is also what GPU and TPU lower.

Shape legend: B batch, L sequence length, Q / K query / key length, H heads, D head dim,
b block size, NQ / NK number of query / key blocks, M slots of a group.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn import attention as attention_lib
from sparse_attn import cpu_kernel
from sparse_attn.masks import layout as layout_lib

Array = jax.Array
_NEG = float(np.finfo(np.float32).min)


# ---- the execution plan (host side, static) ---------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class _Group:
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
  groups: tuple[_Group, ...]
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


def _index(g: _Group) -> Array | None:
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
      groups.append(_Group("offset", offsets=ds, **_tile_masks(lay, kb_b, on_b)))
  m = int(rest.sum(-1).max()) if rest.size else 0
  if m:
    counts = rest.sum(-1)
    order = np.argsort(~rest, axis=-1, kind="stable")[..., :m].astype(np.int32)
    slot_on = np.arange(m)[None, None, None, :] < counts[..., None]
    # Unused slots point at a valid block (the row's last listed one) and are masked.
    index = np.where(slot_on, order, order[..., :1]).astype(np.int32)
    groups.append(_Group("gather", index=index, **_tile_masks(lay, index, slot_on)))
  pad_lo = max([0] + [-d for d in offsets])
  pad_hi = max([0] + [d + nq - nk for d in offsets])
  key = f"{lay.fingerprint}/{min_fill}/{stack_offsets}"
  return Plan(layout=lay, groups=tuple(groups), pad_lo=pad_lo, pad_hi=pad_hi, key=key)


# ---- the kernel (traced) ------------------------------------------------------------
# Kernel arrays are blocked: q [B, H, NQ, b, D], k / v [B, H, NK, b, D]. A group's slot
# keys are [B, H, NQ, N, D] with N = M*b; its masks are (mask [Bm, Hm, NQ, b, N], mask_t
# [Bm, Hm, NQ, N, b]); gather indices `gidx` [Bm, Hm, NQ, M] are traced (so a loop over
# heads can slice them).
#
# Layouts are chosen so that every matmul is a plain [b x D] / [D x N] product and only
# the small [*, b, D] operands are ever transposed: the forward works query-major
# (scores [.., b, N]); the backward recomputes the probabilities key-major ([.., N, b],
# from the saved log-sum-exp) instead of transposing the rho-sized tensors.

def _group_kv(plan: Plan, g: _Group, x_BxHxNKxbxD: Array, idx: Array | None) -> Array:
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


def _group_kv_transpose(plan: Plan, g: _Group, d_BxHxNQxNxD: Array, nk: int,
                        idx: Array | None) -> Array:
  """Adjoint of `_group_kv`: sums slot cotangents back onto key blocks [B, H, NK, b, D]."""
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


def _key_valid(plan: Plan, g: _Group, kvalid_BxNKxb: Array | None,
               idx: Array | None) -> Array | None:
  """Key padding of a group's slot keys, bool [B, 1, NQ, N], or None."""
  if kvalid_BxNKxb is None:
    return None
  return _group_kv(plan, g, kvalid_BxNKxb[:, None, :, :, None], idx)[..., 0]


def _dropout_keep(rng, rate: float, shape, g_index: int):
  return jax.random.bernoulli(jax.random.fold_in(rng, g_index), 1.0 - rate, shape)


def _f32_einsum(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(q, kg, gmask, kv):
  """Masked scores of a group, query-major [B, H, NQ, b, N]."""
  s = _f32_einsum("bhiqd,bhind->bhiqn", q, kg)
  mask = gmask
  if kv is not None:
    kv = kv[:, :, :, None, :]
    mask = kv if mask is None else jnp.logical_and(mask, kv)
  return s if mask is None else jnp.where(mask, s, _NEG)


def _forward(plan, rate, q, k, v, gmasks, gidx, kvalid, rng):
  """Returns (o [B,H,NQ,b,D] float32, 1/z [B,H,NQ,b], log-sum-exp [B,H,NQ,b])."""
  if not plan.groups:  # Nothing may be attended: every row is fully masked.
    zero = jnp.zeros(q.shape[:-1], jnp.float32)
    return jnp.zeros(q.shape, jnp.float32), zero, zero + jnp.inf
  m_row, scores = None, []
  for gi, g in enumerate(plan.groups):
    kv = _key_valid(plan, g, kvalid, gidx[gi])
    gm = None if gmasks[gi] is None else gmasks[gi][0]
    s = _scores(q, _group_kv(plan, g, k, gidx[gi]), gm, kv)
    scores.append(s)
    mg = jnp.max(s, axis=-1)
    m_row = mg if m_row is None else jnp.maximum(m_row, mg)
  z, o = 0.0, 0.0
  for gi, (g, s) in enumerate(zip(plan.groups, scores)):
    p = jnp.exp(s - m_row[..., None])
    z = z + jnp.sum(p, axis=-1)
    if rate > 0.0:
      p = jnp.where(_dropout_keep(rng, rate, p.shape, gi), p / (1.0 - rate), 0.0)
    o = o + _f32_einsum("bhiqn,bhind->bhiqd", p.astype(v.dtype),
                        _group_kv(plan, g, v, gidx[gi]))
  # A row with no attendable key has max = _NEG (every score replaced): it outputs 0,
  # and its log-sum-exp is +inf so that the recomputed probabilities are 0 too.
  ok = m_row > 0.5 * _NEG
  zinv = jnp.where(ok, 1.0 / z, 0.0)
  lse = jnp.where(ok, m_row + jnp.log(z), jnp.inf)
  return o * zinv[..., None], zinv, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(plan, rate, q, k, v, gmasks, gidx, kvalid, rng):
  return _forward(plan, rate, q, k, v, gmasks, gidx, kvalid, rng)[0].astype(q.dtype)


def _attend_fwd(plan, rate, q, k, v, gmasks, gidx, kvalid, rng):
  o, _, lse = _forward(plan, rate, q, k, v, gmasks, gidx, kvalid, rng)
  # Saved: O and per-row statistics only (no rho-sized tensor), as in FlashAttention.
  return o.astype(q.dtype), (q, k, v, gmasks, gidx, kvalid, rng, o, lse)


def _attend_bwd(plan, rate, res, do):
  q, k, v, gmasks, gidx, kvalid, rng, o, lse = res
  nk = k.shape[2]
  do = do.astype(jnp.float32)
  # P is recomputed normalised (exp(s - lse); 0 on empty rows, whose lse is +inf):
  # dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO . O)), dK = dS^T Q, dQ = dS K.
  delta = jnp.sum(do * o, axis=-1)[:, :, :, None, :]     # [B, H, NQ, 1, b]
  lse_t = lse[:, :, :, None, :]
  q_t = jnp.swapaxes(q, -1, -2)                          # [B, H, NQ, D, b] (small)
  do_t = jnp.swapaxes(do, -1, -2).astype(v.dtype)
  dq_t, dk, dv = 0.0, 0.0, 0.0
  for gi, g in enumerate(plan.groups):
    kg, vg = _group_kv(plan, g, k, gidx[gi]), _group_kv(plan, g, v, gidx[gi])
    s_t = _f32_einsum("bhind,bhidq->bhinq", kg, q_t)    # Key-major scores K Q^T.
    mask = None if gmasks[gi] is None else gmasks[gi][1]
    kv = _key_valid(plan, g, kvalid, gidx[gi])
    if kv is not None:
      kv = kv[..., None]
      mask = kv if mask is None else jnp.logical_and(mask, kv)
    if mask is not None:
      s_t = jnp.where(mask, s_t, _NEG)
    p_t = jnp.exp(s_t - lse_t)
    dp_t = _f32_einsum("bhind,bhidq->bhinq", vg, do_t)
    pd_t = p_t
    if rate > 0.0:  # The forward's keep pattern (drawn query-major), transposed.
      shape = s_t.shape[:3] + (s_t.shape[4], s_t.shape[3])
      keep_t = jnp.swapaxes(_dropout_keep(rng, rate, shape, gi), -1, -2)
      pd_t = jnp.where(keep_t, p_t / (1.0 - rate), 0.0)
      dp_t = jnp.where(keep_t, dp_t / (1.0 - rate), 0.0)
    ds_t = p_t * (dp_t - delta)
    dv = dv + _group_kv_transpose(plan, g, _f32_einsum("bhinq,bhiqd->bhind", pd_t, do),
                                  nk, gidx[gi])
    dk = dk + _group_kv_transpose(plan, g, _f32_einsum("bhinq,bhiqd->bhind", ds_t, q),
                                  nk, gidx[gi])
    dq_t = dq_t + _f32_einsum("bhind,bhinq->bhidq", kg, ds_t)
  cast = lambda d, x: jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape)
  dq = jnp.swapaxes(dq_t, -1, -2) if plan.groups else 0.0
  return cast(dq, q), cast(dk, k), cast(dv, v), None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _device_masks(plan: Plan) -> tuple[tuple[Array, Array] | None, ...]:
  """The plan's (mask, mask_t) pairs as device arrays (None for all-full groups)."""
  return tuple(None if g.mask is None else (jnp.asarray(g.mask), jnp.asarray(g.mask_t))
               for g in plan.groups)


def _to_blocks(x_BxLxHxD: Array, nb: int, b: int) -> Array:
  """[B, L, H, D] -> [B, H, NB, b, D], zero-padding L up to NB * b."""
  bsz, length, h, d = x_BxLxHxD.shape
  x = jnp.pad(x_BxLxHxD, ((0, 0), (0, nb * b - length), (0, 0), (0, 0)))
  return jnp.transpose(x.reshape(bsz, nb, b, h, d), (0, 3, 1, 2, 4))


def attend(plan: Plan, query: Array, key: Array, value: Array, *,
           gmasks: tuple[Array | None, ...] | None = None, key_valid: Array | None = None,
           dropout_rng: Array | None = None, dropout_rate: float = 0.0,
           head_loop: bool | None = None, heads_per_step: int = 1,
           loops: int | None = None, impl: str = "auto") -> Array:
  """Block-sparse attention over a plan's tiles.

  Args:
    plan: from `make_plan`; its layout has Q = query length, K = key length.
    query: [B, Q, H, D]; key, value: [B, K, H, D].
    gmasks: the plan's group masks as device arrays (default: taken from the plan).
    key_valid: [B, K] bool, False for padding keys (never attended).
    dropout_rng, dropout_rate: attention-weight dropout (training).
    head_loop: process heads in a `lax.map` loop, which keeps each head's rho-sized
      scores in cache; default: when the layout is shared by the batch.
    heads_per_step: heads per loop step (independent ops that XLA can run on
      different cores); 1 if it does not divide H.
    loops: split the heads over this many independent loops, which a runtime may run
      concurrently (one per core); default: the host's cores, at most H / (heads
      per step), lowered until it divides that.
    impl: 'xla' (this module's pure-JAX executor, every platform), 'kernel' (the
      compiled multithreaded CPU kernel of `cpu_kernel`; raises if it cannot run this
      call) or 'auto' (the kernel on CPU when it can run the call, else 'xla'; GPU and
      TPU always lower 'xla'). The kernel has first derivatives only: use 'xla' for
      second derivatives. head_loop, heads_per_step and loops tune 'xla' only.

  Returns:
    [B, Q, H, D] attention output in the dtype of `query`.
  """
  if impl not in ("auto", "xla", "kernel"):
    raise ValueError(f"impl must be 'auto', 'xla' or 'kernel'; got {impl!r}.")
  lay = plan.layout
  b = lay.block_size
  bsz, q_len, h, depth = query.shape
  k_len = key.shape[1]
  if (q_len, k_len) != (lay.q_len, lay.k_len):
    raise ValueError(f"The block layout is for Q={lay.q_len}, K={lay.k_len}; got query "
                     f"length {q_len} and key length {k_len}. Build the layout at the "
                     "model's sequence length.")
  lbm, lhm = lay.block_mask.shape[:2]
  if lbm not in (1, bsz) or lhm not in (1, h):
    raise ValueError(f"The block layout has batch x heads {lbm} x {lhm}, which does not "
                     f"broadcast to {bsz} x {h}.")
  rate = float(dropout_rate) if dropout_rng is not None else 0.0
  if key_valid is not None and key_valid.shape != (bsz, k_len):
    raise ValueError(f"key_valid has shape {key_valid.shape}; expected [B, K] = "
                     f"{(bsz, k_len)}.")
  xla = lambda: _attend_xla(plan, query, key, value, gmasks, key_valid, dropout_rng, rate,
                            head_loop, heads_per_step, loops)
  if impl == "xla":
    return xla()
  why = cpu_kernel.unsupported(query, key, value)
  if why:
    if impl == "kernel":
      raise ValueError(f"impl='kernel' cannot run this call: {why}. Use impl='auto' or "
                       "'xla'.")
    return xla()
  kernel = lambda: cpu_kernel.attend(lay, query, key, value, key_valid, dropout_rng,
                                     rate).astype(query.dtype)
  if impl == "kernel":
    return kernel()
  return jax.lax.platform_dependent(cpu=kernel, default=xla)


def _attend_xla(plan, query, key, value, gmasks, key_valid, dropout_rng, rate, head_loop,
                heads_per_step, loops):
  """The pure-JAX executor of `attend` (arguments as there; rate already resolved)."""
  lay = plan.layout
  b = lay.block_size
  bsz, q_len, h, depth = query.shape
  k_len = key.shape[1]
  lbm = lay.block_mask.shape[0]
  if gmasks is None:
    gmasks = _device_masks(plan)
  gidx = tuple(None if g.kind == "offset" else jnp.asarray(g.index) for g in plan.groups)
  nq, nk = lay.num_q_blocks, lay.num_k_blocks
  scale = 1.0 / np.sqrt(depth)
  q = _to_blocks(query * jnp.asarray(scale, query.dtype), nq, b)
  k = _to_blocks(key, nk, b)
  v = _to_blocks(value, nk, b)
  kvalid = None
  if key_valid is not None:
    kvalid = jnp.pad(key_valid.astype(jnp.bool_), ((0, 0), (0, nk * b - k_len)))
    kvalid = kvalid.reshape(bsz, nk, b)
  rng = dropout_rng if rate > 0.0 else None
  gmasks = tuple(gmasks)
  if head_loop is None:
    head_loop = h > 1 and lbm == 1
  if head_loop and h > 1:
    # Per-head layouts (head dim > 1) are sliced by the loop; shared ones are closed over.
    leaves, treedef = jax.tree_util.tree_flatten((gmasks, gidx))
    sliced = [i for i, x in enumerate(leaves) if x.shape[1] > 1]
    xs = (jnp.moveaxis(q, 1, 0)[:, :, None], jnp.moveaxis(k, 1, 0)[:, :, None],
          jnp.moveaxis(v, 1, 0)[:, :, None], jnp.arange(h),
          [jnp.moveaxis(leaves[i], 1, 0)[:, :, None] for i in sliced])

    def one_head(x):
      qh, kh, vh, hi, per_head = x
      mine = list(leaves)
      for i, leaf in zip(sliced, per_head):
        mine[i] = leaf
      gm_h, gi_h = jax.tree_util.tree_unflatten(treedef, mine)
      rh = None if rng is None else jax.random.fold_in(rng, hi)
      return _attend(plan, rate, qh, kh, vh, gm_h, gi_h, kvalid, rh)[:, 0]

    # Several heads per loop step as independent ops, which XLA runs concurrently.
    hp = heads_per_step if heads_per_step > 0 and h % heads_per_step == 0 else 1
    group = lambda x: x.reshape((h // hp, hp) + x.shape[1:])
    xs = jax.tree_util.tree_map(group, xs)

    def step(x):
      return jnp.stack([one_head(jax.tree_util.tree_map(lambda a, j=j: a[j], x))
                        for j in range(hp)])

    steps = h // hp
    n_loops = _num_loops(loops, steps)
    per = steps // n_loops
    parts = [jax.lax.map(step, jax.tree_util.tree_map(lambda a, i=i: a[i * per:(i + 1) * per],
                                                      xs))
             for i in range(n_loops)]                      # Independent: run concurrently.
    o = parts[0] if n_loops == 1 else jnp.concatenate(parts)  # [H / hp, hp, B, NQ, b, D]
    o = jnp.moveaxis(o.reshape((h,) + o.shape[2:]), 0, 1)  # [B, H, NQ, b, D]
  else:
    o = _attend(plan, rate, q, k, v, gmasks, gidx, kvalid, rng)
  o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(bsz, nq * b, h, depth)
  return o[:, :q_len].astype(query.dtype)


def _num_loops(loops: int | None, steps: int) -> int:
  """Independent head loops: `loops` (default: host cores), at most `steps`, dividing it."""
  if loops is not None and loops < 0:
    raise ValueError(f"loops must be >= 1 (or None / 0 for one per host core); got {loops}.")
  if not loops:
    loops = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
  n = max(1, min(loops, steps))
  while steps % n:
    n -= 1
  return n


# ---- the mask object the model and the attention seam accept ------------------------

@jax.tree_util.register_pytree_node_class
class BlockSparseMask:
  """A mask leaf that carries its static block layout; `dot_product_attention` routes it
  here. It is a pytree (the tile masks are its leaves, the plan is static), so it can be
  passed into jitted functions and the model's `masks=` like any mask array.

  `backend` of the call picks the executor: 'blocksparse' (this module), 'dense' (the
  reference, with the equivalent element mask), 'splash' / 'cudnn' (see `accel`), or
  'auto' (the executor chosen when the mask was made, `preferred`).
  """

  def __init__(self, plan: Plan, gmasks: tuple[Array | None, ...] | None = None,
               preferred: str = "blocksparse"):
    self.plan = plan
    self.preferred = preferred
    self.gmasks = _device_masks(plan) if gmasks is None else tuple(gmasks)

  @classmethod
  def from_mask(cls, mask: Any, block_size: int, preferred: str = "blocksparse",
                **plan_options) -> "BlockSparseMask":
    """Builds the layout (host side) of a bool mask [Q,K] / [H,Q,K] / [B,H,Q,K]."""
    return cls(make_plan(layout_lib.from_mask(mask, block_size), **plan_options),
               preferred=preferred)

  @classmethod
  def from_layout(cls, lay: layout_lib.BlockLayout, preferred: str = "blocksparse",
                  **plan_options) -> "BlockSparseMask":
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

  def execute(self, query: Array, key: Array, value: Array, *,
              key_valid: Array | None = None, bias: Array | None = None,
              dropout_fn: Callable[[Array], Array] | None = None, precision: Any = None,
              backend: str = "auto", dropout_rng: Array | None = None,
              dropout_rate: float = 0.0) -> Array:
    """Attention under this mask (the protocol of `attention.dot_product_attention`).

    Args:
      query: [B, Q, H, D]; key, value: [B, K, H, D].
      key_valid: [B, K] bool padding mask.
      bias: additive bias; only the 'dense' executor takes one.
      dropout_fn: the dense executor's weight dropout; `dropout_rng` / `dropout_rate`
        drive the block-sparse one (same distribution, its own random stream).
      precision: matmul precision (dense executor).
      backend: 'auto', 'blocksparse', 'dense', 'splash', 'cudnn'.

    Returns:
      [B, Q, H, D].
    """
    name = self.preferred if backend == "auto" else backend
    if name == "dense":
      b, q, h, _ = query.shape
      keep, scale = attention_lib._combine_keep(  # pylint: disable=protected-access
          self.element_mask(), key_valid, b, h, q, key.shape[1])
      return attention_lib.BACKENDS["dense"](query, key, value, keep=keep, scale=scale,
                                             bias=bias, dropout_fn=dropout_fn,
                                             precision=precision)
    if bias is not None:
      raise ValueError(f"The {name!r} attention executor takes no additive bias; use "
                       "backend='dense' for biased attention.")
    if dropout_fn is not None and dropout_rng is None:
      raise ValueError("Block-sparse dropout needs dropout_rng and dropout_rate (the "
                       "attention seam passes them); got only a dropout_fn.")
    if name in ("splash", "cudnn"):
      from sparse_attn import accel  # pylint: disable=import-outside-toplevel
      return accel.execute(self, name, query, key, value, key_valid=key_valid,
                           dropout_rng=dropout_rng, dropout_rate=dropout_rate)
    if name != "blocksparse":
      raise ValueError(f"Unknown executor {name!r} for a block-sparse mask; use 'auto', "
                       "'blocksparse', 'dense', 'splash' or 'cudnn'.")
    return attend(self.plan, query, key, value, gmasks=self.gmasks, key_valid=key_valid,
                  dropout_rng=dropout_rng, dropout_rate=dropout_rate)

  def density(self, valid_BxL: Array) -> Array:
    """Kept fraction of valid (query, key) pairs, as `model.mask_density` defines it.

    Args:
      valid_BxL: [B, L] bool, True for real tokens (L = Q = K).

    Returns:
      A float32 scalar: mean over examples of kept valid pairs / (Hm * valid pairs).
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
      kvg = _group_kv(plan, g, kv[..., None], _index(g))[..., 0]  # [B, 1|Hm, NQ, N]
      kvg = jnp.broadcast_to(kvg, (bb, hm) + kvg.shape[2:])
      qvb = jnp.broadcast_to(qv, (bb, hm) + qv.shape[2:])
      if gm is None:
        kept = kept + jnp.einsum("bhiq,bhin->b", qvb, kvg)
      else:
        gmf = jnp.broadcast_to(gm[0], (bb, hm, nq, b, gm[0].shape[-1])).astype(jnp.float32)
        kept = kept + jnp.einsum("bhiqn,bhiq,bhin->b", gmf, qvb, kvg)
    pairs = jnp.sum(valid, -1) ** 2
    return jnp.mean(kept / (pairs * hm))


def _blocksparse_backend(q, k, v, *, keep, scale, bias, dropout_fn, precision):
  """'blocksparse' for plain arrays: dense layers (mask None) run the dense reference;
  array masks must be made static first."""
  structural = keep is not None and keep.shape[-2] != 1  # Not just key padding [B,1,1,K].
  if structural or scale is not None:
    raise ValueError(
        "backend='blocksparse' executes static layouts: wrap the bool mask with "
        "`blocksparse.BlockSparseMask.from_mask(mask, block_size)` (or accel.prepare) "
        "outside jit; array (and float) masks run on backend='dense'.")
  return attention_lib.BACKENDS["dense"](q, k, v, keep=keep, scale=scale, bias=bias,
                                         dropout_fn=dropout_fn, precision=precision)


attention_lib.register_backend("blocksparse")(_blocksparse_backend)


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
    kvg = _group_kv(plan, g, kv, _index(g))[..., 0]     # [B, 1|Hm, NQ, N]
    kvg = jnp.broadcast_to(kvg, (bb, hm) + kvg.shape[2:])
    if gm is None:
      count = count + jnp.sum(kvg, axis=-1)[..., None]
    else:
      gmf = jnp.broadcast_to(gm[0], (bb, hm, nq, b, gm[0].shape[-1])).astype(jnp.float32)
      count = count + jnp.einsum("bhiqn,bhin->bhiq", gmf, kvg)
  return (count > 0).reshape(bb, hm, nq * b)[..., :lay.q_len]

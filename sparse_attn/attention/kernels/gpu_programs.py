"""The Pallas programs of the GPU block-sparse kernel (`kernels.gpu`): forward, dQ, dK / dV.

Each program is one grid point (block, example, head) and walks one tile list: the
forward and dQ the key blocks of a query block, dK / dV the query blocks of a key block
(`kernels.gpu.tables`). Scores, softmax statistics and accumulators are float32; masked
scores are a finite minimum, so no NaN arises; dropout's keep mask is a hash of (seed,
query, key) that the backward recomputes.

Refs (shapes per program): tables 1-D int32, tiles int8 [P, b, b], kvalid int8 [K] or
[b], seeds uint32 [B * H]; the program's own block [b, D] and the other side's whole
sequence [L, D] of q / k / v / dO, [b] or [L] of the log-sum-exp and delta.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = -0.7 * float(np.finfo(np.float32).max)   # Finite: masked scores never make NaN.


@dataclasses.dataclass(frozen=True)
class Cfg:
  """Static parameters of one call's kernels."""
  b: int
  nq: int
  nk: int
  c: int
  ct: int
  bm: int            # The layout's batch and head dims (1: shared).
  hm: int
  heads: int
  k_pad: int         # NK * b.
  scale: float
  rate: float
  has_partial: bool
  has_kvalid: bool
  interpret: bool
  num_warps: int
  num_stages: int


def _row(cfg: Cfg, blocks: int, i, bi, hi):
  """Index of (example, head, block i) in a flattened [Bm, Hm, blocks] table."""
  bm_i = bi if cfg.bm > 1 else 0
  hm_i = hi if cfg.hm > 1 else 0
  return (bm_i * cfg.hm + hm_i) * blocks + i


def _mix32(x):
  """A 32-bit integer hash (lowbias32: xor-shift / multiply rounds)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _keep(cfg: Cfg, seed, qblock, kblock):
  """Dropout keep mask bool [b, b] of tile (qblock, kblock) of one (example, head)."""
  b = cfg.b
  qpos = (qblock * b + jnp.arange(b, dtype=jnp.int32))[:, None]
  kpos = (kblock * b + jnp.arange(b, dtype=jnp.int32))[None, :]
  x = (qpos * cfg.k_pad + kpos).astype(jnp.uint32)
  bits = _mix32(_mix32(x ^ seed) + seed)
  threshold = int(round(cfg.rate * (1 << 24)))
  return (bits >> 8).astype(jnp.int32) >= threshold


def _dot(a, b, **kw):
  precision = (jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)
  return plgpu.dot(a, b, precision=precision, **kw)


def _masked_scores(cfg: Cfg, q, k, pidx_ref, tiles_ref, kvalid, at):
  """Scaled, masked scores float32 [b, b] of one tile (`at`: its pidx table entry)."""
  s = _dot(q, k, trans_b=True) * cfg.scale
  mask = None
  if cfg.has_partial:
    p_i = pidx_ref[at]
    tile = tiles_ref[jnp.maximum(p_i, 0)]                 # [b, b] int8
    mask = jnp.logical_or(tile != 0, p_i < 0)
  if kvalid is not None:
    kv = kvalid[None, :]
    mask = kv if mask is None else jnp.logical_and(mask, kv)
  return s if mask is None else jnp.where(mask, s, _NEG)


def fwd_kernel(num_ref, cols_ref, pidx_ref, tiles_ref, kvalid_ref, seed_ref, q_ref,
                k_ref, v_ref, o_ref, lse_ref, *, cfg: Cfg):
  i, bi, hi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b = cfg.b
  row = _row(cfg, cfg.nq, i, bi, hi)
  base = row * cfg.c
  q = q_ref[...]                                          # [b, D]
  seed = seed_ref[bi * cfg.heads + hi] if cfg.rate > 0.0 else None

  def body(j, carry):
    acc, m, l = carry
    kb = cols_ref[base + j]
    ks = pl.ds(pl.multiple_of(kb * b, b), b)
    kvalid = None if kvalid_ref is None else kvalid_ref[ks] != 0
    s = _masked_scores(cfg, q, k_ref[ks, :], pidx_ref, tiles_ref, kvalid, base + j)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * corr + jnp.sum(p, axis=-1)
    if cfg.rate > 0.0:   # Dropout of the normalised weights: z is summed before it.
      p = jnp.where(_keep(cfg, seed, i, kb), p * (1.0 / (1.0 - cfg.rate)), 0.0)
    v = v_ref[ks, :]
    acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  d = q.shape[-1]
  init = (jnp.zeros((b, d), jnp.float32), jnp.full((b,), _NEG, jnp.float32),
          jnp.zeros((b,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, num_ref[row], body, init)
  # A row with no attendable key keeps max = _NEG: it outputs 0, and its log-sum-exp is
  # +inf so that the backward's recomputed probabilities are 0 too.
  ok = m > 0.5 * _NEG
  l_safe = jnp.where(ok, l, 1.0)
  o_ref[...] = jnp.where(ok[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(l_safe), jnp.inf)


def dq_kernel(num_ref, cols_ref, pidx_ref, tiles_ref, kvalid_ref, seed_ref, q_ref, k_ref,
               v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: Cfg):
  i, bi, hi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b = cfg.b
  row = _row(cfg, cfg.nq, i, bi, hi)
  base = row * cfg.c
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  seed = seed_ref[bi * cfg.heads + hi] if cfg.rate > 0.0 else None

  def body(j, dq):
    kb = cols_ref[base + j]
    ks = pl.ds(pl.multiple_of(kb * b, b), b)
    kvalid = None if kvalid_ref is None else kvalid_ref[ks] != 0
    k = k_ref[ks, :]
    s = _masked_scores(cfg, q, k, pidx_ref, tiles_ref, kvalid, base + j)
    p = jnp.exp(s - lse[:, None])
    dp = _dot(do, v_ref[ks, :], trans_b=True)
    if cfg.rate > 0.0:
      dp = jnp.where(_keep(cfg, seed, i, kb), dp * (1.0 / (1.0 - cfg.rate)), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, num_ref[row], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def dkv_kernel(num_ref, rows_ref, pidx_ref, tiles_ref, kvalid_ref, seed_ref, q_ref, k_ref,
                v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: Cfg):
  j, bi, hi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b = cfg.b
  col = _row(cfg, cfg.nk, j, bi, hi)
  base = col * cfg.ct
  k, v = k_ref[...], v_ref[...]                          # [b, D]: key block j
  kvalid = None if kvalid_ref is None else kvalid_ref[...] != 0
  seed = seed_ref[bi * cfg.heads + hi] if cfg.rate > 0.0 else None

  def body(t, carry):
    dk, dv = carry
    qb = rows_ref[base + t]
    qs = pl.ds(pl.multiple_of(qb * b, b), b)
    q, do = q_ref[qs, :], do_ref[qs, :]
    s = _masked_scores(cfg, q, k, pidx_ref, tiles_ref, kvalid, base + t)  # [q, k]
    p = jnp.exp(s - lse_ref[qs][:, None])
    dp = _dot(do, v, trans_b=True)
    pd = p
    if cfg.rate > 0.0:
      keep = _keep(cfg, seed, qb, j)
      pd = jnp.where(keep, p * (1.0 / (1.0 - cfg.rate)), 0.0)
      dp = jnp.where(keep, dp * (1.0 / (1.0 - cfg.rate)), 0.0)
    ds = p * (dp - delta_ref[qs][:, None])
    dv = dv + _dot(pd.astype(do.dtype), do, trans_a=True)
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, num_ref[col], body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

"""The block-sparse executor: attention over a plan's tiles only (pure JAX, custom VJP).

Runs on CPU, GPU and TPU (no Pallas), forward and backward, and equals the dense reference
(to float32 rounding) for bool masks, key padding, partial tiles, fully masked rows (zero
output and gradient), per-head and per-example layouts.

Scores exist only for the plan's slots ([B, H, NQ, b, S*b] in all, ~rho_block of the dense
scores); the softmax runs over all slots of a row, the output is accumulated as
sum_slots P V and normalised once. The backward is a custom VJP in the FlashAttention
style: it saves O and the row log-sum-exp only and recomputes the probabilities key-major,
so no rho-sized tensor is stored or transposed and offset slots need no scatter. By
default heads are processed one at a time (`lax.map`), so each head's scores stay in
cache; the heads are split over independent loops, one per host core, which a runtime may
run side by side.

On CPU, `attend` runs the same computation as the compiled kernel of `kernels.cpu` (a
`jax.ffi` custom call that spreads tiles over XLA's thread pool) whenever it applies
(float32, or half precision converted to float32; one CPU device; a C++ compiler on the
host; where it does not, the log says why, once); on CUDA GPUs, the Pallas kernel of
`kernels.gpu` whenever it applies (block and head sizes powers of two in [16, 128]);
`impl='xla'` forces this module's executor, which is also what TPU (and a call outside
the kernels' scope) lowers. The choice sits in `lax.platform_dependent`, so a function
exported for CUDA on a CPU host gets the GPU kernel. docs/benchmarks.md has the
measurements.

Shape legend: B batch, L sequence length, Q / K query / key length, H heads, D head dim,
b block size, NQ / NK number of query / key blocks, M slots of a group.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.attention.kernels import cpu as cpu_kernel
from sparse_attn.attention.kernels import gpu as gpu_kernel
from sparse_attn.attention.kernels.blocksparse.plan import (
    Group, Plan, check_layout, device_masks, slot_keys, slot_keys_transpose)

Array = jax.Array
_NEG = float(np.finfo(np.float32).min)


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

def _key_valid(plan: Plan, g: Group, kvalid_BxNKxb: Array | None,
               idx: Array | None) -> Array | None:
  """Key padding of a group's slot keys, bool [B, 1, NQ, N], or None."""
  if kvalid_BxNKxb is None:
    return None
  return slot_keys(plan, g, kvalid_BxNKxb[:, None, :, :, None], idx)[..., 0]


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
    s = _scores(q, slot_keys(plan, g, k, gidx[gi]), gm, kv)
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
                        slot_keys(plan, g, v, gidx[gi]))
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
    kg, vg = slot_keys(plan, g, k, gidx[gi]), slot_keys(plan, g, v, gidx[gi])
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
    dv = dv + slot_keys_transpose(plan, g, _f32_einsum("bhinq,bhiqd->bhind", pd_t, do),
                                  nk, gidx[gi])
    dk = dk + slot_keys_transpose(plan, g, _f32_einsum("bhinq,bhiqd->bhind", ds_t, q),
                                  nk, gidx[gi])
    dq_t = dq_t + _f32_einsum("bhind,bhinq->bhidq", kg, ds_t)
  cast = lambda d, x: jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape)
  dq = jnp.swapaxes(dq_t, -1, -2) if plan.groups else 0.0
  return cast(dq, q), cast(dk, k), cast(dv, v), None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


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
      compiled multithreaded CPU kernel of `kernels.cpu`; raises if it cannot run this
      call), 'gpu' (the Pallas GPU kernel of `kernels.gpu` on every platform, which
      outside CUDA needs its interpreter, $SPARSE_ATTN_GPU_INTERPRET=1; raises if it
      cannot run this call) or 'auto' (per platform, when lowered: the CPU kernel on
      CPU and the GPU kernel on CUDA when they can run the call, else 'xla'; TPU lowers
      'xla'). The kernels have first derivatives only: use 'xla' for second
      derivatives. head_loop, heads_per_step and loops tune 'xla' only.

  Returns:
    [B, Q, H, D] attention output in the dtype of `query`.
  """
  if impl not in ("auto", "xla", "kernel", "gpu"):
    raise ValueError(f"impl must be 'auto', 'xla', 'kernel' or 'gpu'; got {impl!r}.")
  lay = plan.layout
  bsz, q_len, h, depth = query.shape
  k_len = key.shape[1]
  check_layout(lay, bsz, q_len, k_len, h)
  rate = float(dropout_rate) if dropout_rng is not None else 0.0
  if key_valid is not None and key_valid.shape != (bsz, k_len):
    raise ValueError(f"key_valid has shape {key_valid.shape}; expected [B, K] = "
                     f"{(bsz, k_len)}.")
  xla = lambda: _attend_xla(plan, query, key, value, gmasks, key_valid, dropout_rng, rate,
                            head_loop, heads_per_step, loops)
  if impl == "xla":
    return xla()
  gpu = lambda: gpu_kernel.attend(lay, query, key, value, key_valid=key_valid,
                                  dropout_rng=dropout_rng, dropout_rate=rate)
  if impl == "gpu":
    if why := gpu_kernel.unsupported(lay, query):
      raise ValueError(f"impl='gpu' cannot run this call: {why}. Use impl='auto' or "
                       "'xla'.")
    return gpu()
  why = cpu_kernel.unsupported(query, key, value)
  if why and impl == "kernel":
    raise ValueError(f"impl='kernel' cannot run this call: {why}. Use impl='auto' or "
                     "'xla'.")
  if why and jax.default_backend() == "cpu":   # Elsewhere the kernel is not the plan.
    cpu_kernel.log_once("block-sparse attention runs the pure-JAX executor, not the "
                        f"compiled CPU kernel: {why}.")
  kernel = lambda: cpu_kernel.attend(lay, query, key, value, key_valid, dropout_rng,
                                     rate).astype(query.dtype)
  if impl == "kernel":
    return kernel()
  branches = {} if why else {"cpu": kernel}
  if not (gpu_why := gpu_unsupported(lay, query)):
    branches["cuda"] = gpu
  elif jax.default_backend() in ("gpu", "cuda"):
    _log_fallback(gpu_why)
  return jax.lax.platform_dependent(**branches, default=xla) if branches else xla()


_LOGGED: set[str] = set()


def _log_fallback(why: str) -> None:
  if why not in _LOGGED:
    _LOGGED.add(why)
    logging.warning("sparse_attn: the GPU block-sparse kernel does not run this call (%s); "
                    "the pure-JAX executor runs it.", why)


def gpu_unsupported(lay, query: Array) -> str:
  """Why 'auto' does not run the Pallas GPU kernel on CUDA for this call ('' if it does):
  the kernel's own scope (`kernels.gpu.unsupported`), or $SPARSE_ATTN_GPU_KERNEL=0.

  Args:
    lay: the block layout.
    query: [B, Q, H, D].
  """
  return gpu_kernel.disabled() or gpu_kernel.unsupported(lay, query)


def _attend_xla(plan, query, key, value, gmasks, key_valid, dropout_rng, rate, head_loop,
                heads_per_step, loops):
  """The pure-JAX executor of `attend` (arguments as there; rate already resolved)."""
  lay = plan.layout
  b = lay.block_size
  bsz, q_len, h, depth = query.shape
  k_len = key.shape[1]
  lbm = lay.block_mask.shape[0]
  if gmasks is None:
    gmasks = device_masks(plan)
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

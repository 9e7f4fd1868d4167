"""A GPU block-sparse attention kernel in Pallas (Triton lowering): forward and backward.

The kernel runs a block layout's tile lists, as the compiled CPU kernel (`kernels.cpu`)
does: per (example, head, query block) the ascending list of its non-empty key blocks,
each flagged full (no element mask) or partial (an index into the layout's unique b x b
element masks). The forward is FlashAttention-2: one program per (query block, example,
head) walks its list with an online softmax in float32 and saves O and the row
log-sum-exp. The backward recomputes the probabilities from the log-sum-exp, in two
kernels: dQ walks the same query-major lists; dK and dV walk the transposed lists (per
key block, the query blocks that attend to it), so each program alone writes its key
block's rows and nothing is accumulated atomically. Empty tiles are never loaded. The
programs themselves are in `kernels.gpu_programs`; this module holds the host side.

Why Pallas's Triton lowering rather than Mosaic GPU: the Triton lowering serialises the
kernel into the HLO (a `__gpu$xla.gpu.triton` custom call) at lowering time, so a
function using it can be exported for CUDA (`jax.export(..., platforms=['cuda'])`) on a
host without a GPU, and `interpret=True` runs the same kernel body on CPU, which is how
the tests check it against the dense reference. It runs on every CUDA GPU JAX supports
(Ampere and Hopper alike), and Triton itself pipelines the loads and schedules the tensor
cores. Mosaic GPU targets Hopper's warpgroup instructions more directly but is lower
level (explicit shared-memory staging, barriers and warpgroup layouts) and has no CPU
interpreter for these tests; it can replace this lowering if measurements call for it.

Semantics equal the pure-JAX executor (`kernels.blocksparse.executor`): bool tile masks,
key padding, per-head and per-example layouts, rows with no attendable key output 0 with
zero gradient (their log-sum-exp is +inf), attention dropout on the normalised weights
(the same rate; the keep pattern is a counter-based hash of (seed, example, head, query,
key) evaluated in the kernel, so the backward redraws it without storing it). Inputs are
bfloat16, float16 or float32; scores, softmax statistics and accumulators are float32 and
the output has the input dtype.

Scope (`unsupported` says why a call is outside it): block size and head size powers of
two from 16 to 128 (Triton's tile shapes; the dot needs at least 16). The 'blocksparse'
executor runs this kernel on GPU when it applies and the pure-JAX executor otherwise.
`interpret=True`, or `SPARSE_ATTN_GPU_INTERPRET=1`, runs it in Pallas's interpreter
(any backend; slow, for tests).

Shape legend: B batch, Q / K query / key length, H heads, D head dim, b block size,
NQ / NK query / key blocks, Bm / Hm the layout's batch / head dims (1 or B / H),
C / CT longest tile list of a query / key block, P unique partial tiles.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparse_attn.attention.kernels import gpu_programs as programs
from sparse_attn.masks import layout as layout_lib

Array = jax.Array
# The custom call each kernel lowers to. XLA compiles its Triton IR with the jaxlib that
# runs it; jax.export gives it no cross-version guarantee, so an exported function that
# contains it must name it in `disabled_checks` and be served by the same jaxlib.
CUSTOM_CALL = "__gpu$xla.gpu.triton"
_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(jnp.float32))


def _pow2_in(n: int, lo: int = 16, hi: int = 128) -> bool:
  return lo <= n <= hi and n & (n - 1) == 0


def out_of_scope(dtype, head_dim: int | None, block_size: int | None) -> str:
  """Why inputs of this dtype, head size and block size are outside the kernel's scope
  ('' if they are inside; None: not known yet, not checked)."""
  if np.dtype(dtype) not in _DTYPES:
    return f"it takes bfloat16, float16 or float32, not {np.dtype(dtype).name}"
  if block_size is not None and not _pow2_in(block_size):
    return f"its block size must be a power of two in [16, 128], not {block_size}"
  if head_dim is not None and not _pow2_in(head_dim):
    return f"its head size must be a power of two in [16, 128], not {head_dim}"
  return ""


def unsupported(lay: layout_lib.BlockLayout, query: Array) -> str:
  """Why the kernel cannot run this call ('' if it can).

  Args:
    lay: the block layout.
    query: [B, Q, H, D] (its dtype and head size matter).
  """
  return out_of_scope(query.dtype, query.shape[-1], lay.block_size)


def disabled() -> str:
  """Why the executors must not pick the kernel on their own ('' unless
  $SPARSE_ATTN_GPU_KERNEL is 0 / false / no / off)."""
  if os.environ.get("SPARSE_ATTN_GPU_KERNEL", "1").lower() in ("0", "false", "no", "off"):
    return "it is disabled by SPARSE_ATTN_GPU_KERNEL"
  return ""


def interpret_default() -> bool:
  """Whether calls run in Pallas's interpreter by default ($SPARSE_ATTN_GPU_INTERPRET)."""
  return os.environ.get("SPARSE_ATTN_GPU_INTERPRET", "0").lower() in ("1", "true", "yes",
                                                                       "on")


# ---- tile lists (host side) ------------------------------------------------------------

def _lists(on: np.ndarray, pidx_full: np.ndarray) -> tuple[np.ndarray, ...]:
  """Flattened per-row lists of the True columns of `on` [Bm, Hm, R, N].

  Returns:
    num int32 [Bm*Hm*R]; cols, pidx int32 [Bm*Hm*R*C] (row r's list at r*C; entries past
    num repeat the last listed column, so nothing new is read); C.
  """
  num = on.sum(-1).astype(np.int32)
  c = max(int(num.max(initial=0)), 1)
  order = np.argsort(~on, axis=-1, kind="stable")[..., :c].astype(np.int32)
  last = np.take_along_axis(order, np.maximum(num - 1, 0)[..., None], axis=-1)
  cols = np.where(np.arange(c) < num[..., None], order, last).astype(np.int32)
  pidx = np.take_along_axis(pidx_full, cols, axis=-1).astype(np.int32)
  return num.reshape(-1), cols.reshape(-1), pidx.reshape(-1), c


@functools.lru_cache(maxsize=64)
def tables(lay: layout_lib.BlockLayout) -> dict[str, object]:
  """The layout as the kernels' tile lists (numpy, cached per layout).

  Returns:
    A dict: 'q' = (num [Bm*Hm*NQ], cols, pidx [Bm*Hm*NQ*C]) the key blocks of each query
    block; 'k' = (num [Bm*Hm*NK], rows, pidx [Bm*Hm*NK*CT]) the query blocks of each key
    block; pidx is the tile's row of 'tiles' (-1: full tile); 'tiles' int8 [max(P, 1),
    b, b] (query x key); 'c', 'ct' the list widths.
  """
  on = lay.block_mask != layout_lib.EMPTY
  pi = lay.partial_index
  qn, qc, qp, c = _lists(on, pi)
  kn, kr, kp, ct = _lists(np.swapaxes(on, -1, -2), np.swapaxes(pi, -1, -2))
  b = lay.block_size
  tiles = (lay.partial_blocks if len(lay.partial_blocks) else np.zeros((1, b, b), bool))
  return {"q": (qn, qc, qp), "k": (kn, kr, kp), "c": c, "ct": ct,
          "tiles": np.ascontiguousarray(tiles.astype(np.int8))}


# ---- pallas calls -----------------------------------------------------------------------

def _whole(x):
  """A BlockSpec handing every program the whole (small) array."""
  return None if x is None else pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _call(kernel, cfg: programs.Cfg, grid, in_specs, out_specs, out_shape, name, *args):
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages))(*args)


def _specs(cfg: programs.Cfg, q_len: int, d: int, major: str):
  """BlockSpecs of q, k, v, do (inputs [B, L, H, D]) and lse, delta ([B, H, Q]) for a
  grid (blocks, B, H): the program's own block of the `major` side, the whole sequence
  of the other."""
  b = cfg.b
  own = pl.BlockSpec((None, b, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  q_all = pl.BlockSpec((None, q_len, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
  k_all = pl.BlockSpec((None, cfg.k_pad, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
  stat_own = pl.BlockSpec((None, None, b), lambda i, bi, hi: (bi, hi, i))
  stat_all = pl.BlockSpec((None, None, q_len), lambda i, bi, hi: (bi, hi, 0))
  if major == "q":
    return own, k_all, k_all, own, stat_own, stat_own
  return q_all, own, own, q_all, stat_all, stat_all


def _kvalid_spec(cfg: programs.Cfg, major: str):
  if not cfg.has_kvalid:
    return None
  if major == "q":
    return pl.BlockSpec((None, cfg.k_pad), lambda i, bi, hi: (bi, 0))
  return pl.BlockSpec((None, cfg.b), lambda j, bi, hi: (bi, j))


def _forward(cfg: programs.Cfg, q, k, v, kvalid, seeds, qtab, tiles):
  bsz, q_len, h, d = q.shape
  grid = (cfg.nq, bsz, h)
  qs, ks, vs, os_, ls, _ = _specs(cfg, q_len, d, "q")
  in_specs = [*(_whole(t) for t in qtab), _whole(tiles), _kvalid_spec(cfg, "q"),
              _whole(seeds), qs, ks, vs]
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((bsz, h, q_len), jnp.float32))
  return _call(programs.fwd_kernel, cfg, grid, in_specs, (os_, ls), out_shape,
               "blocksparse_attention_fwd", *qtab, tiles, kvalid, seeds, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, kvalid, seeds, qtab, ktab, tiles):
  return _forward(cfg, q, k, v, kvalid, seeds, qtab, tiles)[0]


def _core_fwd(cfg, q, k, v, kvalid, seeds, qtab, ktab, tiles):
  o, lse = _forward(cfg, q, k, v, kvalid, seeds, qtab, tiles)
  # Saved: O and the row log-sum-exp only; the probabilities are recomputed.
  return o, (q, k, v, kvalid, seeds, qtab, ktab, tiles, o, lse)


def _core_bwd(cfg, res, do):
  q, k, v, kvalid, seeds, qtab, ktab, tiles, o, lse = res
  bsz, q_len, h, d = q.shape
  do = do.astype(q.dtype)
  delta = jnp.einsum("blhd,blhd->bhl", do.astype(jnp.float32), o.astype(jnp.float32))
  qs, ks, vs, dos, ls, dls = _specs(cfg, q_len, d, "q")
  dq = _call(programs.dq_kernel, cfg, (cfg.nq, bsz, h),
             [*(_whole(t) for t in qtab), _whole(tiles), _kvalid_spec(cfg, "q"),
              _whole(seeds), qs, ks, vs, dos, ls, dls], qs,
             jax.ShapeDtypeStruct(q.shape, q.dtype), "blocksparse_attention_dq",
             *qtab, tiles, kvalid, seeds, q, k, v, do, lse, delta)
  qs, ks, vs, dos, ls, dls = _specs(cfg, q_len, d, "k")
  dk, dv = _call(programs.dkv_kernel, cfg, (cfg.nk, bsz, h),
                 [*(_whole(t) for t in ktab), _whole(tiles), _kvalid_spec(cfg, "k"),
                  _whole(seeds), qs, ks, vs, dos, ls, dls], (ks, vs),
                 (jax.ShapeDtypeStruct(k.shape, k.dtype),
                  jax.ShapeDtypeStruct(v.shape, v.dtype)), "blocksparse_attention_dkv",
                 *ktab, tiles, kvalid, seeds, q, k, v, do, lse, delta)
  return dq, dk, dv, None, None, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def attend(lay: layout_lib.BlockLayout, query: Array, key: Array, value: Array, *,
           key_valid: Array | None = None, dropout_rng: Array | None = None,
           dropout_rate: float = 0.0, interpret: bool | None = None,
           num_warps: int | None = None, num_stages: int = 2) -> Array:
  """Block-sparse attention with the Pallas GPU kernel (differentiable: custom VJP).

  Args:
    lay: the static layout (its Q, K match the inputs; its batch / head dims are 1 or
      B / H).
    query: [B, Q, H, D]; key, value: [B, K, H, D]; bfloat16, float16 or float32, D a
      power of two in [16, 128] (`unsupported` says why a call does not fit).
    key_valid: [B, K] bool, False for padding keys (never attended).
    dropout_rng, dropout_rate: attention-weight dropout (training): the executors'
      distribution, drawn in the kernel from a hash of a seed taken from `dropout_rng`.
    interpret: run in Pallas's interpreter (any backend; for tests); default
      `interpret_default()` ($SPARSE_ATTN_GPU_INTERPRET).
    num_warps, num_stages: Triton launch parameters (default: 4 warps for b <= 64, else
      8; 2 pipeline stages).

  Returns:
    [B, Q, H, D] in the dtype of `query`, equal to the dense reference under the
    layout's mask (rows with no attendable key are 0).

  Raises:
    ValueError: the call is outside the kernel's scope (see `unsupported`), or the
      dropout rate is not in [0, 1).
  """
  why = unsupported(lay, query)
  if why:
    raise ValueError(f"The GPU block-sparse kernel cannot run this call: {why}.")
  b = lay.block_size
  bsz, q_len, h, depth = query.shape
  k_len = key.shape[1]
  nq, nk = lay.num_q_blocks, lay.num_k_blocks
  if (q_len, k_len) != (lay.q_len, lay.k_len):
    raise ValueError(f"The layout is for Q={lay.q_len}, K={lay.k_len}; got {q_len}, "
                     f"{k_len}.")
  rate = float(dropout_rate) if dropout_rng is not None else 0.0
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}.")
  dtype = query.dtype
  pad = lambda x, n: (x if x.shape[1] == n else
                      jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))))
  q = pad(query, nq * b)
  k, v = pad(key.astype(dtype), nk * b), pad(value.astype(dtype), nk * b)
  kvalid = None
  if key_valid is not None:
    if key_valid.shape != (bsz, k_len):
      raise ValueError(f"key_valid has shape {key_valid.shape}; expected {(bsz, k_len)}.")
    kvalid = jnp.pad(key_valid.astype(jnp.int8), ((0, 0), (0, nk * b - k_len)))
  tab = tables(lay)
  qtab = tuple(jnp.asarray(t) for t in tab["q"])
  ktab = tuple(jnp.asarray(t) for t in tab["k"])
  tiles = jnp.asarray(tab["tiles"])
  seeds = (jax.random.bits(dropout_rng, (bsz * h,), jnp.uint32) if rate > 0.0
           else jnp.zeros((1,), jnp.uint32))
  cfg = programs.Cfg(
      b=b, nq=nq, nk=nk, c=tab["c"], ct=tab["ct"], bm=lay.block_mask.shape[0],
      hm=lay.block_mask.shape[1], heads=h, k_pad=nk * b, scale=float(1.0 / np.sqrt(depth)),
      rate=rate, has_partial=bool(len(lay.partial_blocks)), has_kvalid=kvalid is not None,
      interpret=interpret_default() if interpret is None else bool(interpret),
      num_warps=num_warps or (4 if b <= 64 else 8), num_stages=num_stages)
  o = _core(cfg, q, k, v, kvalid, seeds, qtab, ktab, tiles)
  return o[:, :q_len]

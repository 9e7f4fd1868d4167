"""Accelerated attention executors and the automatic choice between them.

* `choose(...)`: a small cost model decides, per mask and shape, whether block-sparse
  execution pays off and at which block size; otherwise the mask runs dense. The model
  is deliberately conservative (block-sparse only when it predicts >= `min_speedup`), so
  'auto' is never meaningfully slower than dense; `calibrate=True` replaces the
  prediction by a measurement (cached per shape and layout).
* `prepare(mask, ...)`: applies the choice, returning a `BlockSparseMask` (whose
  'auto' executor is the chosen one) or the plain bool array (dense).
* Executors for `BlockSparseMask` beyond the pure-JAX one:
  - 'splash': TPU Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`)
    with the layout's per-head numpy masks; `interpret=True` runs it on CPU (tests).
  - 'cudnn': GPU `jax.nn.dot_product_attention(implementation='cudnn')` for the masks it
    can skip work on (full, or a local window); anything else falls back to 'blocksparse'.
* The 'auto' backend for plain arrays: cuDNN on GPU for unmasked half-precision calls,
  the dense XLA reference otherwise.

Platform decisions take an injectable `platform` ('cpu' | 'gpu' | 'tpu') so the logic is
testable without the hardware.

Shape legend: B batch, L / Q / K lengths, H heads, D head dim, b block size.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn import attention as attention_lib
from sparse_attn import blocksparse
from sparse_attn import cpu_kernel
from sparse_attn.masks import layout as layout_lib

Array = jax.Array

# Block sizes each platform's block-sparse executor is tried with. Splash needs lane-
# aligned tiles (multiples of 128); the XLA executor runs any b.
BLOCK_SIZES = {"cpu": (32, 64, 128, 256), "gpu": (64, 128), "tpu": (128, 256, 512)}


def platform() -> str:
  """The default JAX platform: 'cpu', 'gpu' or 'tpu'."""
  name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


# ---- cost model -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CostModel:
  """Predicted t_dense / t_blocksparse of one attention call.

  t_dense  ~ L_q * L_k                       (score elements: matmuls + softmax passes)
  t_sparse ~ L_q * b * (S / eff(b) + c_call)
  where S is the number of key blocks computed per query block (the plan's slots) and
  eff(b) is the per-element efficiency of b x b tiles relative to the dense path (small
  tiles run matmuls at a lower rate; big dense score tensors fall out of cache, which
  can make eff > 1). eff is interpolated (log-linear in b) from `eff_table`, measured
  with `bench.py` (CPU: 2-core x86, float32, host memory reused, band masks at L = 1024-
  4096: `speedup` inverted on each row's measured fwd and fwd+bwd speed-ups, the lower
  of the two, median over the rows of a block size; docs/benchmarks.md). The default
  table is the pure-JAX executor's; 'cpu_kernel' is the compiled CPU kernel's. GPU / TPU
  tables follow published block-sparse efficiencies (~0.6-0.9 of ideal) until measured
  there.
  """
  eff_table: tuple[tuple[int, float], ...] = ((16, 0.12), (32, 0.26), (64, 0.46),
                                              (128, 0.58), (256, 0.58))
  call_overhead: float = 0.5     # Extra tiles' worth of work per query block.
  min_length: int = 512          # Below this, dense wins on every platform we measured.

  def eff(self, b: int) -> float:
    bs, es = zip(*self.eff_table)
    return float(np.interp(np.log2(b), np.log2(bs), es))

  def speedup(self, num_k_blocks: int, slots: int, b: int) -> float:
    """Predicted t_dense / t_blocksparse for one layout."""
    return num_k_blocks / max(slots / self.eff(b) + self.call_overhead, 1e-9)


COST_MODELS = {
    "cpu": CostModel(),
    # Fitted as above on the kernel's rows (docs/bench_results/attention_kernel_*.json);
    # b=16 is not measured and keeps the pure-JAX value.
    "cpu_kernel": CostModel(eff_table=((16, 0.12), (32, 0.64), (64, 0.86), (128, 1.24),
                                       (256, 1.25))),
    "gpu": CostModel(eff_table=((32, 0.3), (64, 0.55), (128, 0.65), (256, 0.65))),
    "tpu": CostModel(eff_table=((128, 0.8), (256, 0.85), (512, 0.9)), min_length=1024),
}


@dataclasses.dataclass(frozen=True)
class Choice:
  """The executor and block size picked for one mask."""
  executor: str                 # 'dense', 'blocksparse', 'splash', 'cudnn'
  block_size: int | None
  predicted_speedup: float      # t_dense / t_chosen (1.0 for dense)
  block_density: float | None
  reason: str


def _slots(lay: layout_lib.BlockLayout) -> int:
  return blocksparse.make_plan(lay).num_slots


def choose(mask: Any, *, platform_name: str | None = None,
           block_sizes: Sequence[int] | None = None, min_speedup: float = 1.25,
           cost_model: CostModel | None = None, dtype: Any = jnp.float32,
           head_dim: int | None = None) -> tuple[Choice, layout_lib.BlockLayout | None]:
  """Chooses dense vs block-sparse (and the block size) for a bool mask.

  Args:
    mask: bool mask_QxK / mask_HxQxK / mask_BxHxQxK (host side).
    platform_name: 'cpu', 'gpu', 'tpu' (default: the running one).
    block_sizes: candidates (default: `BLOCK_SIZES[platform]`).
    min_speedup: block-sparse is chosen only if predicted to be at least this much
      faster than dense (the margin that keeps 'auto' from being slower than dense).
    cost_model: overrides `COST_MODELS[platform]` (on CPU: 'cpu_kernel' when the
      compiled kernel will run the calls, i.e. float32 and the kernel is available).
    dtype, head_dim: the attention inputs' dtype and head size (cuDNN / CPU-kernel
      eligibility).

  Returns:
    (Choice, the BlockLayout at the chosen block size or None for dense).
  """
  plat = platform_name or platform()
  key = plat
  if cost_model is None and plat == "cpu" and np.dtype(dtype) == np.float32:
    probe = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32)
    key = "cpu" if cpu_kernel.unsupported(probe, probe, probe) else "cpu_kernel"
  cm = cost_model or COST_MODELS.get(key, CostModel())
  m = np.asarray(mask)
  q_len, k_len = m.shape[-2:]
  if plat == "gpu":
    win = window_of(m)
    if win is not None and _cudnn_ok(dtype, head_dim):
      return Choice("cudnn", None, 1.0, None, f"local window {win} on cuDNN"), None
  if max(q_len, k_len) < cm.min_length:
    return Choice("dense", None, 1.0, None,
                  f"length {max(q_len, k_len)} < {cm.min_length}: dense is faster"), None
  best = None
  for b in block_sizes or BLOCK_SIZES.get(plat, BLOCK_SIZES["cpu"]):
    if b > max(q_len, k_len):
      continue
    lay = layout_lib.from_mask(m, b)
    s = cm.speedup(lay.num_k_blocks, _slots(lay), b)
    if best is None or s > best[0]:
      best = (s, b, lay)
  if best is None or best[0] < min_speedup:
    s = best[0] if best else 1.0
    return Choice("dense", None, 1.0, best[2].block_density if best else None,
                  f"predicted block-sparse speed-up {s:.2f} < {min_speedup}"), None
  s, b, lay = best
  executor = "splash" if plat == "tpu" else "blocksparse"
  return Choice(executor, b, s, lay.block_density,
                f"predicted speed-up {s:.2f} at block size {b}"), lay


_MEASURED: dict[tuple, Choice] = {}


def _time(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def calibrated_choice(mask: Any, batch: int, num_heads: int, head_dim: int, *,
                      block_sizes: Sequence[int] | None = None, repeats: int = 3,
                      dtype: Any = jnp.float32) -> Choice:
  """Measures dense vs block-sparse (forward) for this shape and caches the winner.

  Cached per (platform, shape, mask content); the measurement costs a few compilations.
  """
  m = np.asarray(mask).astype(bool)
  plat = platform()
  key = (plat, batch, num_heads, head_dim, np.dtype(dtype).name, m.shape,
         layout_lib.from_mask(m, 1).fingerprint, tuple(block_sizes or ()))
  if key in _MEASURED:
    return _MEASURED[key]
  q_len, k_len = m.shape[-2:]
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((batch, q_len, num_heads, head_dim)), dtype)
  k = jnp.asarray(rng.standard_normal((batch, k_len, num_heads, head_dim)), dtype)
  f = jax.jit(lambda q, k, v, mm, be: attention_lib.dot_product_attention(
      q, k, v, mask=mm, backend=be), static_argnums=4)
  t_dense = _time(f, q, k, k, jnp.asarray(m), "dense", repeats=repeats)
  best = Choice("dense", None, 1.0, None, f"measured dense {t_dense * 1e3:.2f} ms")
  for b in block_sizes or BLOCK_SIZES.get(plat, BLOCK_SIZES["cpu"]):
    if b > max(q_len, k_len):
      continue
    obj = blocksparse.BlockSparseMask.from_mask(m, b)
    t = _time(f, q, k, k, obj, "blocksparse", repeats=repeats)
    if t_dense / t > best.predicted_speedup:
      best = Choice("blocksparse", b, t_dense / t, obj.layout.block_density,
                    f"measured {t * 1e3:.2f} ms vs dense {t_dense * 1e3:.2f} ms")
  _MEASURED[key] = best
  return best


def prepare(mask: Any, *, platform_name: str | None = None, calibrate: bool = False,
            shape: tuple[int, int, int] | None = None, **choose_kwargs) -> Any:
  """Turns a bool mask into what runs it fastest under backend='auto'.

  Args:
    mask: bool mask_QxK / mask_HxQxK / mask_BxHxQxK, or None (dense; returned as is).
    platform_name: override the platform ('cpu', 'gpu', 'tpu').
    calibrate: measure instead of predicting (needs `shape` = (batch, heads, head_dim)).
    **choose_kwargs: passed to `choose`.

  Returns:
    A `BlockSparseMask` whose preferred executor is the chosen one, or the mask itself
    (as a bool array) when dense was chosen.
  """
  if mask is None or isinstance(mask, blocksparse.BlockSparseMask):
    return mask
  if calibrate:
    if shape is None:
      raise ValueError("prepare(calibrate=True) needs shape=(batch, heads, head_dim).")
    c = calibrated_choice(mask, *shape)
    lay = layout_lib.from_mask(mask, c.block_size) if c.block_size else None
  else:
    c, lay = choose(mask, platform_name=platform_name, **choose_kwargs)
  if c.executor == "dense":
    return np.asarray(mask).astype(bool)
  if lay is None:  # cuDNN windows: the layout is still needed for fallbacks.
    lay = layout_lib.from_mask(mask, 128)
  return blocksparse.BlockSparseMask.from_layout(lay, preferred=c.executor)


def prepare_masks(masks: Any, num_layers: int, **kwargs) -> tuple[Any, ...]:
  """`prepare` applied to each layer of a mask pytree (see `model.normalize_masks`);
  layers sharing one mask share one prepared object."""
  from sparse_attn import model as model_lib  # pylint: disable=import-outside-toplevel
  per_layer = model_lib.normalize_masks(masks, num_layers)
  done: dict[int, Any] = {}
  out = []
  for m in per_layer:
    if id(m) not in done:
      done[id(m)] = prepare(m, **kwargs)
    out.append(done[id(m)])
  return tuple(out)


# ---- structure recognisers ------------------------------------------------------------

def window_of(mask: Any) -> tuple[int, int] | None:
  """(left, right) if the mask is one band -left <= j - i <= right for every head and
  example (what cuDNN's local_window_size skips), else None."""
  m = np.asarray(mask).astype(bool)
  m = m.reshape((-1,) + m.shape[-2:])
  if not np.all(m == m[:1]):
    return None
  m = m[0]
  q_len, k_len = m.shape
  if q_len != k_len or not m.any():
    return None
  off = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]     # j - i
  left = int(-off[m].min())
  right = int(off[m].max())
  if left < 0 or right < 0:
    return None
  band = (off >= -left) & (off <= right)
  return (left, right) if np.array_equal(band, m) else None


def _cudnn_ok(dtype: Any, head_dim: int | None) -> bool:
  return (np.dtype(dtype) in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
          and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)))


# ---- executors ----------------------------------------------------------------------

def _splash_block(length: int) -> int:
  for b in (512, 256, 128):
    if length % b == 0:
      return b
  return length  # Short sequences: one tile (interpret mode on CPU accepts it).


def splash_attention(obj: blocksparse.BlockSparseMask, query: Array, key: Array,
                     value: Array, *, key_valid: Array | None = None,
                     interpret: bool | None = None) -> Array:
  """Runs a block-sparse mask through TPU Splash attention.

  Args:
    obj: the mask (no per-example layouts: Splash has no batch axis).
    query: [B, Q, H, D]; key, value: [B, K, H, D].
    key_valid: [B, K] padding mask (passed as Splash segment ids).
    interpret: run the Pallas kernel in interpret mode (default: when not on TPU).

  Returns:
    [B, Q, H, D]; fully masked rows are exactly zero, as in the dense reference.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  lay = obj.layout
  bsz, q_len, h, depth = query.shape
  k_len = key.shape[1]
  if interpret is None:
    interpret = platform() != "tpu"
  masks = lay.to_splash_masks()                        # [Hm, Qp, Kp]
  if masks.shape[0] not in (1, h):
    raise ValueError(f"Layout has {masks.shape[0]} heads; the call has {h}.")
  qp, kp = masks.shape[1:]
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
  rows = blocksparse.row_has_key(obj, kv_ok[:, :k_len] if key_valid is not None else None,
                                 bsz)                  # [B, Hm, Q]
  return jnp.where(jnp.transpose(rows, (0, 2, 1))[..., None], o, 0).astype(query.dtype)


def cudnn_attention(obj: blocksparse.BlockSparseMask, query: Array, key: Array,
                    value: Array, *, key_valid: Array | None = None,
                    right_padded: bool = False) -> Array | None:
  """cuDNN flash attention for full / local-window layouts; None if not applicable.

  Key padding is expressed as sequence lengths, which is exact only for right-padded
  batches: pass `right_padded=True` to allow it; otherwise padded calls return None.
  """
  if not _cudnn_ok(query.dtype, query.shape[-1]):
    return None
  lay = obj.layout
  if lay.block_mask.shape[0] != 1:
    return None
  win = window_of(lay.to_element_mask())
  full = bool(np.all(lay.block_mask == layout_lib.FULL)) and lay.q_len % lay.block_size == 0
  if win is None and not full:
    return None
  lengths = None
  if key_valid is not None:
    if not right_padded:
      return None
    lengths = jnp.sum(key_valid.astype(jnp.int32), axis=-1)
  return jax.nn.dot_product_attention(
      query, key, value, key_value_seq_lengths=lengths,
      local_window_size=None if full else win, implementation="cudnn")


def execute(obj: blocksparse.BlockSparseMask, name: str, query: Array, key: Array,
            value: Array, *, key_valid: Array | None = None,
            dropout_rng: Array | None = None, dropout_rate: float = 0.0) -> Array:
  """Runs `obj` on executor `name` ('splash' or 'cudnn'), falling back to the pure-JAX
  block-sparse executor where the accelerated one does not apply (attention dropout,
  per-example layouts, masks cuDNN cannot skip)."""
  drop = dropout_rng is not None and dropout_rate > 0.0
  if not drop:
    if name == "splash" and obj.layout.block_mask.shape[0] == 1:
      return splash_attention(obj, query, key, value, key_valid=key_valid)
    if name == "cudnn":
      out = cudnn_attention(obj, query, key, value, key_valid=key_valid)
      if out is not None:
        return out
  return blocksparse.attend(obj.plan, query, key, value, gmasks=obj.gmasks,
                            key_valid=key_valid, dropout_rng=dropout_rng,
                            dropout_rate=dropout_rate)


def _auto_backend(q, k, v, *, keep, scale, bias, dropout_fn, precision):
  """'auto' for plain arrays: cuDNN for unmasked half-precision calls on GPU, else dense."""
  if (platform() == "gpu" and keep is None and scale is None and bias is None
      and dropout_fn is None and _cudnn_ok(q.dtype, q.shape[-1])):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  return attention_lib.BACKENDS["dense"](q, k, v, keep=keep, scale=scale, bias=bias,
                                         dropout_fn=dropout_fn, precision=precision)


def _only_objects(name):
  def run(q, k, v, *, keep, scale, bias, dropout_fn, precision):
    if keep is not None or scale is not None:
      raise ValueError(f"backend={name!r} executes block-sparse mask objects; prepare "
                       "the mask with accel.prepare / BlockSparseMask.from_mask.")
    return attention_lib.BACKENDS["dense"](q, k, v, keep=keep, scale=scale, bias=bias,
                                           dropout_fn=dropout_fn, precision=precision)
  return run


attention_lib.register_backend("auto")(_auto_backend)
attention_lib.register_backend("splash")(_only_objects("splash"))
attention_lib.register_backend("cudnn")(_only_objects("cudnn"))

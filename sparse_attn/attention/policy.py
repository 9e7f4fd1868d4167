"""The policy: whether a mask runs block-sparse, on which executor, at which block size.

* `choose(...)`: a small cost model decides, per mask and shape, whether block-sparse
  execution pays off and at which block size; otherwise the mask runs dense. The model
  is deliberately conservative (block-sparse only when it predicts >= `min_speedup`), so
  'auto' is never meaningfully slower than dense.
* `calibrated_choice(...)`: replaces the prediction by a measurement (cached per shape
  and mask).
* `prepare(mask, ...)` / `prepare_masks(masks, num_layers)`: apply the choice, returning
  a `BlockSparseMask` (whose `preferred` executor is the chosen one, what backend='auto'
  runs) or the plain bool array (dense), once, on the host, outside jit.

Platform decisions take an injectable `platform_name` ('cpu' | 'gpu' | 'tpu') so the logic
is testable without the hardware. How the cost tables were fitted, and what they were
fitted on, is in docs/benchmarks.md.

Shape legend: B batch, L / Q / K lengths, H heads, D head dim, b block size.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.attention import seam
from sparse_attn.attention.kernels import cpu as cpu_kernel
from sparse_attn.attention.kernels import cudnn
from sparse_attn.attention.kernels import gpu as gpu_kernel
from sparse_attn.attention.kernels.blocksparse.mask import BlockSparseMask
from sparse_attn.attention.kernels.blocksparse.plan import make_plan
from sparse_attn.masks import layout as layout_lib
from sparse_attn.masks import tree

Array = jax.Array

# Block sizes each platform's block-sparse executor is tried with. Splash computes in
# lane-aligned tiles (multiples of 128), so smaller layout blocks skip nothing more there;
# the XLA executor runs any b.
BLOCK_SIZES = {"cpu": (32, 64, 128, 256), "gpu": (64, 128), "tpu": (128, 256, 512)}


# ---- cost model -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CostModel:
  """Predicted t_dense / t_blocksparse of one attention call.

  t_dense  ~ L_q * L_k                       (score elements: matmuls + softmax passes)
  t_sparse ~ L_q * b * (S / eff(b) + c_call)
  where S is the number of key blocks computed per query block (the plan's slots) and
  eff(b) is the per-element efficiency of b x b tiles relative to the dense path (small
  tiles run matmuls at a lower rate; big dense score tensors fall out of cache, which
  can make eff > 1). eff is interpolated (log-linear in b) from `eff_table`, fitted to
  `python -m sparse_attn.bench` rows (docs/benchmarks.md says on what and how). The
  default table is the pure-JAX executor's; 'cpu_kernel' is the compiled CPU kernel's.
  GPU / TPU tables follow published block-sparse efficiencies (~0.6-0.9 of ideal) until
  measured there: 'gpu' is the pure-JAX executor on GPU, 'gpu_kernel' the Pallas GPU
  kernel (`kernels.gpu`), both unmeasured (scripts/device_check.sh measures them).
  """
  eff_table: tuple[tuple[int, float], ...] = ((16, 0.12), (32, 0.26), (64, 0.46),
                                              (128, 0.58), (256, 0.58))
  call_overhead: float = 0.5     # Extra tiles' worth of work per query block.
  min_length: int = 512          # Below this, dense wins on every platform we measured.
  # True: the executor computes the plan's slots, padded to the longest row (the pure-JAX
  # executor); False: each query block its own tiles (the compiled CPU kernel, Splash),
  # so S is the mean number of non-empty tiles of a query block (a global row costs once).
  padded_slots: bool = True

  def eff(self, b: int) -> float:
    bs, es = zip(*self.eff_table)
    return float(np.interp(np.log2(b), np.log2(bs), es))

  def speedup(self, num_k_blocks: int, slots: float, b: int) -> float:
    """Predicted t_dense / t_blocksparse for one layout."""
    return num_k_blocks / max(slots / self.eff(b) + self.call_overhead, 1e-9)


COST_MODELS = {
    "cpu": CostModel(),
    # The compiled kernel's rows (docs/benchmarks.md); b=16 keeps the pure-JAX value.
    "cpu_kernel": CostModel(eff_table=((16, 0.12), (32, 0.64), (64, 0.86), (128, 1.24),
                                       (256, 1.25)), padded_slots=False),
    "gpu": CostModel(eff_table=((32, 0.3), (64, 0.55), (128, 0.65), (256, 0.65))),
    # Unmeasured, a published estimate: block-sparse FlashAttention's time falls in
    # proportion to the tiles it computes, and dense FlashAttention is several times
    # faster than the materialised attention that 'dense' runs for a mask array (Dao et
    # al. 2022, FlashAttention, sec. 3.3 and sec. 4). The efficiencies stay under 1 and
    # the call overhead high, so 'auto' keeps a margin until scripts/device_check.sh has
    # measured the kernel. Each query block walks its own tile list (padded_slots False).
    "gpu_kernel": CostModel(eff_table=((16, 0.25), (32, 0.45), (64, 0.8), (128, 0.9)),
                            call_overhead=1.0, min_length=1024, padded_slots=False),
    "tpu": CostModel(eff_table=((128, 0.8), (256, 0.85), (512, 0.9)), min_length=1024,
                     padded_slots=False),
}


@dataclasses.dataclass(frozen=True)
class Choice:
  """The executor and block size picked for one mask."""
  executor: str                 # 'dense', 'blocksparse', 'splash', 'cudnn'
  block_size: int | None
  predicted_speedup: float      # t_dense / t_chosen (1.0 for dense)
  block_density: float | None
  reason: str


def _slots(lay: layout_lib.BlockLayout, cm: CostModel) -> float:
  """S of `CostModel.speedup`: the plan's padded slots, or the mean non-empty tiles of a
  query block (`cm.padded_slots` says which the executor computes)."""
  if cm.padded_slots:
    return make_plan(lay).num_slots
  return float(np.mean(np.sum(lay.block_mask != layout_lib.EMPTY, axis=-1)))


def _best_block(m: np.ndarray, cm: CostModel, block_sizes: Sequence[int]
                ) -> tuple[float, int, layout_lib.BlockLayout] | None:
  """(predicted speed-up, block size, layout) of the best candidate no longer than the
  mask, or None when every candidate is longer."""
  best = None
  for b in block_sizes:
    if b > max(m.shape[-2:]):
      continue
    lay = layout_lib.from_mask(m, b)
    s = cm.speedup(lay.num_k_blocks, _slots(lay, cm), b)
    if best is None or s > best[0]:
      best = (s, b, lay)
  return best


def _cost_model(plat: str, dtype: Any, head_dim: int | None = None) -> CostModel:
  key = plat
  if plat == "cpu" and cpu_kernel.takes(dtype):
    probe = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32)
    key = "cpu" if cpu_kernel.unsupported(probe, probe, probe) else "cpu_kernel"
  if plat == "gpu" and not (gpu_kernel.disabled() or gpu_kernel.out_of_scope(
      dtype, head_dim, None)):
    key = "gpu_kernel"   # Every GPU candidate block size (BLOCK_SIZES) is in its scope.
  return COST_MODELS.get(key, CostModel())


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
      compiled kernel will run the calls, i.e. float32 or half precision (converted)
      and the kernel is available; on GPU: 'gpu_kernel' when the Pallas kernel will,
      i.e. a head size in its scope).
    dtype, head_dim: the attention inputs' dtype and head size (cuDNN / CPU-kernel
      eligibility).

  Returns:
    (Choice, the BlockLayout at the chosen block size or None for dense).
  """
  plat = platform_name or seam.platform()
  cm = cost_model or _cost_model(plat, dtype, head_dim)
  m = np.asarray(mask)
  q_len, k_len = m.shape[-2:]
  if plat == "gpu":
    win = layout_lib.window_of(m)
    if cudnn.window_supported(win) and cudnn.supported(dtype, head_dim):
      return Choice("cudnn", None, 1.0, None, f"local window {win} on cuDNN"), None
  if max(q_len, k_len) < cm.min_length:
    return Choice("dense", None, 1.0, None,
                  f"length {max(q_len, k_len)} < {cm.min_length}: dense is faster"), None
  best = _best_block(m, cm, block_sizes or BLOCK_SIZES.get(plat, BLOCK_SIZES["cpu"]))
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

  Args:
    mask: bool mask_QxK / mask_HxQxK / mask_BxHxQxK (host side).
    batch, num_heads, head_dim: B, H, D of the calls it will serve (inputs [B, L, H, D]).
    block_sizes: candidates (default: `BLOCK_SIZES[platform]`).
    repeats: timed calls per candidate (the median counts).
    dtype: the inputs' dtype.

  Returns:
    The winning `Choice` ('dense' or 'blocksparse' with its block size and measured
    speed-up). Cached per (platform, shape, mask content); the measurement costs a few
    compilations.
  """
  m = np.asarray(mask).astype(bool)
  plat = seam.platform()
  key = (plat, batch, num_heads, head_dim, np.dtype(dtype).name, m.shape,
         layout_lib.from_mask(m, 1).fingerprint, tuple(block_sizes or ()))
  if key in _MEASURED:
    return _MEASURED[key]
  q_len, k_len = m.shape[-2:]
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((batch, q_len, num_heads, head_dim)), dtype)
  k = jnp.asarray(rng.standard_normal((batch, k_len, num_heads, head_dim)), dtype)
  f = jax.jit(lambda q, k, v, mm, be: seam.dot_product_attention(
      q, k, v, mask=mm, backend=be), static_argnums=4)
  t_dense = _time(f, q, k, k, jnp.asarray(m), "dense", repeats=repeats)
  best = Choice("dense", None, 1.0, None, f"measured dense {t_dense * 1e3:.2f} ms")
  for b in block_sizes or BLOCK_SIZES.get(plat, BLOCK_SIZES["cpu"]):
    if b > max(q_len, k_len):
      continue
    obj = BlockSparseMask.from_mask(m, b)
    t = _time(f, q, k, k, obj, "blocksparse", repeats=repeats)
    if t_dense / t > best.predicted_speedup:
      best = Choice("blocksparse", b, t_dense / t, obj.layout.block_density,
                    f"measured {t * 1e3:.2f} ms vs dense {t_dense * 1e3:.2f} ms")
  _MEASURED[key] = best
  return best


BLOCK_SPARSE_EXECUTORS = ("blocksparse", "splash", "cudnn")


def prepare_with_choice(mask: Any, *, executor: str = "auto",
                        platform_name: str | None = None, calibrate: bool = False,
                        shape: tuple[int, int, int] | None = None, **choose_kwargs
                        ) -> tuple[Any, Choice]:
  """`prepare`, also returning the `Choice` behind it (executor, block size, reason).

  Args:
    mask: as in `prepare`.
    executor: 'auto' (the policy decides, as `prepare`); 'dense' (the bool array, nothing
      prepared); or a block-sparse executor ('blocksparse', 'splash', 'cudnn'): always a
      `BlockSparseMask` preferring it, at the block size the cost model ranks best.
    platform_name, calibrate, shape, **choose_kwargs: as in `prepare`.

  Returns:
    (what the seam runs, the Choice).
  """
  if mask is None:
    return None, Choice("dense", None, 1.0, None, "no mask")
  if isinstance(mask, BlockSparseMask):
    return mask, Choice(mask.preferred, mask.layout.block_size, 1.0,
                        mask.layout.block_density, "prepared before")
  if executor == "dense":
    return np.asarray(mask).astype(bool), Choice("dense", None, 1.0, None,
                                                 "attention_backend='dense'")
  if executor in BLOCK_SPARSE_EXECUTORS:
    m = np.asarray(mask).astype(bool)
    plat = platform_name or seam.platform()
    cm = choose_kwargs.get("cost_model") or _cost_model(plat, choose_kwargs.get(
        "dtype", jnp.float32), choose_kwargs.get("head_dim"))
    s, b, lay = _best_block(m, cm, choose_kwargs.get("block_sizes") or BLOCK_SIZES.get(
        plat, BLOCK_SIZES["cpu"])) or (1.0, m.shape[-1], layout_lib.from_mask(
            m, m.shape[-1]))
    return (BlockSparseMask.from_layout(lay, preferred=executor),
            Choice(executor, b, s, lay.block_density, f"attention_backend={executor!r}"))
  if executor != "auto":
    raise ValueError(f"Unknown executor {executor!r}; use 'auto', 'dense' or one of "
                     f"{BLOCK_SPARSE_EXECUTORS}.")
  if calibrate:
    if shape is None:
      raise ValueError("prepare(calibrate=True) needs shape=(batch, heads, head_dim).")
    c = calibrated_choice(mask, *shape)
    lay = layout_lib.from_mask(mask, c.block_size) if c.block_size else None
  else:
    c, lay = choose(mask, platform_name=platform_name, **choose_kwargs)
  if c.executor == "dense":
    return np.asarray(mask).astype(bool), c
  if lay is None:  # cuDNN windows: the layout is still needed for fallbacks.
    lay = layout_lib.from_mask(mask, 128)
  return BlockSparseMask.from_layout(lay, preferred=c.executor), c


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
  return prepare_with_choice(mask, platform_name=platform_name, calibrate=calibrate,
                             shape=shape, **choose_kwargs)[0]


def prepare_masks(masks: Any, num_layers: int, **kwargs) -> tuple[Any, ...]:
  """`prepare` applied to each layer of a mask pytree (`masks.tree.normalize`); layers
  sharing one mask share one prepared object.

  Args:
    masks: a mask pytree (bool leaves, None = dense).
    num_layers: the model's layers.
    **kwargs: passed to `prepare`.

  Returns:
    A per-layer tuple of `BlockSparseMask` objects, bool arrays or None.
  """
  per_layer = tree.normalize(masks, num_layers)
  done: dict[int, Any] = {}
  out = []
  for m in per_layer:
    if id(m) not in done:
      done[id(m)] = prepare(m, **kwargs)
    out.append(done[id(m)])
  return tuple(out)

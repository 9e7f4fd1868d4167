"""Section (a): attention alone, dense vs masked vs block-sparse, fwd and fwd+bwd."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn import attention
from sparse_attn.attention.kernels import cpu as cpu_kernel
from sparse_attn.bench import timing
from sparse_attn.masks import patterns


def _variants(obj, mask):
  """The attention calls compared, each (q, k, v) [B, L, H, D] -> [B, L, H, D].

  'blocksparse' is what backend='blocksparse' runs here (on CPU: the compiled kernel when
  it builds); 'blocksparse_xla' is the pure-JAX executor that GPU / TPU lower, timed on
  this host too.
  """
  mk = jnp.asarray(mask)
  return {
      "dense": lambda q, k, v: attention.dot_product_attention(q, k, v),
      "masked": lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mk),
      "blocksparse": lambda q, k, v: attention.dot_product_attention(
          q, k, v, mask=obj, backend="blocksparse"),
      "blocksparse_xla": lambda q, k, v: attention.attend(
          obj.plan, q, k, v, gmasks=obj.gmasks, impl="xla")}


def _speedups(row: dict, t: dict, rho: float, auto, block_size: int) -> None:
  """Adds speed-ups over masked dense (wall and CPU time) and their fraction of 1 / rho."""
  for mode in ("fwd", "fwdbwd"):
    s = t[f"masked/{mode}"]["median"] / t[f"blocksparse/{mode}"]["median"]
    s_cpu = t[f"masked/{mode}"]["cpu"] / t[f"blocksparse/{mode}"]["cpu"]
    row[f"speedup_{mode}"] = s
    row[f"speedup_{mode}_cpu"] = s_cpu
    row[f"of_ideal_{mode}"] = s * rho
    row[f"of_ideal_{mode}_cpu"] = s_cpu * rho
    s_xla = t[f"masked/{mode}"]["median"] / t[f"blocksparse_xla/{mode}"]["median"]
    row[f"of_ideal_{mode}_xla"] = s_xla * rho
    # 'auto' runs dense unless the chooser picked block-sparse (at this block size).
    same_b = auto.block_size == block_size
    row[f"auto_speedup_{mode}"] = (s if auto.executor == "blocksparse" and same_b else
                                   1.0 if auto.executor == "dense" else None)


def bench_attention(lengths: Sequence[int], windows: Sequence[int], batch: int, heads: int,
                    head_dim: int, block_size: int | None, repeats: int) -> list[dict]:
  """dense (no mask) / masked dense / block-sparse attention, forward and fwd+bwd.

  For each L in lengths and band half-width w < L in windows: q, k, v, and the cotangent
  weights are random [batch, L, heads, head_dim] float32; the mask is the [L, L] band
  ±w, tiled at block_size (None: the block size the CPU chooser picks). fwd+bwd is the
  gradient of sum(attention(q, k, v) * w) for q, k, v. Returns one row per (L, w) with
  the densities, the `timing.interleaved` times of every "variant/mode", and the
  speed-ups of block-sparse over masked dense (of ideal = speed-up x rho_block).
  """
  rows = []
  rng = np.random.default_rng(0)
  for length in lengths:
    q, k, v, w = (jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)),
                              jnp.float32) for _ in range(4))
    for win in windows:
      if win >= length:
        continue
      mask = patterns.window(length, win)
      if block_size:
        obj = attention.BlockSparseMask.from_mask(mask, block_size)
      else:
        _, lay = attention.choose(mask, platform_name="cpu", min_speedup=0.0)
        obj = attention.BlockSparseMask.from_layout(lay)
      lay = obj.layout
      auto, _ = attention.choose(mask, platform_name="cpu")   # What backend='auto' runs.
      fns = {}
      for name, attn in _variants(obj, mask).items():
        fwd = jax.jit(attn)
        fb = jax.jit(jax.grad(lambda q, k, v, attn=attn: jnp.sum(attn(q, k, v) * w),
                              argnums=(0, 1, 2)))
        fns[f"{name}/fwd"] = (lambda f=fwd: f(q, k, v))
        fns[f"{name}/fwdbwd"] = (lambda f=fb: f(q, k, v))
      t = timing.interleaved(fns, repeats)
      rho = lay.block_density
      row = {"L": length, "window": win, "block_size": lay.block_size, "batch": batch,
             "heads": heads, "head_dim": head_dim, "rho_elem": lay.element_density,
             "rho_block": rho, "slots": obj.plan.num_slots, "auto": auto.executor,
             "auto_block_size": auto.block_size,
             "cpu_kernel": bool(jax.default_backend() == "cpu" and not
                                cpu_kernel.unsupported(q, k, v)),
             "times": t}
      _speedups(row, t, rho, auto, lay.block_size)
      rows.append(row)
      print(f"[attention] L={length} w={win} b={lay.block_size} rho_block={rho:.3f} "
            f"fwd x{row['speedup_fwd']:.2f} ({row['of_ideal_fwd']:.2f} of ideal) "
            f"fwd+bwd x{row['speedup_fwdbwd']:.2f} ({row['of_ideal_fwdbwd']:.2f}); "
            f"pure-JAX executor {row['of_ideal_fwd_xla']:.2f} / "
            f"{row['of_ideal_fwdbwd_xla']:.2f} of ideal",
            flush=True)
  return rows

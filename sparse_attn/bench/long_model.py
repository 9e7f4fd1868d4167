"""Section (b): a small BERT at long L with a band mask, and the Amdahl bound of its steps.

The attention share f of a step is measured two ways: (i) 1 - t(model with the attention
core replaced by q + k + v) / t(model); (ii) layers x t(one attention call alone) /
t(model). The Amdahl bound uses (i): S_e2e <= 1 / ((1 - f) + f * rho_block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn import attention
from sparse_attn.attention.kernels import cpu as cpu_kernel
from sparse_attn import model as model_lib
from sparse_attn.bench import timing
from sparse_attn.bench.flops import model_flops
from sparse_attn.bench.model_steps import model_fns
from sparse_attn.masks import patterns


def _noop_backend(q, k, v, **_):
  """Attention core replaced by a (nearly) free op that still uses q, k and v, so that
  XLA keeps their projections: the step minus the attention core."""
  return (q + k + v).astype(v.dtype)


def _configs(length, layers, hidden, heads):
  """(plain, backend 'auto', backend 'bench_noop') BertConfigs of the benchmarked model."""
  base = dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, intermediate_size=4 * hidden,
              max_position_embeddings=max(512, length), hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
  # 'auto' runs a BlockSparseMask on its preferred executor ('dense' would run it as the
  # dense reference); array masks and None run dense under 'auto' on CPU.
  return (model_lib.BertConfig(**base),
          model_lib.BertConfig(**base, attention_backend="auto"),
          model_lib.BertConfig(**base, attention_backend="bench_noop"))


def _block_mask(mask, length, window, block_size):
  """The band mask as a BlockSparseMask at block_size (0: the block size 'auto' picks)."""
  if block_size:
    return attention.BlockSparseMask.from_mask(mask, block_size)
  obj = attention.prepare(mask, platform_name="cpu")
  if not isinstance(obj, attention.BlockSparseMask):
    raise ValueError(f"The chooser runs window {window} at L={length} dense.")
  return obj


def _mode_summary(t, mode, mult, layers, rho, cfg, batch, length, peak) -> dict:
  """Attention share, Amdahl bound, speed-up, tokens/s and MFU of one step kind."""
  tm = t[f"masked/{mode}"]["median"]
  f_noop = max(0.0, 1.0 - t[f"no_attention_core/{mode}"]["median"] / tm)
  f_calls = min(1.0, layers * t[f"attention_call/{mode}"]["median"] / tm)
  bound = 1.0 / ((1.0 - f_noop) + f_noop * rho)
  s = tm / t[f"blocksparse/{mode}"]["median"]
  flops_dense = mult * model_flops(cfg, batch, length)
  flops_sparse = mult * model_flops(cfg, batch, length, rho)
  tb = t[f"blocksparse/{mode}"]["median"]
  return {
      "attention_share_noop": f_noop, "attention_share_calls": f_calls,
      "amdahl_bound": bound, "speedup": s, "of_amdahl": s / bound,
      "speedup_vs_unmasked_dense": t[f"dense/{mode}"]["median"] / tb,
      "tokens_per_s": {k: batch * length / t[f"{k}/{mode}"]["median"]
                       for k in ("dense", "masked", "blocksparse")},
      "mfu_dense_equivalent": {k: flops_dense / t[f"{k}/{mode}"]["median"] / peak
                               for k in ("dense", "masked", "blocksparse")},
      "mfu_density_scaled_blocksparse": flops_sparse / tb / peak,
  }


def bench_long_model(length: int, window: int, batch: int, layers: int, hidden: int,
                     heads: int, block_size: int, repeats: int, peak: float) -> dict:
  """A small BERT at long L with a band mask: dense / masked / block-sparse steps.

  The model has `layers` layers of width `hidden` with `heads` heads (FFN 4 x hidden), on
  token ids [batch, length]; the mask is the [L, L] band ±window (block_size 0: the
  block size backend='auto' picks). Also times the model with no attention core and one
  attention call alone on q [batch, length, heads, hidden / heads]. peak is the matmul
  rate (FLOP/s) MFU divides by. Returns the shapes, densities, times and, per "infer" /
  "train", the attention share, Amdahl bound, speed-up, tokens/s and MFU.
  """
  attention.register_backend("bench_noop")(_noop_backend)
  cfg, cfg_auto, cfg_noop = _configs(length, layers, hidden, heads)
  mask = patterns.window(length, window)
  obj = _block_mask(mask, length, window, block_size)
  block_size = obj.layout.block_size
  rho = obj.layout.block_density
  variants = {"dense": (cfg, None), "masked": (cfg, jnp.asarray(mask)),
              "blocksparse": (cfg_auto, obj), "no_attention_core": (cfg_noop, None)}
  fns = {}
  for name, (c, m) in variants.items():
    inf, tr = model_fns(c, batch, length, m)
    fns[f"{name}/infer"], fns[f"{name}/train"] = inf, tr
  # One attention call alone, on the model's shapes (method ii of the share).
  rng = np.random.default_rng(2)
  hd = hidden // heads
  q = jnp.asarray(rng.standard_normal((batch, length, heads, hd)), jnp.float32)
  mj = jnp.asarray(mask)
  att = lambda q, m: attention.dot_product_attention(q, q, q, mask=m)
  att_f = jax.jit(att)
  att_g = jax.jit(jax.grad(lambda q, m: jnp.sum(att(q, m)), argnums=0))
  fns["attention_call/infer"] = lambda: att_f(q, mj)
  fns["attention_call/train"] = lambda: att_g(q, mj)
  t = timing.interleaved(fns, repeats)
  out = {"L": length, "window": window, "batch": batch, "layers": layers,
         "hidden": hidden, "heads": heads, "block_size": block_size, "rho_block": rho,
         "rho_elem": obj.layout.element_density,
         "cpu_kernel": bool(jax.default_backend() == "cpu" and
                            not cpu_kernel.unsupported(q, q, q)),
         "times": t}
  for mode, mult in (("infer", 1.0), ("train", 3.0)):
    out[mode] = m = _mode_summary(t, mode, mult, layers, rho, cfg, batch, length, peak)
    print(f"[long model] {mode}: share f={m['attention_share_noop']:.2f} (calls "
          f"{m['attention_share_calls']:.2f}) Amdahl {m['amdahl_bound']:.2f}x, "
          f"block-sparse x{m['speedup']:.2f} = {m['of_amdahl']:.2f} of bound", flush=True)
  return out

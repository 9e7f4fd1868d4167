"""Section (g), one GPU: the Pallas block-sparse kernel against cuDNN flash attention.

`python -m sparse_attn.bench.gpu --out DIR` (scripts/device_check.sh runs it) times, in one
process, forward and forward + backward of attention alone on q, k, v [B, L, H, D]
(bfloat16) at each length L:

  cudnn          dense flash attention, `jax.nn.dot_product_attention(implementation=
                 'cudnn')` (no mask: the dense baseline the speed-ups divide)
  blocksparse    the Pallas kernel (`kernels.gpu`, through the 'blocksparse' executor)
  dense_masked   the dense reference under the same mask (what 'dense' runs for a mask
                 array; skipped where its [B, H, L, L] scores would not fit)

for two layouts of block density rho ~ 0.1 at block size b: 'band_global' (a band +-128
plus the fewest leading global tokens, in whole blocks, that bring rho near 0.1; partial
tiles on the band's edges) and 'random_blocks' (whole tiles drawn at random with
probability ~ rho, the diagonal always on: a learned block layout's shape). Per row: the
speed-up t(cudnn) / t(blocksparse), the ideal 1 / rho and the fraction of it reached
(speed-up x rho), and the kernel's largest error against the masked reference. Then a
MiniLM-shape train step (6 layers, hidden 384, 12 heads, AdamW; L = 2048) with dense
cuDNN attention vs the kernel on the band_global layout.

Writes gpu_results.json and gpu_results.md to DIR. `--quick` is the smoke mode the tests
run on CPU: tiny shapes, the kernel in Pallas's interpreter and XLA's dense attention in
place of cuDNN (its numbers measure nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn import attention
from sparse_attn import model as model_lib
from sparse_attn.attention.kernels.blocksparse import executor
from sparse_attn.bench import timing
from sparse_attn.bench.model_steps import model_fns
from sparse_attn.masks import patterns


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What one run measures."""
  lengths: tuple[int, ...] = (4096, 8192)
  batch: int = 1
  heads: int = 12
  head_dim: int = 64
  block: int = 64
  window: int = 128
  density: float = 0.1
  train_length: int = 2048
  train_batch: int = 4
  train_layers: int = 6
  train_hidden: int = 384
  train_heads: int = 12
  repeats: int = 10
  mem_limit_gb: float = 24.0    # Largest masked-reference score memory attempted.


QUICK = Shapes(lengths=(128,), batch=1, heads=2, head_dim=16, block=32, window=16,
               density=0.3, train_length=128, train_batch=1, train_layers=2,
               train_hidden=32, train_heads=2, repeats=1)


def band_global(length: int, block: int, window: int, density: float
                ) -> tuple[np.ndarray, int]:
  """Band |i - j| <= window plus g leading global tokens (g a multiple of the block,
  chosen so that the block density is nearest `density`): (bool [L, L], g)."""
  nk = -(-length // block)
  idx = np.arange(nk)
  band = np.abs(idx[:, None] - idx[None, :]) <= -(-window // block)
  best = None
  for gb in range(nk + 1):
    rho = np.mean(band | (idx[:, None] < gb) | (idx[None, :] < gb))
    if best is None or abs(rho - density) < best[0]:
      best = (abs(rho - density), gb)
  g = min(best[1] * block, length)
  return patterns.window(length, window) | patterns.global_tokens(length, g), g


def random_blocks(length: int, block: int, density: float, seed: int = 0) -> np.ndarray:
  """Whole b x b tiles on with probability ~ density (the diagonal always): bool [L, L]."""
  nk = -(-length // block)
  rng = np.random.default_rng(seed)
  on = rng.random((nk, nk)) < max(0.0, (density * nk - 1) / max(nk - 1, 1))
  on[np.arange(nk), np.arange(nk)] = True
  return np.kron(on, np.ones((block, block), bool))[:length, :length]


def _dense_impl() -> str | None:
  return "cudnn" if jax.default_backend() == "gpu" else None   # None: XLA (smoke mode).


def _fwd_bwd(fn, w):
  """Jitted q, k, v -> (dq, dk, dv) of sum(fn(q, k, v) * w)."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench_attention(s: Shapes, length: int, name: str, mask: np.ndarray) -> dict:
  """Times cudnn / blocksparse / dense_masked at one length and layout (see the module
  docstring); returns the row: densities, median ms, speed-ups, ideal, fraction, error."""
  obj = attention.BlockSparseMask.from_mask(mask, s.block)
  rho = obj.layout.block_density
  rng = np.random.default_rng(0)
  shape = (s.batch, length, s.heads, s.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  impl = _dense_impl()
  fns = {
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl),
      "blocksparse": lambda q, k, v: executor.attend(obj.plan, q, k, v, impl="gpu"),
  }
  score_gb = 3 * s.batch * s.heads * length ** 2 * 4 / 1e9
  if score_gb <= s.mem_limit_gb:
    dense_mask = jnp.asarray(mask)
    fns["dense_masked"] = lambda q, k, v: attention.dot_product_attention(
        q, k, v, mask=dense_mask, backend="dense")
  thunks = {}
  for key, fn in fns.items():
    fwd, fb = jax.jit(fn), _fwd_bwd(fn, w)
    thunks[f"{key}/fwd"] = lambda f=fwd: f(q, k, v)
    thunks[f"{key}/fwd_bwd"] = lambda f=fb: f(q, k, v)
  t = timing.interleaved(thunks, s.repeats)
  row = {"length": length, "layout": name, "block_size": s.block, "block_density": rho,
         "element_density": float(np.mean(mask)),
         "ms": {k: 1e3 * v["median"] for k, v in t.items()}, "ideal": 1.0 / rho}
  for mode in ("fwd", "fwd_bwd"):
    sp = t[f"cudnn/{mode}"]["median"] / t[f"blocksparse/{mode}"]["median"]
    row[f"speedup_{mode}"] = sp
    row[f"of_ideal_{mode}"] = sp * rho
  if "dense_masked" in fns:
    ref = jax.jit(fns["dense_masked"])(q, k, v).astype(jnp.float32)
    out = jax.jit(fns["blocksparse"])(q, k, v).astype(jnp.float32)
    row["max_abs_err_vs_dense_masked"] = float(jnp.max(jnp.abs(out - ref)))
  return row


def _bench_backends(impl):
  """Executors for the train step: dense flash attention and the Pallas kernel itself
  (the benchmark's ids have no padding, so both drop key_valid, all True)."""
  def dense(q, k, v, *, mask, key_valid, bias, dropout, precision):
    del mask, key_valid, bias, dropout, precision
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)

  def kernel(q, k, v, *, mask, key_valid, bias, dropout, precision):
    if mask is None:   # Parameter initialisation, which passes no masks.
      return dense(q, k, v, mask=mask, key_valid=key_valid, bias=bias, dropout=dropout,
                   precision=precision)
    return executor.attend(mask.plan, q, k, v, impl="gpu")
  return {"bench_dense_flash": dense, "bench_gpu_kernel": kernel}


def bench_train_step(s: Shapes) -> dict:
  """MiniLM-shape train step: dense flash attention vs the kernel on band_global."""
  backends = _bench_backends(_dense_impl())
  for name, fn in backends.items():
    attention.register_backend(name)(fn)
  try:
    base = dict(vocab_size=30522, hidden_size=s.train_hidden,
                num_hidden_layers=s.train_layers, num_attention_heads=s.train_heads,
                intermediate_size=4 * s.train_hidden,
                max_position_embeddings=max(512, s.train_length), hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, dtype=jnp.bfloat16)
    mask, g = band_global(s.train_length, s.block, s.window, s.density)
    obj = attention.BlockSparseMask.from_mask(mask, s.block)
    fns = {}
    for name, backend, m in (("dense", "bench_dense_flash", None),
                             ("blocksparse", "bench_gpu_kernel", obj)):
      cfg = model_lib.BertConfig(**base, attention_backend=backend)
      fns[name] = model_fns(cfg, s.train_batch, s.train_length, m)[1]
    t = timing.interleaved(fns, s.repeats)
  finally:
    for name in backends:
      attention.BACKENDS.pop(name, None)
  rho = obj.layout.block_density
  return {"length": s.train_length, "batch": s.train_batch, "layers": s.train_layers,
          "hidden": s.train_hidden, "heads": s.train_heads, "layout": "band_global",
          "global_tokens": g, "block_size": s.block, "block_density": rho,
          "ms": {k: 1e3 * v["median"] for k, v in t.items()},
          "speedup": t["dense"]["median"] / t["blocksparse"]["median"]}


def markdown(res: dict) -> str:
  """The results as Markdown tables."""
  d = res["dense_impl"]
  lines = [f"Device: {res['device']}; jax {res['jax']}; dense attention: {d}.", "",
           f"| L | layout | b | rho | {d} fwd ms | kernel fwd ms | {d} f+b ms | "
           "kernel f+b ms | masked dense f+b ms | speed-up f+b | 1/rho | of ideal f+b | "
           "max err |", "|" + " --- |" * 13]
  nan = float("nan")
  for r in res["attention"]:
    ms = r["ms"]
    cells = [str(r["length"]), r["layout"], str(r["block_size"]),
             f"{r['block_density']:.3f}",
             *(f"{ms.get(k, nan):.3f}" for k in ("cudnn/fwd", "blocksparse/fwd",
                                                "cudnn/fwd_bwd", "blocksparse/fwd_bwd",
                                                "dense_masked/fwd_bwd")),
             f"{r['speedup_fwd_bwd']:.2f}", f"{r['ideal']:.1f}",
             f"{r['of_ideal_fwd_bwd']:.2f}",
             f"{r.get('max_abs_err_vs_dense_masked', nan):.2e}"]
    lines.append("| " + " | ".join(cells) + " |")
  if res.get("train_step"):
    r = res["train_step"]
    lines += ["", "| train step | L | B | rho | dense ms | block-sparse ms | speed-up |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              f"| MiniLM shape ({r['layers']} x {r['hidden']}, {r['heads']} heads) | "
              f"{r['length']} | {r['batch']} | {r['block_density']:.3f} | "
              f"{r['ms']['dense']:.2f} | {r['ms']['blocksparse']:.2f} | "
              f"{r['speedup']:.2f} |"]
  return "\n".join(lines) + "\n"


def run(s: Shapes, out_dir: pathlib.Path, train: bool = True) -> dict:
  """Runs the section and writes gpu_results.json / gpu_results.md into out_dir."""
  dev = jax.devices()[0]
  res = {"device": f"{dev.platform} {getattr(dev, 'device_kind', '')}".strip(),
         "jax": jax.__version__, "machine": timing.machine_description(),
         "dense_impl": _dense_impl() or "xla",
         "shapes": dataclasses.asdict(s), "attention": [], "train_step": None}
  def save():   # After every row, so that a run cut short keeps what it measured.
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_results.json").write_text(json.dumps(res, indent=1))
    (out_dir / "gpu_results.md").write_text(markdown(res))

  for length in s.lengths:
    mask, g = band_global(length, s.block, s.window, s.density)
    row = bench_attention(s, length, "band_global", mask)
    row["global_tokens"] = g
    res["attention"].append(row)
    save()
    res["attention"].append(bench_attention(
        s, length, "random_blocks", random_blocks(length, s.block, row["block_density"])))
    save()
  if train:
    res["train_step"] = bench_train_step(s)
    save()
  return res


def main(argv=None) -> dict:
  """Command line: --out DIR (default $OUT, else .), --quick, --lengths, --repeats,
  --no-train. Prints the table and the ratios."""
  p = argparse.ArgumentParser(prog="python -m sparse_attn.bench.gpu",
                              description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--quick", action="store_true", help="smoke mode (tiny, interpreted)")
  p.add_argument("--lengths", default="", help="comma-separated L (default 4096,8192)")
  p.add_argument("--repeats", type=int, default=0)
  p.add_argument("--no-train", action="store_true")
  args = p.parse_args(argv)
  s = QUICK if args.quick else Shapes()
  if args.lengths:
    s = dataclasses.replace(s, lengths=tuple(int(x) for x in args.lengths.split(",")))
  if args.repeats:
    s = dataclasses.replace(s, repeats=args.repeats)
  if args.quick and jax.default_backend() != "gpu":
    os.environ["SPARSE_ATTN_GPU_INTERPRET"] = "1"
  res = run(s, pathlib.Path(args.out), train=not args.no_train)
  sys.stdout.write(markdown(res))
  for r in res["attention"]:
    print(f"L={r['length']} {r['layout']}: speed-up vs {res['dense_impl']} fwd "
          f"{r['speedup_fwd']:.2f}x, fwd+bwd {r['speedup_fwd_bwd']:.2f}x; ideal 1/rho "
          f"{r['ideal']:.1f}x; fraction of ideal {r['of_ideal_fwd_bwd']:.2f}")
  if res["train_step"]:
    print(f"train step L={s.train_length}: speed-up {res['train_step']['speedup']:.2f}x "
          f"(rho {res['train_step']['block_density']:.3f})")
  return res


if __name__ == "__main__":
  main()

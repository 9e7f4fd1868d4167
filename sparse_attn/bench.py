"""Step-time benchmark: attention alone and whole BERT steps, dense vs masked vs block-sparse
vs pruned, against the limits the sparsity allows (1 / rho_block, Amdahl, FLOP ratio).

  python -m sparse_attn.bench --out /tmp/bench              # full run (tens of minutes)
  python -m sparse_attn.bench --out /tmp/bench --quick      # tiny shapes, seconds
  python -m sparse_attn.bench --out /tmp/bench --only torch --torch   # vs PyTorch

Writes results.json, results.md (tables) and speedup.png (attention speed-up vs block
density with the ideal 1 / rho_block line) to --out.

Timing: every function is jitted and run once (compile + warm-up, excluded), then
`--repeats` times with block_until_ready; we report the median (and min, and process CPU
time, which is robust when other processes share the machine). Dropout is off (both
frameworks), so steps compare compute only.

Attention share f of a step is measured two ways: (i) 1 - t(model with the attention core
replaced by q + k + v) / t(model); (ii) layers x t(one attention call alone) / t(model). The
Amdahl bound uses (i): S_e2e <= 1 / ((1 - f) + f * rho_block).

FLOPs (analytic, forward; backward = 2 x forward): weights 2 * B * L * P_layer per layer
(QKV, output, FFN matmuls) plus attention 4 * B * H * L^2 * d_head per layer (QK^T and PV);
"dense-equivalent" counts the attention term in full, "density-scaled" multiplies it by
rho_block. MFU divides by the machine's own measured matmul peak (a big jnp.dot).

Shape legend: B batch, L sequence length, H heads, D head dim.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

import numpy as np

from sparse_attn import hostmem

# jax is imported after the command line sets XLA_FLAGS (see `main`).
jax = jnp = None


def _import_jax():
  global jax, jnp  # pylint: disable=global-statement
  import jax as jax_  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp_  # pylint: disable=import-outside-toplevel
  jax, jnp = jax_, jnp_


# ---- timing ---------------------------------------------------------------------------

def timeit(fn: Callable[..., Any], *args, repeats: int = 5) -> dict[str, float]:
  """Median / min wall time and median process CPU time of fn(*args), after warm-up."""
  jax.block_until_ready(fn(*args))
  walls, cpus = [], []
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  return {"median": float(np.median(walls)), "min": float(np.min(walls)),
          "cpu": float(np.median(cpus))}


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict]:
  """Times several thunks round-robin (so machine load hits them alike)."""
  for f in fns.values():
    jax.block_until_ready(f())
  walls = {k: [] for k in fns}
  cpus = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(f())
      walls[k].append(time.perf_counter() - t0)
      cpus[k].append(time.process_time() - c0)
  return {k: {"median": float(np.median(walls[k])), "min": float(np.min(walls[k])),
              "cpu": float(np.median(cpus[k]))} for k in fns}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul rate of this machine in FLOP/s (one big jnp.dot)."""
  x = jnp.ones((n, n), jnp.float32)
  t = timeit(jax.jit(lambda a: a @ a), x, repeats=repeats)
  return 2 * n ** 3 / t["min"]


# ---- analytic FLOPs -------------------------------------------------------------------

def model_flops(cfg, batch: int, length: int, rho: float = 1.0) -> float:
  """Forward FLOPs of the encoder (+ pooler): weight matmuls + rho * attention matmuls."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  total = 0.0
  for i in range(cfg.num_hidden_layers):
    h = cfg.layer_heads(i)
    hd = h * cfg.head_dim
    if h:
      total += 2 * batch * length * (3 * d * hd + hd * d)        # QKV + output
      total += rho * 4 * batch * h * length ** 2 * cfg.head_dim   # QK^T, PV
    total += 2 * batch * length * 2 * d * f                       # FFN
  return total + 2 * batch * d * d


# ---- (a) attention alone --------------------------------------------------------------

def bench_attention(lengths, windows, batch, heads, head_dim, block_size, repeats):
  """dense (no mask) / masked dense / block-sparse attention, forward and fwd+bwd."""
  # pylint: disable-next=import-outside-toplevel
  from sparse_attn import accel, blocksparse, cpu_kernel
  from sparse_attn import attention as attention_lib  # pylint: disable=import-outside-toplevel
  from sparse_attn.masks import patterns  # pylint: disable=import-outside-toplevel
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
        obj = blocksparse.BlockSparseMask.from_mask(mask, block_size)
      else:
        _, lay = accel.choose(mask, platform_name="cpu", min_speedup=0.0)
        obj = blocksparse.BlockSparseMask.from_layout(lay)
      lay = obj.layout
      auto, _ = accel.choose(mask, platform_name="cpu")   # What backend='auto' runs.
      mk = jnp.asarray(mask)
      # 'blocksparse' is what backend='blocksparse' runs here (on CPU: the compiled
      # kernel when it builds); 'blocksparse_xla' is the pure-JAX executor that GPU / TPU
      # lower, timed on this host too.
      variants = {
          "dense": lambda q, k, v: attention_lib.dot_product_attention(q, k, v),
          "masked": lambda q, k, v: attention_lib.dot_product_attention(q, k, v, mask=mk),
          "blocksparse": lambda q, k, v: attention_lib.dot_product_attention(
              q, k, v, mask=obj, backend="blocksparse"),
          "blocksparse_xla": lambda q, k, v: blocksparse.attend(
              obj.plan, q, k, v, gmasks=obj.gmasks, impl="xla")}
      fns = {}
      for name, attn in variants.items():
        fwd = jax.jit(attn)
        fb = jax.jit(jax.grad(lambda q, k, v, attn=attn: jnp.sum(attn(q, k, v) * w),
                              argnums=(0, 1, 2)))
        fns[f"{name}/fwd"] = (lambda f=fwd: f(q, k, v))
        fns[f"{name}/fwdbwd"] = (lambda f=fb: f(q, k, v))
      t = interleaved(fns, repeats)
      rho = lay.block_density
      row = {"L": length, "window": win, "block_size": lay.block_size, "batch": batch,
             "heads": heads, "head_dim": head_dim, "rho_elem": lay.element_density,
             "rho_block": rho, "slots": obj.plan.num_slots, "auto": auto.executor,
             "auto_block_size": auto.block_size,
             "cpu_kernel": bool(jax.default_backend() == "cpu" and not
                                cpu_kernel.unsupported(q, k, v)),
             "times": t}
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
        same_b = auto.block_size == lay.block_size
        row[f"auto_speedup_{mode}"] = (s if auto.executor == "blocksparse" and same_b else
                                       1.0 if auto.executor == "dense" else None)
      rows.append(row)
      print(f"[attention] L={length} w={win} b={lay.block_size} rho_block={rho:.3f} "
            f"fwd x{row['speedup_fwd']:.2f} ({row['of_ideal_fwd']:.2f} of ideal) "
            f"fwd+bwd x{row['speedup_fwdbwd']:.2f} ({row['of_ideal_fwdbwd']:.2f}); "
            f"pure-JAX executor {row['of_ideal_fwd_xla']:.2f} / "
            f"{row['of_ideal_fwdbwd_xla']:.2f} of ideal",
            flush=True)
  return rows


# ---- (b) whole model steps ------------------------------------------------------------

def _noop_backend(q, k, v, **_):
  """Attention core replaced by a (nearly) free op that still uses q, k and v, so that
  XLA keeps their projections: the step minus the attention core."""
  return (q + k + v).astype(v.dtype)


def _model_fns(cfg, batch, length, masks, mesh=None):
  """Jitted (inference, train step) thunks of BertForSequenceClassification."""
  import optax  # pylint: disable=import-outside-toplevel
  from sparse_attn import model as model_lib  # pylint: disable=import-outside-toplevel
  net = model_lib.BertForSequenceClassification(cfg, num_labels=2)
  ids = np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, length)).astype(
      np.int32)
  labels = np.zeros((batch,), np.int32)
  params = jax.jit(lambda i: net.init(jax.random.PRNGKey(0), i))(ids[:1])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt = jax.jit(tx.init)(params)
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
    rep = NamedSharding(mesh, P())
    params, opt = jax.device_put((params, opt), rep)
    ids = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
    labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
  else:
    ids, labels = jnp.asarray(ids), jnp.asarray(labels)

  def loss_fn(p, ids, labels, masks):
    logits, _ = net.apply({"params": p}, ids, masks=masks, deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train(p, o, ids, labels, masks):
    loss, g = jax.value_and_grad(loss_fn)(p, ids, labels, masks)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  infer = jax.jit(lambda p, ids, masks: net.apply({"params": p}, ids, masks=masks,
                                                  deterministic=True)[0])
  return (lambda: infer(params, ids, masks)), (lambda: train(params, opt, ids, labels,
                                                             masks))


def bench_long_model(length, window, batch, layers, hidden, heads, block_size, repeats,
                     peak):
  """A small BERT at long L with a band mask: dense / masked / block-sparse steps."""
  from sparse_attn import attention as attention_lib  # pylint: disable=import-outside-toplevel
  from sparse_attn import blocksparse, cpu_kernel  # pylint: disable=import-outside-toplevel
  from sparse_attn import model as model_lib  # pylint: disable=import-outside-toplevel
  from sparse_attn.masks import patterns  # pylint: disable=import-outside-toplevel
  attention_lib.register_backend("bench_noop")(_noop_backend)
  base = dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, intermediate_size=4 * hidden,
              max_position_embeddings=max(512, length), hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
  cfg = model_lib.BertConfig(**base)
  # 'auto' runs a BlockSparseMask on its preferred executor ('dense' would run it as the
  # dense reference); array masks and None run dense under 'auto' on CPU.
  cfg_auto = model_lib.BertConfig(**base, attention_backend="auto")
  cfg_noop = model_lib.BertConfig(**base, attention_backend="bench_noop")
  mask = patterns.window(length, window)
  if block_size:
    obj = blocksparse.BlockSparseMask.from_mask(mask, block_size)
  else:  # The block size backend='auto' would pick.
    from sparse_attn import accel  # pylint: disable=import-outside-toplevel
    obj = accel.prepare(mask, platform_name="cpu")
    if not isinstance(obj, blocksparse.BlockSparseMask):
      raise ValueError(f"The chooser runs window {window} at L={length} dense.")
  block_size = obj.layout.block_size
  rho = obj.layout.block_density
  variants = {"dense": (cfg, None), "masked": (cfg, jnp.asarray(mask)),
              "blocksparse": (cfg_auto, obj), "no_attention_core": (cfg_noop, None)}
  fns = {}
  for name, (c, m) in variants.items():
    inf, tr = _model_fns(c, batch, length, m)
    fns[f"{name}/infer"], fns[f"{name}/train"] = inf, tr
  # One attention call alone, on the model's shapes (method ii of the share).
  rng = np.random.default_rng(2)
  hd = hidden // heads
  q = jnp.asarray(rng.standard_normal((batch, length, heads, hd)), jnp.float32)
  mj = jnp.asarray(mask)
  att = lambda q, m: attention_lib.dot_product_attention(q, q, q, mask=m)
  att_f = jax.jit(att)
  att_g = jax.jit(jax.grad(lambda q, m: jnp.sum(att(q, m)), argnums=0))
  fns["attention_call/infer"] = lambda: att_f(q, mj)
  fns["attention_call/train"] = lambda: att_g(q, mj)
  t = interleaved(fns, repeats)
  out = {"L": length, "window": window, "batch": batch, "layers": layers,
         "hidden": hidden, "heads": heads, "block_size": block_size, "rho_block": rho,
         "rho_elem": obj.layout.element_density,
         "cpu_kernel": bool(jax.default_backend() == "cpu" and
                            not cpu_kernel.unsupported(q, q, q)),
         "times": t}
  for mode, mult in (("infer", 1.0), ("train", 3.0)):
    tm = t[f"masked/{mode}"]["median"]
    f_noop = max(0.0, 1.0 - t[f"no_attention_core/{mode}"]["median"] / tm)
    f_calls = min(1.0, layers * t[f"attention_call/{mode}"]["median"] / tm)
    bound = 1.0 / ((1.0 - f_noop) + f_noop * rho)
    s = tm / t[f"blocksparse/{mode}"]["median"]
    flops_dense = mult * model_flops(cfg, batch, length)
    flops_sparse = mult * model_flops(cfg, batch, length, rho)
    tb = t[f"blocksparse/{mode}"]["median"]
    out[mode] = {
        "attention_share_noop": f_noop, "attention_share_calls": f_calls,
        "amdahl_bound": bound, "speedup": s, "of_amdahl": s / bound,
        "speedup_vs_unmasked_dense": t[f"dense/{mode}"]["median"] / tb,
        "tokens_per_s": {k: batch * length / t[f"{k}/{mode}"]["median"]
                         for k in ("dense", "masked", "blocksparse")},
        "mfu_dense_equivalent": {k: flops_dense / t[f"{k}/{mode}"]["median"] / peak
                                 for k in ("dense", "masked", "blocksparse")},
        "mfu_density_scaled_blocksparse": flops_sparse / tb / peak,
    }
    print(f"[long model] {mode}: share f={f_noop:.2f} (calls {f_calls:.2f}) Amdahl "
          f"{bound:.2f}x, block-sparse x{s:.2f} = {s / bound:.2f} of bound", flush=True)
  return out


def bench_pruned(cfg, name, lengths_batches, keep_layers, repeats, peak, mesh=None):
  """Inference and train steps with and without most attention sublayers."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  n = cfg.num_hidden_layers
  hpl = tuple(cfg.num_attention_heads if i in keep_layers else 0 for i in range(n))
  pruned = dataclasses.replace(cfg, heads_per_layer=hpl)
  rows = []
  for length, batch in lengths_batches:
    fns = {}
    for tag, c in (("full", cfg), ("pruned", pruned)):
      inf, tr = _model_fns(c, batch, length, None, mesh)
      fns[f"{tag}/infer"], fns[f"{tag}/train"] = inf, tr
    t = interleaved(fns, repeats)
    row = {"model": name, "L": length, "batch": batch, "heads_per_layer": hpl,
           "removed_fraction": 1 - len(keep_layers) / n, "times": t}
    for mode, mult in (("infer", 1.0), ("train", 3.0)):
      f_full, f_pruned = model_flops(cfg, batch, length), model_flops(pruned, batch, length)
      bound = f_full / f_pruned
      s = t[f"full/{mode}"]["median"] / t[f"pruned/{mode}"]["median"]
      s_cpu = t[f"full/{mode}"]["cpu"] / t[f"pruned/{mode}"]["cpu"]
      row[mode] = {"flop_ratio_bound": bound, "speedup": s, "of_bound": s / bound,
                   "speedup_cpu": s_cpu, "of_bound_cpu": s_cpu / bound,
                   "tokens_per_s_full": batch * length / t[f"full/{mode}"]["median"],
                   "tokens_per_s_pruned": batch * length / t[f"pruned/{mode}"]["median"],
                   "mfu_full": mult * f_full / t[f"full/{mode}"]["median"] / peak,
                   "mfu_pruned": mult * f_pruned / t[f"pruned/{mode}"]["median"] / peak}
      print(f"[pruned {name}] L={length} B={batch} {mode}: x{s:.2f} of FLOP bound "
            f"{bound:.2f} = {s / bound:.2f}", flush=True)
    rows.append(row)
  return rows


# ---- (c) PyTorch, same shapes ----------------------------------------------------------

def bench_torch(cfg, batch, length, repeats, threads, mesh=None):
  """Our dense train / inference steps vs Hugging Face BertForSequenceClassification."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  hf = transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
      max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, num_labels=2)
  tm = transformers.BertForSequenceClassification(hf)
  opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.as_tensor(np.random.default_rng(1).integers(1, cfg.vocab_size,
                                                          (batch, length)))
  labels = torch.zeros((batch,), dtype=torch.long)

  def t_train():
    tm.train()
    opt.zero_grad(set_to_none=True)
    tm(input_ids=ids, labels=labels).loss.backward()
    opt.step()

  def t_infer():
    tm.eval()
    with torch.inference_mode():
      tm(input_ids=ids)

  j_infer, j_train = _model_fns(cfg, batch, length, None, mesh)
  fns = {"jax/infer": j_infer, "torch/infer": t_infer, "jax/train": j_train,
         "torch/train": t_train}
  for f in fns.values():  # Warm-up (compile; torch allocator).
    jax.block_until_ready(f())
  t = interleaved(fns, repeats)
  out = {"L": length, "batch": batch, "torch_threads": threads,
         "torch": torch.__version__, "transformers": transformers.__version__,
         "times": t}
  for mode in ("infer", "train"):
    out[f"{mode}_ratio_jax_over_torch"] = (t[f"jax/{mode}"]["median"] /
                                           t[f"torch/{mode}"]["median"])
    print(f"[torch] L={length} B={batch} {mode}: jax/torch = "
          f"{out[f'{mode}_ratio_jax_over_torch']:.2f}", flush=True)
  return out


# ---- outputs ---------------------------------------------------------------------------

def _markdown(res: dict) -> str:
  lines = [f"# sparse_attn benchmark\n", f"Machine: {res['machine']}\n"]
  if res.get("attention"):
    lines += ["## Attention alone (B={batch}, H={heads}, D={head_dim})\n".format(
        **res["attention"][0]),
        "| L | window | b | rho_elem | rho_block | masked fwd ms | sparse fwd ms | "
        "fwd x | of ideal | masked f+b ms | sparse f+b ms | f+b x | of ideal | "
        "pure-JAX of ideal (fwd / f+b) | auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["attention"]:
      t = r["times"]
      lines.append(
          f"| {r['L']} | ±{r['window']} | {r['block_size']} | {r['rho_elem']:.3f} | "
          f"{r['rho_block']:.3f} | {t['masked/fwd']['median'] * 1e3:.1f} | "
          f"{t['blocksparse/fwd']['median'] * 1e3:.1f} | {r['speedup_fwd']:.2f} | "
          f"{r['of_ideal_fwd']:.2f} | {t['masked/fwdbwd']['median'] * 1e3:.1f} | "
          f"{t['blocksparse/fwdbwd']['median'] * 1e3:.1f} | {r['speedup_fwdbwd']:.2f} | "
          f"{r['of_ideal_fwdbwd']:.2f} | {r['of_ideal_fwd_xla']:.2f} / "
          f"{r['of_ideal_fwdbwd_xla']:.2f} | {r['auto']}"
          f"{'' if r['auto_block_size'] is None else ' b=%d' % r['auto_block_size']} |")
  if res.get("long_model"):
    r = res["long_model"]
    lines += [f"\n## BERT {r['layers']} layers, hidden {r['hidden']}, L={r['L']}, "
              f"B={r['batch']}, window ±{r['window']} (rho_block {r['rho_block']:.3f})\n",
              "| step | dense ms | masked ms | block-sparse ms | share f (no-op / calls) | "
              "Amdahl bound | speed-up | of bound | tok/s sparse | MFU dense-eq / scaled |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ("infer", "train"):
      m, t = r[mode], r["times"]
      lines.append(
          f"| {mode} | {t[f'dense/{mode}']['median'] * 1e3:.0f} | "
          f"{t[f'masked/{mode}']['median'] * 1e3:.0f} | "
          f"{t[f'blocksparse/{mode}']['median'] * 1e3:.0f} | "
          f"{m['attention_share_noop']:.2f} / {m['attention_share_calls']:.2f} | "
          f"{m['amdahl_bound']:.2f} | {m['speedup']:.2f} | {m['of_amdahl']:.2f} | "
          f"{m['tokens_per_s']['blocksparse']:.0f} | "
          f"{m['mfu_dense_equivalent']['blocksparse']:.3f} / "
          f"{m['mfu_density_scaled_blocksparse']:.3f} |")
  if res.get("pruned"):
    lines += ["\n## Attention sublayers removed\n",
              "| model | L | B | kept layers | step | full ms | pruned ms | speed-up | "
              "FLOP bound | of bound | of bound (CPU time) | MFU full |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["pruned"]:
      kept = sum(1 for h in r["heads_per_layer"] if h)
      for mode in ("infer", "train"):
        m, t = r[mode], r["times"]
        lines.append(
            f"| {r['model']} | {r['L']} | {r['batch']} | {kept}/{len(r['heads_per_layer'])}"
            f" | {mode} | {t[f'full/{mode}']['median'] * 1e3:.0f} | "
            f"{t[f'pruned/{mode}']['median'] * 1e3:.0f} | {m['speedup']:.2f} | "
            f"{m['flop_ratio_bound']:.2f} | {m['of_bound']:.2f} | {m['of_bound_cpu']:.2f} "
            f"| {m['mfu_full']:.3f} |")
  if res.get("torch"):
    lines += ["\n## Against PyTorch (transformers BertForSequenceClassification)\n",
              "| L | B | step | jax ms | torch ms | jax / torch |", "|---|---|---|---|---|---|"]
    for r in res["torch"]:
      for mode in ("infer", "train"):
        t = r["times"]
        lines.append(f"| {r['L']} | {r['batch']} | {mode} | "
                     f"{t[f'jax/{mode}']['median'] * 1e3:.0f} | "
                     f"{t[f'torch/{mode}']['median'] * 1e3:.0f} | "
                     f"{r[f'{mode}_ratio_jax_over_torch']:.2f} |")
  return "\n".join(lines) + "\n"


def _plot(res: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4.5))
  rows = res.get("attention") or []
  if rows:
    rho = np.array([r["rho_block"] for r in rows])
    for mode, marker in (("fwd", "o"), ("fwdbwd", "s")):
      ax.scatter(rho, [r[f"speedup_{mode}"] for r in rows], marker=marker,
                 label=f"block-sparse {mode} / masked dense")
    grid = np.linspace(max(rho.min() * 0.8, 1e-3), 1.0, 100)
    ax.plot(grid, 1 / grid, "k--", label="ideal 1 / rho_block")
    ax.set_xscale("log")
    ax.set_yscale("log")
  ax.set_xlabel("block density rho_block")
  ax.set_ylabel("speed-up over masked dense")
  ax.set_title("Attention alone" if rows else "Attention alone (section not run)")
  if rows:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _machine() -> str:
  import platform as platform_  # pylint: disable=import-outside-toplevel
  return (f"{platform_.processor() or platform_.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices), "
          f"load average {os.getloadavg()[0]:.1f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m sparse_attn.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--quick", action="store_true", help="tiny shapes (seconds; for tests)")
  p.add_argument("--only", default="attention,long,pruned",
                 help="comma list of sections: attention,long,pruned,torch")
  p.add_argument("--lengths", default="1024,2048,4096", help="attention-alone lengths")
  p.add_argument("--windows", default="32,64,128,256,512", help="band half-widths")
  p.add_argument("--block-size", type=int, default=0,
                 help="block size for the attention section (0 = the auto chooser's)")
  p.add_argument("--keep-layers", default="",
                 help="pruned section: layers that keep attention, e.g. 4,5 (the layers a "
                      "self-pruning run kept; default: 0, i.e. 5 of MiniLM's 6 removed)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--torch", action="store_true", help="also run the PyTorch section")
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--devices", type=int, default=0,
                 help="data-parallel over N virtual CPU devices for the MiniLM/torch "
                      "sections (sets --xla_force_host_platform_device_count)")
  p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this run")
  p.add_argument("--host-memory", default="auto", choices=hostmem.MODES,
                 help="host allocator (sparse_attn.hostmem): 'reuse' keeps freed memory "
                      "between calls, as train.py does; 'default' is glibc's own policy")
  args = p.parse_args(argv)
  flags = [os.environ.get("XLA_FLAGS", ""), args.xla_flags]
  if args.devices:
    flags.append(f"--xla_force_host_platform_device_count={args.devices}")
  os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f).strip()
  reused = hostmem.reuse_freed_memory(args.host_memory)  # Before JAX's first computation.
  _import_jax()
  sections = set(args.only.split(","))
  if args.torch:
    sections.add("torch")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  mesh = None
  if args.devices > 1:
    from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
    mesh = Mesh(np.array(jax.devices()[:args.devices]), ("data",))
  peak = matmul_peak(256 if args.quick else 2048, repeats=3 if args.quick else 5)
  res: dict[str, Any] = {"machine": _machine(), "matmul_peak_flops": peak,
                         "host_memory_reused": reused,
                         "argv": sys.argv[1:] if argv is None else list(argv)}
  print(f"machine: {res['machine']}; matmul peak {peak / 1e9:.1f} GFLOP/s; host memory "
        f"{'reused' if reused else 'glibc default'}", flush=True)
  from sparse_attn import model as model_lib  # pylint: disable=import-outside-toplevel
  if args.quick:
    minilm = model_lib.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    lb, keep = [(32, 2)], (0,)
  else:
    from sparse_attn import assets, pretrained  # pylint: disable=import-outside-toplevel
    hf = json.loads(assets.fetch("minilm/config.json").read_text())
    minilm = pretrained.config_from_hf(hf, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)
    lb, keep = [(128, 32), (512, 8)], (0,)
  if args.keep_layers:
    keep = tuple(int(x) for x in args.keep_layers.split(","))
    bad = [i for i in keep if not 0 <= i < minilm.num_hidden_layers]
    if bad:
      raise SystemExit(f"--keep-layers {bad} outside the model's "
                       f"{minilm.num_hidden_layers} layers.")
  if "attention" in sections:
    if args.quick:
      res["attention"] = bench_attention([128], [16], 1, 2, 16, 32, 1)
    else:
      res["attention"] = bench_attention(
          [int(x) for x in args.lengths.split(",")], [int(x) for x in args.windows.split(",")],
          1, 4, 64, args.block_size or None, args.repeats)
  if "long" in sections:
    if args.quick:
      res["long_model"] = bench_long_model(128, 16, 1, 2, 32, 2, 32, 2, peak)
    else:
      res["long_model"] = bench_long_model(4096, 128, 1, 4, 256, 4, args.block_size or 0,
                                           args.repeats, peak)
  if "pruned" in sections:
    res["pruned"] = bench_pruned(minilm, "quick" if args.quick else "MiniLM-L6", lb, keep,
                                 2 if args.quick else args.repeats, peak, mesh)
  if "torch" in sections:
    res["torch"] = [bench_torch(minilm, b, length, 2 if args.quick else args.repeats,
                                args.torch_threads, mesh)
                    for length, b in (lb[:1] if not args.quick else lb)]
  (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
  (out / "results.md").write_text(_markdown(res))
  _plot(res, out / "speedup.png")
  print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'speedup.png'}")
  return res


if __name__ == "__main__":
  main()

"""Runs the chosen sections (full or --quick sizes); writes results.json / .md / .png."""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sparse_attn import assets
from sparse_attn import model as model_lib
from sparse_attn import pretrained
from sparse_attn.bench import attention_alone, e2e, long_model, peers, pruned, report, timing


def _minilm(quick: bool):
  """(config, [(L, B)], kept layers) of the pruned / torch sections' model."""
  if quick:
    cfg = model_lib.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cfg, [(32, 2)], (0,)
  hf = json.loads(assets.fetch("minilm/config.json").read_text())
  cfg = pretrained.config_from_hf(hf, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
  return cfg, [(128, 32), (512, 8)], (0,)


def _keep_layers(spec: str, default: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
  """--keep-layers "4,5" as a tuple (default if empty); exits on a layer not in cfg."""
  if not spec:
    return default
  keep = tuple(int(x) for x in spec.split(","))
  bad = [i for i in keep if not 0 <= i < num_layers]
  if bad:
    raise SystemExit(f"--keep-layers {bad} outside the model's {num_layers} layers.")
  return keep


def run(args: argparse.Namespace, host_memory_reused: bool, argv: list[str]) -> dict:
  """Runs the sections args selects and writes args.out/results.{json,md}, speedup.png
  and (with the e2e section) e2e.png.

  Call after the process settings (XLA_FLAGS, host memory) are applied. argv is recorded
  in results.json. Returns the results dict written there.
  """
  sections = set(args.only.split(","))
  if args.torch:
    sections.add("torch")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  mesh = None
  if args.devices > 1:
    mesh = Mesh(np.array(jax.devices()[:args.devices]), ("data",))
  peak = timing.matmul_peak(256 if args.quick else 2048, repeats=3 if args.quick else 5)
  res: dict[str, Any] = {"machine": timing.machine_description(), "matmul_peak_flops": peak,
                         "host_memory_reused": host_memory_reused, "argv": argv}
  print(f"machine: {res['machine']}; matmul peak {peak / 1e9:.1f} GFLOP/s; host memory "
        f"{'reused' if host_memory_reused else 'glibc default'}", flush=True)
  minilm, lb, keep = _minilm(args.quick)
  keep = _keep_layers(args.keep_layers, keep, minilm.num_hidden_layers)
  if "attention" in sections:
    if args.quick:
      res["attention"] = attention_alone.bench_attention([128], [16], 1, 2, 16, 32, 1)
    else:
      res["attention"] = attention_alone.bench_attention(
          [int(x) for x in args.lengths.split(",")],
          [int(x) for x in args.windows.split(",")], 1, 4, 64, args.block_size or None,
          args.repeats)
  if "long" in sections:
    if args.quick:
      res["long_model"] = long_model.bench_long_model(128, 16, 1, 2, 32, 2, 32, 2, peak)
    else:
      res["long_model"] = long_model.bench_long_model(
          4096, 128, 1, 4, 256, 4, args.block_size or 0, args.repeats, peak)
  if "e2e" in sections:
    if args.quick:
      res["e2e"] = e2e.bench_e2e(minilm, [64], 8, 2, quick=True,
                                 learned=args.e2e_learned or None)
    else:
      res["e2e"] = e2e.bench_e2e(minilm, [int(x) for x in args.e2e_lengths.split(",")],
                                 64, args.repeats, learned=args.e2e_learned or None)
  if "pruned" in sections:
    res["pruned"] = pruned.bench_pruned(minilm, "quick" if args.quick else "MiniLM-L6", lb,
                                        keep, 2 if args.quick else args.repeats, peak, mesh)
  if "torch" in sections:
    res["torch"] = [peers.bench_torch(minilm, b, length, 2 if args.quick else args.repeats,
                                      args.torch_threads, mesh)
                    for length, b in (lb[:1] if not args.quick else lb)]
  (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
  (out / "results.md").write_text(report.markdown(res))
  report.plot(res, out / "speedup.png")
  wrote = [out / "results.json", out / "results.md", out / "speedup.png"]
  if report.plot_e2e(res, out / "e2e.png"):
    wrote.append(out / "e2e.png")
  print("wrote " + ", ".join(map(str, wrote)))
  return res

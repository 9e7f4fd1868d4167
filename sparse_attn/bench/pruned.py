"""Section (b'): BERT steps with most attention sublayers removed, vs the FLOP ratio."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from sparse_attn.bench import timing
from sparse_attn.bench.flops import model_flops
from sparse_attn.bench.model_steps import model_fns


def bench_pruned(cfg, name: str, lengths_batches: Sequence[tuple[int, int]],
                 keep_layers: Sequence[int], repeats: int, peak: float,
                 mesh=None) -> list[dict]:
  """Inference and train steps with and without most attention sublayers.

  The pruned model is cfg with heads only in keep_layers (0 heads elsewhere). For each
  (L, B) in lengths_batches both models run on token ids [B, L] (data-parallel over mesh's
  "data" axis if given). The bound is the FLOP ratio full / pruned (`model_flops`); peak
  (FLOP/s) is what MFU divides by. Returns one row per (L, B) with the times and, per
  "infer" / "train", the speed-up (wall and CPU time), its fraction of the bound,
  tokens/s and MFU.
  """
  n = cfg.num_hidden_layers
  hpl = tuple(cfg.num_attention_heads if i in keep_layers else 0 for i in range(n))
  pruned = dataclasses.replace(cfg, heads_per_layer=hpl)
  rows = []
  for length, batch in lengths_batches:
    fns = {}
    for tag, c in (("full", cfg), ("pruned", pruned)):
      inf, tr = model_fns(c, batch, length, None, mesh)
      fns[f"{tag}/infer"], fns[f"{tag}/train"] = inf, tr
    t = timing.interleaved(fns, repeats)
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

"""The benchmark's outputs: results.md tables and the speed-up vs block-density plot."""

from __future__ import annotations

import pathlib

import numpy as np


def _attention_table(rows: list[dict]) -> list[str]:
  lines = ["## Attention alone (B={batch}, H={heads}, D={head_dim})\n".format(**rows[0]),
           "| L | window | b | rho_elem | rho_block | masked fwd ms | sparse fwd ms | "
           "fwd x | of ideal | masked f+b ms | sparse f+b ms | f+b x | of ideal | "
           "pure-JAX of ideal (fwd / f+b) | auto |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
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
  return lines


def _long_model_table(r: dict) -> list[str]:
  lines = [f"\n## BERT {r['layers']} layers, hidden {r['hidden']}, L={r['L']}, "
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
  return lines


def _pruned_table(rows: list[dict]) -> list[str]:
  lines = ["\n## Attention sublayers removed\n",
           "| model | L | B | kept layers | step | full ms | pruned ms | speed-up | "
           "FLOP bound | of bound | of bound (CPU time) | MFU full |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    kept = sum(1 for h in r["heads_per_layer"] if h)
    for mode in ("infer", "train"):
      m, t = r[mode], r["times"]
      lines.append(
          f"| {r['model']} | {r['L']} | {r['batch']} | {kept}/{len(r['heads_per_layer'])}"
          f" | {mode} | {t[f'full/{mode}']['median'] * 1e3:.0f} | "
          f"{t[f'pruned/{mode}']['median'] * 1e3:.0f} | {m['speedup']:.2f} | "
          f"{m['flop_ratio_bound']:.2f} | {m['of_bound']:.2f} | {m['of_bound_cpu']:.2f} "
          f"| {m['mfu_full']:.3f} |")
  return lines


def _torch_table(rows: list[dict]) -> list[str]:
  lines = ["\n## Against PyTorch (transformers BertForSequenceClassification)\n",
           "| L | B | step | jax ms | torch ms | jax / torch |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    for mode in ("infer", "train"):
      t = r["times"]
      lines.append(f"| {r['L']} | {r['batch']} | {mode} | "
                   f"{t[f'jax/{mode}']['median'] * 1e3:.0f} | "
                   f"{t[f'torch/{mode}']['median'] * 1e3:.0f} | "
                   f"{r[f'{mode}_ratio_jax_over_torch']:.2f} |")
  return lines


def _e2e_table(rows: list[dict]) -> list[str]:
  lines = ["\n## MiniLM on linux_docs documents: dense vs the fast path (Longformer mask)\n",
           "| L | B | step | dense ms | masked ms | auto ms | auto | rho_block | share f | "
           "Amdahl bound | speed-up | of bound | auto / dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  ms = lambda t, k: f"{t[k]['median'] * 1e3:.0f}" if k in t else "skipped"
  for r in rows:
    for mode in ("infer", "train"):
      t, m = r["times"], r.get(mode)
      tail = (f"{m['attention_share']:.2f} | {m['amdahl_bound']:.2f} | "
              f"{m['speedup_vs_dense']:.2f} | {m['of_bound']:.2f} | "
              f"{m['auto_over_dense']:.2f}" if m else "- | - | - | - | -")
      lines.append(f"| {r['L']} | {r['batch']} | {mode} | {ms(t, f'dense/{mode}')} | "
                   f"{ms(t, f'masked/{mode}')} | {ms(t, f'auto/{mode}')} | {r['auto']} "
                   f"(b={r['block_size']}) | {r['rho_block'] or 1:.3f} | {tail} |")
  learned = [r for r in rows if r.get("learned")]
  if learned:
    lines += [f"\nThe frozen learned mask ({learned[0]['learned']['source']}), per layer:\n",
              "| L | B | step | dense ms | learned ms | executors | rho_block | rho_elem | "
              "Amdahl bound | speed-up | of bound | learned / dense |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in learned:
      lr = r["learned"]
      execs = ", ".join(sorted(set(lr["executors"])))
      for mode in ("infer", "train"):
        t, m = r["times"], (r.get(mode) or {}).get("learned")
        tail = (f"{m['amdahl_bound']:.2f} | {m['speedup_vs_dense']:.2f} | "
                f"{m['of_bound']:.2f} | {m['learned_over_dense']:.2f}" if m
                else "- | - | - | -")
        lines.append(f"| {r['L']} | {r['batch']} | {mode} | {ms(t, f'dense/{mode}')} | "
                     f"{ms(t, f'learned/{mode}')} | {execs} | {lr['rho_block']:.3f} | "
                     f"{lr['rho_elem']:.3f} | {tail} |")
  return lines


def markdown(res: dict) -> str:
  """results.md: a heading, the machine line and one table per section present in res."""
  lines = ["# sparse_attn benchmark\n", f"Machine: {res['machine']}\n"]
  if res.get("attention"):
    lines += _attention_table(res["attention"])
  if res.get("long_model"):
    lines += _long_model_table(res["long_model"])
  if res.get("pruned"):
    lines += _pruned_table(res["pruned"])
  if res.get("torch"):
    lines += _torch_table(res["torch"])
  if res.get("e2e"):
    lines += _e2e_table(res["e2e"])
  return "\n".join(lines) + "\n"


def plot(res: dict, path: pathlib.Path) -> None:
  """Writes a PNG of attention speed-up over masked dense vs rho_block, with 1 / rho_block.

  Log-log, one point per attention row and mode (fwd, fwdbwd); an empty, titled plot when
  the attention section did not run.
  """
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


def plot_e2e(res: dict, path: pathlib.Path) -> bool:
  """Writes a PNG of the e2e section: speed-up over dense vs L, per step (infer, train).

  Solid lines: the fixed mask under 'auto' and, when timed, the frozen learned mask;
  dashed: each one's Amdahl bound. Rows whose dense step was skipped have no point.
  Returns False (and writes nothing) when the e2e section did not run.
  """
  rows = res.get("e2e") or []
  if not rows:
    return False
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
  for ax, mode in zip(axes, ("infer", "train")):
    for name, get, color in (("fixed mask (auto)", lambda m: m, "C0"),
                             ("frozen learned mask", lambda m: m.get("learned"), "C1")):
      pts = [(r["L"], get(r[mode])) for r in rows if r.get(mode) and get(r[mode])]
      if not pts:
        continue
      ls = [p[0] for p in pts]
      ax.plot(ls, [p[1]["speedup_vs_dense"] for p in pts], "o-", color=color, label=name)
      ax.plot(ls, [p[1]["amdahl_bound"] for p in pts], "--", color=color,
              label=f"{name}: Amdahl bound")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L")
    ax.set_title(f"MiniLM {mode} step on linux_docs")
    ax.axhline(1.0, color="k", lw=0.5)
  axes[0].set_ylabel("speed-up over dense")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True

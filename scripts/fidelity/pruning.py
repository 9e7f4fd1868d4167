"""Not All Attention's trade-off: dev accuracy against the attention sublayers kept.

Rotten Tomatoes fine-tuning of MiniLM (configs/finetune.py's setting, 150 steps). For each
number k of the 6 attention sublayers kept (5, 4, 3, 2, 1):

* every fixed choice of k layers is fine-tuned once with the first seed (the others have
  no attention sublayer), which ranks them; the best, median and worst choice are then
  measured again with the remaining seeds, so their reported accuracies are not the ones
  they were selected by;
* the self-pruning search (`configs/prune.py:shift,warm=50,prune=(6-k)/6`: hard-concrete
  layer gates, the budget met exactly by a logit shift) runs with every seed, and its
  extracted smaller model is re-tuned (`configs/prune.py:retune=...`).

Dense fine-tuning with every seed is the reference. The speed of each searched model
(seed 0's kept layers) is measured against the full model in one process, interleaved
(`python -m sparse_attn.bench --only pruned`: inference and train steps at 128 x 32 and
512 x 8 tokens, against the FLOP-ratio bound).
"""

from __future__ import annotations

import itertools
import pathlib

from fidelity.common import (Compare, Run, arm_stats, compare, figure, load, pm, save,
                             verdict_table)

CLAIM = "pruning"
LAYERS = 6
KEEP = (5, 4, 3, 2, 1)


def _hpl(layers: tuple[int, ...]) -> str:
  return "(" + ",".join("12" if i in layers else "0" for i in range(LAYERS)) + ")"


def _fixed(k: int, layers: tuple[int, ...], seed: int) -> Run:
  return Run(f"fixed_k{k}_{''.join(map(str, layers))}_s{seed}", "configs/finetune.py", seed,
             flags=(f"--config.model.heads_per_layer={_hpl(layers)}",))


def ranked(k: int, seed: int) -> list[tuple[tuple[int, ...], float]] | None:
  """Every fixed choice of k layers by its `seed` dev accuracy (best first), or None
  while any is unfinished."""
  out = []
  for layers in itertools.combinations(range(LAYERS), k):
    rec = load(CLAIM, _fixed(k, layers, seed).name)
    if rec is None:
      return None
    out.append((layers, rec["validation"]["accuracy"]))
  return sorted(out, key=lambda t: -t[1])


def picks(k: int, seed: int) -> dict[str, tuple[int, ...]] | None:
  """The best, median and worst fixed choice of k layers by the ranking seed."""
  r = ranked(k, seed)
  if r is None:
    return None
  return {"best": r[0][0], "median": r[len(r) // 2][0], "worst": r[-1][0]}


def runs(seeds: tuple[int, ...], root: str) -> list[Run]:
  """Dense per seed; every fixed choice with the first seed; the best / median / worst
  choices with the other seeds once the ranking is complete; the search and its re-tuned
  extraction per seed and k."""
  first, rest = seeds[0], seeds[1:]
  out = [Run(f"dense_s{s}", "configs/finetune.py", s) for s in seeds]
  for k in KEEP:
    for s in seeds:
      search = Run(f"search_k{k}_s{s}",
                   f"configs/prune.py:shift,warm=50,prune={(LAYERS - k) / LAYERS:.6f}", s)
      out += [search, Run(f"retune_k{k}_s{s}", f"configs/prune.py:retune={root}/{search.name}",
                          s, needs=(search.name,))]
  for k in KEEP:
    out += [_fixed(k, layers, first) for layers in itertools.combinations(range(LAYERS), k)]
  for k in KEEP:
    chosen = picks(k, first)
    if chosen:
      out += [_fixed(k, layers, s) for layers in dict.fromkeys(chosen.values())
              for s in rest]
  for k in KEEP:
    layers = searched_layers(k, first)
    if layers:
      out.append(Run(f"speed_k{k}", "", module="sparse_attn.bench",
                     flags=("--only=pruned", f"--keep-layers={','.join(map(str, layers))}")))
  return out


def searched_layers(k: int, seed: int) -> list[int] | None:
  """The layers with attention in the re-tuned searched model of k layers, or None."""
  rec = load(CLAIM, f"retune_k{k}_s{seed}")
  if rec is None:
    return None
  v = rec["validation"]
  return [i for i in range(LAYERS) if v[f"density/layer_{i}"] > 0]


def _stats(names: list[str]) -> dict | None:
  recs = [r for r in (load(CLAIM, n) for n in names) if r]
  if not recs:
    return None
  st = arm_stats([r["validation"]["accuracy"] for r in recs],
                 [r["validation"].get("num_scored", 1303.0) for r in recs])
  st["wall_s"] = sum(r["wall_time_s"] for r in recs)
  return st


def report(seeds: tuple[int, ...]) -> dict:
  """Per k: the re-tuned search (its kept layers), the best / median / worst fixed choice
  (measured with the seeds after the first), dense; comparisons and verdicts."""
  first, rest = seeds[0], seeds[1:]
  dense = _stats([f"dense_s{s}" for s in seeds])
  rows, compares = {}, []
  for k in KEEP:
    row = {"search": _stats([f"retune_k{k}_s{s}" for s in seeds]), "kept_layers": [],
           "ranking": ranked(k, first)}
    row["kept_layers"] = [ls for ls in (searched_layers(k, s) for s in seeds) if ls]
    speed = load(CLAIM, f"speed_k{k}")
    row["speed"] = [{"L": r["L"], "batch": r["batch"], "infer": r["infer"]["speedup"],
                     "infer_bound": r["infer"]["flop_ratio_bound"],
                     "train": r["train"]["speedup"]} for r in speed["pruned"]] if speed else []
    chosen = picks(k, first) or {}
    for pick, layers in chosen.items():
      row[pick] = _stats([_fixed(k, layers, s).name for s in (rest or (first,))])
      row[pick + "_layers"] = layers
    for pick in ("median", "worst"):
      c = compare(Compare("the search beats a fixed choice of the same size",
                          "self-pruning vs fixed layers (no number recovered)",
                          f"search k={k}", f"{pick} fixed k={k}", "task"),
                  row["search"], row.get(pick))
      if c:
        compares.append(c)
    rows[k] = row
  for k in (1, 2):   # ~80% of the attention sublayers pruned.
    c = compare(Compare("pruning ~80% of the attention sublayers keeps dense accuracy",
                        "abstract: 'nearly 80%' pruned, 'even better results'",
                        f"search k={k}", "dense", "task"), rows[k]["search"], dense)
    if c:
      compares.append(c)
  wall = sum(st["wall_s"] for row in rows.values() for st in
             [row.get(p) for p in ("search", "best", "median", "worst")] if st)
  return {"dense": dense, "rows": {str(k): v for k, v in rows.items()},
          "compares": compares, "wall_s": wall + (dense["wall_s"] if dense else 0.0)}


def markdown(rep: dict, command: str) -> str:
  lines = [f"Command: `{command}`; wall time of the finished runs on the 2-core CPU: "
           f"{rep['wall_s'] / 60:.0f} min. Dense: {pm(rep['dense'])}.", "",
           "| sublayers kept | search, re-tuned | best fixed | median fixed | worst fixed | "
           "searched model's inference speed-up (FLOP bound) |", "|---|---|---|---|---|---|"]
  for k, row in rep["rows"].items():
    kept = "; ".join(",".join(map(str, ls)) for ls in row["kept_layers"])
    cells = [pm(row["search"]) + (f" (layers {kept})" if kept else "")]
    for pick in ("best", "median", "worst"):
      layers = row.get(pick + "_layers")
      cells.append(f"{pm(row.get(pick))} (layers {','.join(map(str, layers))})" if layers
                   else "pending")
    cells.append("; ".join(f"x{r['infer']:.2f} ({r['infer_bound']:.2f}) at {r['batch']} x "
                           f"{r['L']}" for r in row["speed"]) or "pending")
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
  lines += ["", *verdict_table(rep["compares"])]
  return "\n".join(lines)


def plot(rep: dict, path: pathlib.Path) -> None:
  """Dev accuracy against sublayers kept: search, best / median / worst fixed, dense."""
  fig, ax = figure()
  for key, style in (("search", "o-C3"), ("best", "^--C2"), ("median", "s--C0"),
                     ("worst", "v--C7")):
    pts = [(int(k), r[key]) for k, r in rep["rows"].items() if r.get(key)]
    if pts:
      ax.errorbar([k for k, _ in pts], [s["mean"] for _, s in pts],
                  yerr=[s["se"] for _, s in pts], fmt=style[:-2], color=style[-2:],
                  label=key if key == "search" else f"{key} fixed", capsize=3)
  if rep["dense"]:
    ax.axhline(rep["dense"]["mean"], color="k", lw=0.8, label="dense")
  ax.set_xlabel(f"attention sublayers kept (of {LAYERS})")
  save(fig, ax, path)

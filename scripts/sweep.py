"""Run one experiment config over several arguments and tabulate accuracy vs sparsity.

Each variant trains in its own process (`train.py`, resumable: rerunning the sweep skips
variants whose results.json exists) into <workdir>/<variant>; the sweep writes
<workdir>/sweep.md (a Markdown table), sweep.json and sweep.png (the main dev metric
against attention sparsity over valid pairs).

  python scripts/sweep.py --config configs/dam.py --workdir runs/dam_lam \
      --args lam=1e-3 lam=1e-2 lam=1e-1
  python scripts/sweep.py --config configs/window.py --workdir runs/window_beta \
      --args beta=0.3 beta=1 beta=3 --extra "configs/finetune.py:pattern=bigbird,..."
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _name(config: str, arg: str) -> str:
  base = pathlib.Path(config.split(":")[0]).stem
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{base}_{arg}" if arg else base)[:120]


def run(config_spec: str, workdir: pathlib.Path) -> dict:
  """Trains `config_spec` ("file.py[:arg]") into `workdir` unless already done."""
  results = workdir / "results.json"
  if not results.exists():
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={config_spec}",
           f"--workdir={workdir}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
  return json.loads(results.read_text())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="config file, e.g. configs/dam.py")
  p.add_argument("--args", nargs="+", default=[""], help="one config argument per variant")
  p.add_argument("--extra", nargs="*", default=[], help="further full config specs")
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", default="validation")
  a = p.parse_args(argv)
  out = pathlib.Path(a.workdir)
  out.mkdir(parents=True, exist_ok=True)
  specs = [(f"{a.config}:{arg}" if arg else a.config, _name(a.config, arg)) for arg in a.args]
  specs += [(spec, _name(spec.split(":")[0], spec.partition(":")[2])) for spec in a.extra]
  rows = []
  for spec, name in specs:
    r = run(spec, out / name)[a.split]
    metric = next(k for k in ("accuracy", "f1", "matthews", "pearson") if k in r)
    rows.append({"variant": spec, "metric": metric, "value": r[metric],
                 "sparsity": r.get("attention_sparsity", 0.0),
                 "per_layer_density": [r[k] for k in sorted(r) if k.startswith("density/")]})
  lines = ["| variant | dev metric | attention sparsity (valid pairs) | per-layer density |",
           "|---|---|---|---|"]
  for r in rows:
    dens = " ".join(f"{d:.2f}" for d in r["per_layer_density"])
    lines.append(f"| `{r['variant']}` | {r['metric']} {r['value']:.4f} | "
                 f"{r['sparsity']:.1%} | {dens} |")
  table = "\n".join(lines)
  (out / "sweep.md").write_text(table + "\n")
  (out / "sweep.json").write_text(json.dumps(rows, indent=1))
  _plot(rows, out / "sweep.png")
  print(table)


def _plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["sparsity"], r["value"])
    ax.annotate(r["variant"].split(":")[-1][:40] or r["variant"], (r["sparsity"], r["value"]),
                fontsize=6)
  ax.set_xlabel("attention sparsity over valid pairs (all layers)")
  ax.set_ylabel(rows[0]["metric"] if rows else "metric")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()

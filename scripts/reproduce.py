"""Rerun one claim of docs/fidelity.md and rewrite its numbers, verdicts and plot.

  python scripts/reproduce.py sparsebert [--seeds 0 1 2] [--root runs/fidelity/sparsebert]
  python scripts/reproduce.py sparsebert --report-only     # tables from finished runs

Every run trains in its own `train.py` process into <root>/<run>. Its results.json is
then recorded in docs/fidelity/records/<claim>/<run>.json (committed with the docs), and a
run with a record is not trained again, so an interrupted reproduction resumes where it
stopped, in this checkout or a fresh one; a run whose checkpoint a later run needs (the
masked-LM encoder a fine-tuning run starts from) is retrained when its directory is gone.
`--fresh` ignores the records: everything reruns from scratch. After each run the claim's
section of docs/fidelity.md (between its markers), docs/fidelity/<claim>.json and
docs/fidelity/<claim>.png are rewritten from every record, so partial results are visible
as they land. Runs are long (minutes each on a 2-core CPU): start them with nohup.

Verdict rule (docs/fidelity.md): the paper predicts that arm A beats arm B. With d = mean(A)
- mean(B) and se = sqrt(se_A^2 + se_B^2), where an arm's se is sd / sqrt(seeds) with >= 2
seeds and the binomial sqrt(p (1 - p) / N) of its evaluation set with one seed:
reproduced if d > se; direction reproduced if 0 < d <= se; not reproduced if d <= 0.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fidelity_claims as claims  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "fidelity.md"
OUT = ROOT / "docs" / "fidelity"


# ---------------------------------------------------------------------------- statistics

def arm_stats(values: list[float], counts: list[float]) -> dict:
  """Mean, sd (n >= 2) and standard error of one arm's per-seed accuracies.

  Args:
    values: per seed, an accuracy in [0, 1].
    counts: per seed, the number of items it scored (for the one-seed binomial error).
  """
  n = len(values)
  mean = sum(values) / n
  if n >= 2:
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "sd": sd, "se": sd / math.sqrt(n), "seeds": n, "se_kind": "seeds"}
  return {"mean": mean, "sd": None, "seeds": 1, "se_kind": "binomial",
          "se": math.sqrt(max(mean * (1 - mean), 1e-12) / max(counts[0], 1.0))}


def verdict(a: dict, b: dict) -> tuple[str, float, float]:
  """(verdict, d, se) for the prediction "a beats b" (see the module docstring)."""
  d = a["mean"] - b["mean"]
  se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
  if d > se:
    word = "reproduced"
  elif d > 0:
    word = "direction reproduced"
  else:
    word = "not reproduced"
  if min(a["seeds"], b["seeds"]) < 2:
    word += " (one seed: provisional)"
  return word, d, se


# ---------------------------------------------------------------------------- running

def record_path(claim: str, name: str) -> pathlib.Path:
  return OUT / "records" / claim / f"{name}.json"


def run_all(claim: str, runs: list[claims.Run], root: pathlib.Path, after_each,
            fresh: bool = False) -> None:
  """Trains, in order, every run without a record (all of them with `fresh`), and first
  any run it needs whose directory is gone; records each; calls after_each() after each."""
  by_name = {r.name: r for r in runs}
  done = set() if fresh else {r.name for r in runs if record_path(claim, r.name).exists()}

  def train(r: claims.Run) -> None:
    for need in r.needs:   # Its checkpoint must be here, and recorded.
      if need not in done or not (root / need / "results.json").exists():
        train(by_name[need])
    workdir = root / r.name
    if fresh and workdir.exists():
      shutil.rmtree(workdir)
    t0 = time.time()
    if not (workdir / "results.json").exists():   # (A partial run resumes from its checkpoint.)
      cmd = [sys.executable, *r.command(str(root))]
      print("+", " ".join(cmd), flush=True)
      subprocess.run(cmd, check=True, cwd=ROOT)
    results = json.loads((workdir / "results.json").read_text())
    results["command"] = "python " + " ".join(r.command(str(root)))
    path = record_path(claim, r.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float))
    done.add(r.name)
    print(f"  {r.name} recorded ({time.time() - t0:.0f} s)", flush=True)
    after_each()

  for r in runs:
    if r.name not in done:
      train(r)


def load(claim: str, name: str) -> dict | None:
  path = record_path(claim, name)
  return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------- SparseBERT

def sparsebert_report(seeds: tuple[int, ...]) -> dict:
  """Per arm: masked-LM and fine-tuning accuracies over the finished seeds, both
  sparsity accountings, wall times; the comparisons and their verdicts."""
  arms, wall = {}, 0.0
  head = load("sparsebert", "mlm_head")
  if head:
    wall += head["wall_time_s"]
  for arm, _, _ in claims.sparsebert_arms():
    rec = {"mlm": [], "mlm_count": [], "mlm_loss": [], "task": [], "task_count": [],
           "sparsity_pairs": None, "sparsity_nxn": None, "ft_sparsity_pairs": None,
           "seeds_mlm": [], "seeds_task": [], "wall_s": 0.0}
    for s in seeds:
      m = load("sparsebert", f"mlm_{arm}_s{s}")
      if m:
        v = m["validation"]
        rec["mlm"].append(v["accuracy"])
        rec["mlm_count"].append(v.get("num_scored", 0.0))
        rec["mlm_loss"].append(v["loss"])
        rec["sparsity_pairs"] = v["attention_sparsity"]
        rec["sparsity_nxn"] = v.get("attention_sparsity_nxn")
        rec["seeds_mlm"].append(s)
        rec["wall_s"] += m["wall_time_s"]
      f = load("sparsebert", f"ft_{arm}_s{s}")
      if f:
        v = f["validation"]
        rec["task"].append(v["accuracy"])
        rec["task_count"].append(v.get("num_scored", 1303.0))
        rec["ft_sparsity_pairs"] = v["attention_sparsity"]
        rec["seeds_task"].append(s)
        rec["wall_s"] += f["wall_time_s"]
    for metric in ("mlm", "task"):
      if rec[metric]:
        rec[metric + "_stats"] = arm_stats(rec[metric], rec[metric + "_count"])
    if rec["mlm"] or rec["task"]:
      arms[arm] = rec
      wall += rec["wall_s"]
  sparsity = {a: r["sparsity_nxn"] for a, r in arms.items() if r["sparsity_nxn"] is not None}
  compares = []
  for c in claims.sparsebert_compares() + claims.sparsebert_fixed_compares(sparsity):
    a, b = arms.get(c.better, {}), arms.get(c.worse, {})
    key = c.metric + "_stats"
    if key in a and key in b:
      word, d, se = verdict(a[key], b[key])
      compares.append(dict(vars(c), verdict=word, d=d, se=se))
  return {"arms": arms, "compares": compares, "wall_s": wall,
          "head": head["validation"] if head else None}


def _pm(st: dict | None) -> str:
  if not st:
    return "pending"
  if st["sd"] is None:
    return f"{st['mean']:.4f} (1 seed, se {st['se']:.4f})"
  return f"{st['mean']:.4f} ± {st['sd']:.4f} ({st['seeds']} seeds)"


def sparsebert_markdown(rep: dict, command: str) -> str:
  lines = [f"Command: `{command}`; wall time of the finished runs on the 2-core CPU: "
           f"{rep['wall_s'] / 60:.0f} min.", ""]
  if rep["head"]:
    lines += [f"Fitted masked-LM head on the frozen dense encoder: held-out masked-token "
              f"accuracy {rep['head']['accuracy']:.4f}, loss {rep['head']['loss']:.3f}.", ""]
  lines += ["| arm | sparsity, 128 x 128 matrix (SparseBERT's) | sparsity, valid pairs "
            "(masked LM / fine-tuning) | masked-token accuracy | masked-LM loss | "
            "Rotten Tomatoes dev accuracy |", "|---|---|---|---|---|---|"]
  for arm, r in rep["arms"].items():
    loss = (f"{sum(r['mlm_loss']) / len(r['mlm_loss']):.3f}" if r["mlm_loss"] else "pending")
    nxn = f"{r['sparsity_nxn']:.1%}" if r["sparsity_nxn"] is not None else "pending"
    pairs = (f"{r['sparsity_pairs']:.1%}" if r["sparsity_pairs"] is not None else "pending")
    ftp = (f"{r['ft_sparsity_pairs']:.1%}" if r["ft_sparsity_pairs"] is not None
           else "pending")
    lines.append(f"| {arm} | {nxn} | {pairs} / {ftp} | {_pm(r.get('mlm_stats'))} | {loss} | "
                 f"{_pm(r.get('task_stats'))} |")
  lines += ["", "| claim (paper's number) | A | B | metric | A - B | combined se | verdict |",
            "|---|---|---|---|---|---|---|"]
  for c in rep["compares"]:
    metric = "masked-token acc." if c["metric"] == "mlm" else "RT dev acc."
    lines.append(f"| {c['claim']} ({c['paper']}) | {c['better']} | {c['worse']} | {metric} "
                 f"| {c['d'] * 100:+.2f} | {c['se'] * 100:.2f} | {c['verdict']} |")
  return "\n".join(lines)


def sparsebert_plot(rep: dict, path: pathlib.Path) -> None:
  """Accuracy vs sparsity, both accountings side by side, masked LM and fine-tuning."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, metric, label in ((axes[0], "mlm", "held-out masked-token accuracy"),
                            (axes[1], "task", "Rotten Tomatoes dev accuracy")):
    for arm, r in rep["arms"].items():
      st = r.get(metric + "_stats")
      if not st or r["sparsity_nxn"] is None:
        continue
      color = "C3" if arm.startswith("dam") else ("C0" if arm in ("dense", "nodiag") else "C2")
      pairs = r["sparsity_pairs"] if metric == "mlm" else r["ft_sparsity_pairs"]
      ax.errorbar(100 * r["sparsity_nxn"], st["mean"], yerr=st["se"], fmt="o", color=color)
      ax.annotate(arm, (100 * r["sparsity_nxn"], st["mean"]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
      if pairs is not None and abs(pairs - r["sparsity_nxn"]) > 0.005:
        ax.plot([100 * pairs], [st["mean"]], "x", color=color, alpha=0.6)
    ax.set_xlabel("sparsity %  (o: 128 x 128 matrix; x: valid pairs where they differ)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_title("masked LM at n = 128 (linux_docs_mlm)")
  axes[1].set_title("then fine-tuned, mask frozen (max_len 128)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


CLAIMS = {
    "sparsebert": dict(runs=claims.sparsebert_runs, report=sparsebert_report,
                       markdown=sparsebert_markdown, plot=sparsebert_plot),
}


# ---------------------------------------------------------------------------- docs

def write_section(claim: str, body: str) -> None:
  """Replaces the text between <!-- claim:begin --> and <!-- claim:end --> in
  docs/fidelity.md (appends the section when the markers are missing)."""
  begin, end = f"<!-- {claim}:begin -->", f"<!-- {claim}:end -->"
  text = DOC.read_text() if DOC.exists() else "# Fidelity\n"
  block = f"{begin}\n{body}\n{end}"
  if begin in text and end in text:
    text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text,
                  flags=re.S)
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  DOC.write_text(text)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("claim", choices=sorted(CLAIMS))
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--root", default=None, help="default runs/fidelity/<claim>")
  p.add_argument("--report-only", action="store_true", help="no training: tables only")
  p.add_argument("--fresh", action="store_true", help="ignore the records: rerun everything")
  a = p.parse_args(argv)
  spec = CLAIMS[a.claim]
  root = pathlib.Path(a.root or f"runs/fidelity/{a.claim}")
  seeds = tuple(a.seeds)
  command = f"python scripts/reproduce.py {a.claim} --seeds {' '.join(map(str, seeds))}"

  def report():
    rep = spec["report"](seeds)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.claim}.json").write_text(json.dumps(rep, indent=1, default=float))
    if rep["arms"]:
      spec["plot"](rep, OUT / f"{a.claim}.png")
    write_section(a.claim, spec["markdown"](rep, command))

  if not a.report_only:
    run_all(a.claim, spec["runs"](seeds, str(root)), root, report, a.fresh)
  report()


if __name__ == "__main__":
  main()

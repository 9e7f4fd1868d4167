"""Rerun one claim of docs/fidelity.md and rewrite its numbers, verdicts and plot.

  python scripts/reproduce.py sparsebert [--seeds 0 1 2] [--root runs/fidelity/sparsebert]
  python scripts/reproduce.py sparsebert --report-only     # tables from finished runs
  python scripts/reproduce.py breaking | pruning           # the other two papers' claims

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
import pathlib
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position
from fidelity import breaking, common, pruning, sparsebert
from fidelity.common import OUT, ROOT, record_path

DOC = ROOT / "docs" / "fidelity.md"
CLAIMS = {"sparsebert": sparsebert, "breaking": breaking, "pruning": pruning}



def run_all(claim: str, runs: list[common.Run], root: pathlib.Path, after_each,
            fresh: bool = False, done: set | None = None) -> set:
  """Trains, in order, every run without a record (all of them with `fresh`), and first
  any run it needs whose directory is gone; records each; calls after_each() after each.
  Returns the names recorded (pass them back as `done` when the list grows)."""
  by_name = {r.name: r for r in runs}
  done = set(done or ()) | (set() if fresh else {
      r.name for r in runs if record_path(claim, r.name).exists()})

  def train(r: common.Run) -> None:
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
  return done


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
  claim = CLAIMS[a.claim]
  root = pathlib.Path(a.root or f"runs/fidelity/{a.claim}")
  seeds = tuple(a.seeds)
  command = f"python scripts/reproduce.py {a.claim} --seeds {' '.join(map(str, seeds))}"

  def report():
    rep = claim.report(seeds)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.claim}.json").write_text(json.dumps(rep, indent=1, default=float))
    claim.plot(rep, OUT / f"{a.claim}.png")
    write_section(a.claim, claim.markdown(rep, command))

  if not a.report_only:
    done, count = set(), -1
    while len(done) != count:   # A claim's later runs may depend on its earlier results.
      count = len(done)
      done = run_all(a.claim, claim.runs(seeds, str(root)), root, report, a.fresh,
                     done)
  report()


if __name__ == "__main__":
  main()

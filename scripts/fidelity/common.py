"""What every claim shares: runs, comparisons, run records, per-arm statistics, verdicts.

A claim is a list of runs (`Run`: a `train.py` config spec, a seed, the runs it needs
first) and comparisons (`Compare`: the paper says arm A beats arm B). Finished runs are
recorded as JSON under docs/fidelity/records/<claim>/ (committed), and every table is
computed from the records.

Verdict rule: with d = mean(A) - mean(B) and se = sqrt(se_A^2 + se_B^2), where an arm's se
is sd / sqrt(seeds) with >= 2 seeds and the binomial sqrt(p (1 - p) / N) of its evaluation
set with one seed: reproduced if d > se; direction reproduced if 0 < d <= se; not
reproduced if d <= 0. A claim that A costs nothing against B ("no worse", e.g. removing
the diagonal) predicts no difference, which a finite experiment can only fail to refute:
reproduced if d >= -se (A short of B by less than the combined error), not reproduced if
A is worse by more; the table reports d and se, so the test's power is on the page.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "fidelity"


@dataclasses.dataclass(frozen=True)
class Run:
  """One `train.py` run: `name` (its workdir under the claim's), config spec, seed."""
  name: str
  config: str
  seed: int | None = None   # None: the config's own seed (train and data seed otherwise).
  needs: tuple[str, ...] = ()   # Runs whose checkpoints this one reads.
  flags: tuple[str, ...] = ()   # Further train.py flags, e.g. --config.model.X=Y.
  module: str = ""   # Instead of train.py: `python -m module --out=<workdir> *flags`.

  def command(self, root: str) -> list[str]:
    """The command line (without the interpreter), relative to the repository."""
    if self.module:
      return ["-m", self.module, f"--out={root}/{self.name}", *self.flags]
    cmd = ["train.py", f"--config={self.config}", f"--workdir={root}/{self.name}",
           *self.flags]
    if self.seed is not None:
      cmd += [f"--config.train.seed={self.seed}", f"--config.data.seed={self.seed}"]
    return cmd


@dataclasses.dataclass(frozen=True)
class Compare:
  """The paper says arm `better` beats arm `worse` on `metric` (higher is better)."""
  claim: str          # The paper's statement, short.
  paper: str          # The paper's number for it.
  better: str
  worse: str
  metric: str         # "mlm" (masked-token accuracy) or "task" (dev accuracy).
  kind: str = "beats"   # Or "no_worse": the paper says A costs nothing against B.


def compare(c: Compare, a: dict | None, b: dict | None) -> dict | None:
  """The comparison with its verdict, d and se, given the arms' statistics (None when an
  arm has no finished run)."""
  if not a or not b:
    return None
  word, d, se = verdict(a, b, c.kind)
  return dict(vars(c), verdict=word, d=d, se=se)


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


def verdict(a: dict, b: dict, kind: str = "beats") -> tuple[str, float, float]:
  """(verdict, d, se) for the prediction "a beats b" (kind 'beats') or "a is no worse
  than b" (kind 'no_worse'; see the module docstring)."""
  if kind not in ("beats", "no_worse"):
    raise ValueError(f"kind must be 'beats' or 'no_worse', not {kind!r}.")
  d = a["mean"] - b["mean"]
  se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
  if kind == "no_worse":
    word = "reproduced" if d >= -se else "not reproduced"
  elif d > se:
    word = "reproduced"
  elif d > 0:
    word = "direction reproduced"
  else:
    word = "not reproduced"
  if min(a["seeds"], b["seeds"]) < 2:
    word += " (one seed: provisional)"
  return word, d, se


def record_path(claim: str, name: str) -> pathlib.Path:
  """Where the record of run `name` of `claim` lives (docs/fidelity/records/...)."""
  return OUT / "records" / claim / f"{name}.json"


def load(claim: str, name: str) -> dict | None:
  """The recorded results.json of a finished run, or None."""
  path = record_path(claim, name)
  return json.loads(path.read_text()) if path.exists() else None


def pm(st: dict | None) -> str:
  """An arm's statistics as 'mean ± sd (n seeds)' (or its one-seed se)."""
  if not st:
    return "pending"
  if st["sd"] is None:
    return f"{st['mean']:.4f} (1 seed, se {st['se']:.4f})"
  return f"{st['mean']:.4f} ± {st['sd']:.4f} ({st['seeds']} seeds)"




def verdict_table(compares: list[dict], metric_column: bool = False) -> list[str]:
  """The comparisons as Markdown table lines: claim, A, B, A - B and se in points, verdict."""
  metric = " metric |" if metric_column else ""
  lines = [f"| claim (paper's words or number) | A | B |{metric} A - B | combined se | "
           "verdict |", "|---|---|---|" + ("---|" if metric_column else "") + "---|---|---|"]
  for c in compares:
    m = ""
    if metric_column:
      m = " masked-token acc. |" if c["metric"] == "mlm" else " RT dev acc. |"
    lines.append(f"| {c['claim']} ({c['paper']}) | {c['better']} | {c['worse']} |{m} "
                 f"{c['d'] * 100:+.2f} | {c['se'] * 100:.2f} | {c['verdict']} |")
  return lines


def figure(ncols: int = 1, size: tuple[float, float] = (6, 4)):
  """A headless matplotlib (figure, axes): one row of `ncols` axes."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt.subplots(1, ncols, figsize=size)


def save(fig, ax, path: pathlib.Path, ylabel: str = "Rotten Tomatoes dev accuracy") -> None:
  """Grid, label, legend (if anything is labelled) on each axes, then writes and closes
  the figure. `ax`: one axes or a sequence of them (`ylabel` then one per axes)."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  axes = list(ax) if hasattr(ax, "__len__") else [ax]
  labels = [ylabel] * len(axes) if isinstance(ylabel, str) else list(ylabel)
  for a, label in zip(axes, labels):
    a.set_ylabel(label)
    a.grid(alpha=0.3)
    if a.get_legend_handles_labels()[0]:
      a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

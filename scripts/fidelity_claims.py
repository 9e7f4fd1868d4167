"""The papers' claims as experiments: each claim's runs, its comparisons and its table.

A claim is a list of runs (`Run`: a `train.py` config spec, a seed, the runs it needs
first) and a list of comparisons (`Compare`: arm A beats arm B on a metric, by how much the
paper says). `scripts/reproduce.py` trains the runs that are missing, then turns the
finished ones into a table, verdicts and a plot.
"""

from __future__ import annotations

import dataclasses

MLM_ARMS = ("dense", "nodiag", "strided", "fixed", "longformer", "logsparse", "bigbird",
            "star", "dam_u", "dam_s")
# The two DAM penalty strengths (lam x mean mask density), chosen from the fine-tuning
# lambda sweep (docs/results.md: 0.3 -> 78.5 %, 1 -> 86.8 % of valid pairs) before any
# masked-LM run, to bracket the README's DAM sparsities (78.9-93.5 %).
DAM_LAMS = (0.3, 1.0)


@dataclasses.dataclass(frozen=True)
class Run:
  """One `train.py` run: `name` (its workdir under the claim's), config spec, seed."""
  name: str
  config: str
  seed: int | None = None   # None: the config's own seed (train and data seed otherwise).
  needs: tuple[str, ...] = ()   # Runs whose checkpoints this one reads.

  def command(self, root: str) -> list[str]:
    cmd = ["train.py", f"--config={self.config}", f"--workdir={root}/{self.name}"]
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


def sparsebert_arms() -> list[tuple[str, str, str]]:
  """(arm id, configs/mlm.py argument, configs/finetune.py mask argument) per arm."""
  out = []
  for arm in MLM_ARMS:
    if arm.startswith("dam"):
      for lam in DAM_LAMS:
        out.append((f"{arm}_lam{lam:g}", f"arm={arm},lam={lam:g}", "masks"))
    elif arm == "dense":
      out.append((arm, "arm=dense", ""))
    elif arm == "nodiag":
      out.append((arm, "arm=nodiag", "nodiag"))
    else:
      out.append((arm, f"arm={arm}", f"pattern=sparsebert_{arm}"))
  return out


def sparsebert_runs(seeds: tuple[int, ...], root: str) -> list[Run]:
  """The masked-LM head fit, then per seed and arm: masked-LM training at n = 128, then
  Rotten Tomatoes fine-tuning at max_len 128 from that encoder with its mask frozen."""
  runs = [Run("mlm_head", "configs/mlm.py:fit_head")]
  for seed in seeds:
    for arm, mlm_arg, ft_mask in sparsebert_arms():
      mlm = Run(f"mlm_{arm}_s{seed}",
                f"configs/mlm.py:head={root}/mlm_head,{mlm_arg},seed={seed}",
                needs=("mlm_head",))
      mask = {"masks": f",masks={root}/{mlm.name}/masks", "": ""}.get(ft_mask,
                                                                    f",{ft_mask}")
      ft = Run(f"ft_{arm}_s{seed}",
               f"configs/finetune.py:max_len=128,init={root}/{mlm.name}{mask}", seed,
               needs=(mlm.name,))
      runs += [mlm, ft]
  return runs


def sparsebert_compares() -> list[Compare]:
  out = []
  for metric in ("mlm", "task"):
    out.append(Compare("Removing the diagonal costs nothing (no-diagonal >= dense)",
                       "equal or better GLUE / SQuAD (numbers not in the README)",
                       "nodiag", "dense", metric))
    for lam in DAM_LAMS:
      out.append(Compare("DAM_u beats DAM_s", "README GLUE avg 82.0 (DAM_u) vs 80.9 (DAM_s)",
                         f"dam_u_lam{lam:g}", f"dam_s_lam{lam:g}", metric))
  return out


def sparsebert_fixed_compares(sparsity: dict[str, float]) -> list[Compare]:
  """DAM beats each fixed pattern that is as sparse or sparser (n x n accounting, from
  the finished runs), as the README's ordering says."""
  out = []
  fixed = [a for a in MLM_ARMS[2:8] if a in sparsity]
  for dam in [a for a in sparsity if a.startswith("dam")]:
    for f in fixed:
      if sparsity[f] <= sparsity[dam] + 0.02:   # DAM as sparse (within 2 points) or sparser.
        for metric in ("mlm", "task"):
          out.append(Compare("DAM beats fixed patterns at similar or higher sparsity",
                             "README GLUE avg: DAM_u 80.8-82.0, DAM_s 79.6-80.9; fixed "
                             "77.9-80.1", dam, f, metric))
  return out

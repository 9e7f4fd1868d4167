"""Self-pruning of attention sublayers while fine-tuning MiniLM (Not All Attention).

A documented reconstruction (the paper's algorithm could not be recovered; see
sparse_attn/learn/prune.py): a hard-concrete gate per attention sublayer, learned jointly
with the weights under a budget penalty; the top-k gates by logit are kept at the end.
Then the physically smaller model (pruned sublayers removed from config and parameters) is
extracted and briefly re-tuned with the structure frozen.

Commands (CPU, 2 cores: a few minutes each):
  python train.py --config configs/prune.py --workdir runs/prune              # search
  python train.py --config configs/prune.py:retune=runs/prune --workdir runs/pruned
  python eval.py --workdir runs/pruned
Expected: 4 of 6 attention sublayers removed; dev accuracy within ~1 point of dense.
Variants: prune=F (fraction of sublayers to remove, default 0.67), unit=head,
shift (budget="shift": the budget is met exactly at every step by a common logit offset,
so only the task gradient orders the gates), warm=W (with shift: open gates first, the
kept fraction falls to the budget over W steps),
keep_ln (a pruned layer keeps its attention LayerNorm: LN(x) instead of x),
teacher=DIR (distil from a finished run, e.g. the dense one; alpha=A, kd_temp=T), runlocal.
"""

from sparse_attn import config as config_lib
from sparse_attn.learn import prune


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.minilm_finetune(args)
  c.model.pruned_keep_layernorm = "keep_ln" in args
  if "warm" in args and "shift" not in args:
    raise ValueError("warm=W is the warm-up of the shift budget; add shift.")
  if "retune" in args:  # Phase two: the extracted smaller model, structure frozen.
    c.init_from = "pruned:" + args["retune"]
  else:
    s = prune.default_config()
    s.method = "prune"
    s.unit = args.get("unit", "layer")
    s.prune_fraction = float(args.get("prune", 0.67))
    s.beta = float(args.get("beta", 2.0))
    if "shift" in args:
      s.budget = "shift"
      s.budget_warmup_steps = int(args.get("warm", 0))
    c.structure = s
  c.optimizer.groups = config_lib.structure_groups(float(args.get("gate_lr", 0.1)))
  if "runlocal" in args:
    config_lib.apply_runlocal(c)
  return c

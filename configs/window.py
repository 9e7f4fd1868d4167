"""Learned neighbour degrees (Breaking BERT) while fine-tuning MiniLM on Rotten Tomatoes.

A documented reconstruction (the paper's LDPC-inspired algorithm could not be recovered;
see sparse_attn/learn/window.py): per layer and head, categorical logits over candidate
half-widths, straight-through Gumbel-softmax, and a penalty that pulls the expected
density over the training data's valid pairs to a target; the argmax widths are frozen
into a band mask at the end. Applied to the later layers (start=2), [CLS] global.

Command (CPU, 2 cores: about 5 minutes; dev accuracy and per-layer density printed):
  python train.py --config configs/window.py --workdir runs/window
The BigBird-style fixed mask (window + global [CLS] + random keys) of the same density
over the data's valid pairs, on the same layers, for comparison:
  python train.py --config configs/window.py:bigbird --workdir runs/bigbird
Variants (comma-separated argument):
  target=D     density target of the learned layers over valid pairs (default 0.2, i.e.
               80% sparse; the global links count).
  beta=X       penalty weight (default 1 with a target); beta=X without a target:
               plain penalty beta * density (higher = sparser), for a trade-off sweep.
  notarget     no target: the plain penalty.
  bigbird      the matched BigBird mask instead of learned windows: its window and
               random-key count (seed 0) are chosen so that its density over the training
               data's valid pairs is closest to D (building it reads and tokenises the
               training split, with this file's data settings).
  start=K      learned (or BigBird) layers K..5.
  soft         soft-window relaxation instead of the Gumbel-softmax.
  global=G     global tokens (default 1: [CLS]).
  runlocal     a smoke test in seconds.
"""

from sparse_attn import config as config_lib
from sparse_attn.learn import window


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.minilm_finetune(args)
  start = int(args.get("start", 2))
  target = float(args.get("target", 0.2))
  g = int(args.get("global", 1))
  if "runlocal" in args:
    config_lib.apply_runlocal(c)
  if "bigbird" in args:
    c.masks.source = "pattern"
    c.masks.pattern = "bigbird"
    c.masks.start_layer = start
    c.masks.kwargs = config_lib.matched_bigbird_kwargs(c, target, g)
    return c
  s = window.default_config()
  s.method = "learned_window"
  s.relaxation = "soft_window" if "soft" in args else "gumbel_softmax"
  s.per_head = True
  s.layers = list(range(start, 6))
  s.max_width = 16
  s.global_tokens = g
  s.density_over = "data"
  s.beta = float(args.get("beta", 1.0))
  if "notarget" not in args:
    s.target_density = target
  c.structure = s
  c.optimizer.groups = config_lib.structure_groups(float(args.get("mask_lr", 0.05)))
  return c


"""Learned neighbour degrees (Breaking BERT) while fine-tuning MiniLM on Rotten Tomatoes.

A documented reconstruction (the paper's LDPC-inspired algorithm could not be recovered;
see sparse_attn/learn/window.py): per layer and head, categorical logits over candidate
half-widths, straight-through Gumbel-softmax, an expected-density penalty beta; the argmax
widths are frozen into a band mask at the end. Applied to the later layers (start=2).

Command (CPU, 2 cores: a few minutes):
  python train.py --config configs/window.py --workdir runs/window
Compare with a BigBird-style fixed mask of matched density on the same layers:
  python train.py --config configs/finetune.py:pattern=bigbird,kw.window=W,kw.global_tokens=G,kw.random_keys=R,kw.seed=0,start=2 --workdir runs/bigbird
Variants: beta=X (trade-off: higher = sparser), start=K, soft (soft-window relaxation),
global=G (global tokens OR-ed in), runlocal.
"""

from sparse_attn import config as config_lib
from sparse_attn.learn import window


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.minilm_finetune(args)
  s = window.default_config()
  s.method = "learned_window"
  s.relaxation = "soft_window" if "soft" in args else "gumbel_softmax"
  s.per_head = True
  s.layers = list(range(int(args.get("start", 2)), 6))
  s.max_width = 16
  s.beta = float(args.get("beta", 1.0))
  s.global_tokens = int(args.get("global", 0))
  c.structure = s
  c.optimizer.groups = config_lib.structure_groups(float(args.get("mask_lr", 0.05)))
  if "runlocal" in args:
    config_lib.apply_runlocal(c)
  return c

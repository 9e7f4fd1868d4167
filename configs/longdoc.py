"""Long documents: MiniLM on the Linux kernel's documentation by subsystem (`linux_docs`).

MiniLM's 512 learned positions are extended to `len` by copying them (Longformer's
recipe, `extend_positions="copy"`); batches are padded to length buckets (a quarter of
`len` apart), so short documents take short steps. With `model.attention_backend="auto"`
(the default) a fixed or exported mask runs block-sparse where the policy predicts it
pays (logged, and recorded in results.json under `timing.attention_backend`).

Commands (CPU, 2 cores; docs/results.md has the runs):
  python train.py --config configs/longdoc.py --workdir runs/longdoc       # dense
    about 13 minutes; dev accuracy 0.61 (9 classes, majority 0.24), train step 7.7 s
  python train.py --config configs/longdoc.py:pattern=longformer --workdir runs/lf
    about 5 minutes; dev accuracy 0.63 at 73% sparsity, train step 2.7 s (2.9x)
  python train.py --config configs/longdoc.py:dam --workdir runs/dam_long      # search
    about 18 minutes; dev accuracy 0.62 at 79% sparsity (the search steps are dense)
  python train.py --config configs/longdoc.py:masks=runs/dam_long/masks --workdir runs/d2
    about 7 minutes; dev accuracy 0.63 at 79% sparsity, train step 2.2 s (3.5x)
Variants (comma-separated argument):
  pattern=longformer  band ±window (default 64) plus global [CLS], every layer: block-
                      sparse on the fast path (window=W sets the band).
  masks=DIR           a frozen exported mask (another run's <workdir>/masks): the second
                      phase of a learned structure, on the fast path.
  learned_window      learned neighbour widths (Breaking BERT), rounded to whole 64 x 64
                      tiles when frozen (at the defaults the widths stay at ±128: the
                      target does not bind in 80 steps; docs/results.md).
  dam                 the block DAM search: DAM_s with one logit per (head, 64-token
                      block offset), [CLS] global, target density 0.2 over valid pairs;
                      phase two (masks=<its workdir>/masks) then runs it block-sparse.
  compare             after training, time the train step against the same model dense
                      and print the speed-up next to the accuracy (compare_dense_steps).
  len=N               data.max_len (default 1024; 2048 and 4096 work too).
  steps=N             training steps (default 80, batch 4).
  runlocal            a smoke test: a few steps on a few documents.
Your own long documents: add `--config.data.source=files --config.data.task=mine
--config.data.paths.train=train.csv --config.data.paths.validation=dev.csv` (CSV with
`text` and `label` columns; see sparse_attn/data/config.py).
"""

from sparse_attn import config as config_lib
from sparse_attn.learn import dam as dam_lib
from sparse_attn.learn import window as window_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  n = int(args.get("len", 1024))
  c.extend_positions = "copy"
  c.data.task = "linux_docs"
  c.data.max_len = n
  c.data.buckets = tuple(n * i // 4 for i in (1, 2, 3))
  c.data.length_grouping = 20
  c.optimizer.learning_rate = 1e-4
  c.train.batch_size = 4                   # Dense attention at 1,024 tokens: ~12 GB here.
  # glibc's own policy: the "reuse" allocator keeps every bucket's freed [B, H, L, L]
  # temporaries, and a dense run at 1,024 tokens then grew past 24 GB.
  c.train.host_memory = "default"
  c.train.num_steps = int(args.get("steps", 80))
  c.train.eval_batch_size = 8
  c.train.log_every = 10
  c.checkpoint.every_steps = 40
  c.export.block_size = 64
  if "pattern" in args:
    if args["pattern"] != "longformer":
      raise ValueError(f"configs/longdoc.py: pattern={args['pattern']!r}; use "
                       "pattern=longformer (or configs/finetune.py for other patterns).")
    c.masks.source = "pattern"
    c.masks.pattern = "longformer"
    c.masks.kwargs = {"window": int(args.get("window", 64)), "global_tokens": 1}
  if "masks" in args:
    c.masks.source = args["masks"]
  if "dam" in args:
    s = dam_lib.default_config()
    s.method = "dam_s"
    s.per_head = True
    s.block_size = 64
    s.init_logit = 2.0
    s.density_over = "data"
    s.target_density = 0.2
    s.eval_rule = "topk"
    s.target_mode = "abs"
    s.lam = 1.0
    s.target_warmup_steps = 30
    c.structure = s
    c.masks.source = "pattern"
    c.masks.pattern = "global"
    c.masks.kwargs = {"g": 1}
    c.masks.combine = "or"
    c.optimizer.groups = config_lib.structure_groups(0.1)
  if "compare" in args:
    c.train.compare_dense_steps = 3
  if "learned_window" in args:
    s = window_lib.default_config()
    s.method = "learned_window"
    s.per_head = True
    s.max_width = 128
    s.global_tokens = 1
    s.target_density = 0.15
    s.block_size = 64
    c.structure = s
    c.optimizer.groups = config_lib.structure_groups(0.05)
  if "runlocal" in args:
    config_lib.apply_runlocal(c)
    if c.structure.get("target_warmup_steps"):
      c.structure.target_warmup_steps = 2
    c.data.max_train_examples = 16
    c.data.max_eval_examples = 16
    c.train.batch_size = 4
    c.train.eval_batch_size = 8
  return c

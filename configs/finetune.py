"""Fine-tune the pretrained MiniLM on the offline Rotten Tomatoes sentiment data (dense).

Command (CPU, 2 cores: about 4 minutes; dev accuracy about 0.81, see docs/results.md):
  python train.py --config configs/finetune.py --workdir runs/finetune
Variants (one string argument, comma-separated):
  runlocal         a few steps on a few examples: a smoke test in seconds.
  task=wnut16      NER on the offline WNUT-16 tweets (entity F1).
  task=<glue/...>  a tensorflow-datasets task (needs the dataset prepared locally).
  nodiag           SparseBERT's diagonal removal on every layer (otherwise dense).
  pattern=NAME     a fixed pattern from sparse_attn.masks.patterns on every layer, e.g.
                   pattern=window,kw.k=4 (kw.NAME=VALUE are the builder's arguments),
                   pattern=sparsebert_bigbird.
  start=K          apply the mask to layers K.. only (dense below).
  teacher=DIR      distil from a finished run (alpha=A, kd_temp=T; sparse_attn/distill.py).
  max_len=N        masks built at N x N (default 64; buckets 16, 32, 48, 64 .. N), e.g.
                   128 for SparseBERT's length: a sentence sees the top-left corner.
  masks=DIR        fixed masks exported by another run (e.g. a configs/mlm.py arm).
  init=DIR         start from that run's encoder (e.g. its masked-LM training).
"""

from sparse_attn import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.minilm_finetune(args)
  task = args.get("task", "rotten_tomatoes")
  if task.startswith("glue/") or task in ("imdb_reviews", "conll2003"):
    c.data.source = "tfds"
  c.data.task = task
  if "max_len" in args:
    n = int(args["max_len"])
    c.data.max_len = n
    c.data.buckets = tuple(b for b in (16, 32, 48, 64) if b < n) + (n,)
  if "init" in args:
    c.init_from = "run:" + args["init"]
  if "masks" in args:
    c.masks.source = args["masks"]
  if "nodiag" in args:  # SparseBERT: remove the diagonal of every layer's attention.
    c.masks.remove_diagonal = True
  if "pattern" in args:  # A fixed pattern on every layer, e.g. pattern=sparsebert_star.
    c.masks.source = "pattern"
    c.masks.pattern = args["pattern"]
    c.masks.kwargs = {k[3:]: config_lib.number(v) for k, v in args.items()
                      if k.startswith("kw.")}
  if "start" in args:  # Masks on layers start..L-1 only (Breaking BERT: later layers).
    c.masks.start_layer = int(args["start"])
  if "runlocal" in args:
    config_lib.apply_runlocal(c)
  return c

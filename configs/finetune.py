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
                   pattern=sparsebert_bigbird; pattern=syntax | lexical: Breaking BERT's
                   per-example masks built from each text (sparse_attn.example_masks),
                   e.g. pattern=syntax,kw.distance=1 or pattern=lexical,kw.top_r=1.
  start=K          apply the mask to layers K.. only (dense below).
  teacher=DIR      distil from a finished run (alpha=A, kd_temp=T; sparse_attn/distill.py).
  max_len=N        masks built at N x N (default 64; buckets 16, 32, 48, 64 .. N), e.g.
                   128 for SparseBERT's length: a sentence sees the top-left corner.
  masks=DIR        fixed masks exported by another run (e.g. a configs/mlm.py arm).
  init=DIR         start from that run's encoder (e.g. its masked-LM training).
  match=D          with pattern=window | random | bigbird: the pattern's degrees chosen so
                   that its density over the training data's valid pairs is closest to D
                   (window: the band; random: the diagonal plus r random keys a row;
                   bigbird: the widest band with global=G tokens (default 1), then random
                   keys; config.matched_bigbird_kwargs). drop=window | global | random
                   then removes that part of the matched BigBird mask (window: the band
                   shrinks to the diagonal), the other degrees unchanged.
"""

from sparse_attn import config as config_lib
from sparse_attn import example_masks


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
  if args.get("pattern") in example_masks.SOURCES:  # Per-example, from each text.
    c.masks.source = args["pattern"]
    c.masks.kwargs = {k[3:]: config_lib.number(v) for k, v in args.items()
                      if k.startswith("kw.")}
  elif "pattern" in args:  # A fixed pattern on every layer, e.g. pattern=sparsebert_star.
    c.masks.source = "pattern"
    c.masks.pattern = args["pattern"]
    c.masks.kwargs = {k[3:]: config_lib.number(v) for k, v in args.items()
                      if k.startswith("kw.")}
  if "start" in args:  # Masks on layers start..L-1 only (Breaking BERT: later layers).
    c.masks.start_layer = int(args["start"])
  if "runlocal" in args:
    config_lib.apply_runlocal(c)
  if "match" in args:
    _match(c, args)
  elif "drop" in args:
    raise ValueError("configs/finetune.py: drop= removes a part of a matched mask; add "
                     "pattern=bigbird,match=D.")
  return c


def _match(c, args) -> None:
  pattern, target = args.get("pattern"), float(args["match"])
  if pattern not in ("window", "random", "bigbird"):
    raise ValueError(f"configs/finetune.py: match= needs pattern=window, random or bigbird "
                     f"(got pattern={pattern!r}).")
  g = int(args.get("global", 1 if pattern == "bigbird" else 0))
  fixed = {"window": {"random_keys": 0}, "random": {"window": 0}, "bigbird": {}}[pattern]
  kw = config_lib.matched_bigbird_kwargs(c, target, g, **fixed)
  drop = args.get("drop")
  if drop is not None:
    if pattern != "bigbird" or drop not in ("window", "global", "random"):
      raise ValueError("configs/finetune.py: drop=window | global | random applies to "
                       "pattern=bigbird,match=D.")
    kw[{"window": "window", "global": "global_tokens", "random": "random_keys"}[drop]] = 0
  c.masks.pattern = "bigbird"
  c.masks.kwargs = kw

"""Fine-tune the pretrained MiniLM on the offline Rotten Tomatoes sentiment data (dense).

Command (CPU, 2 cores: about 3 minutes; dev accuracy about 0.80-0.83):
  python train.py --config configs/finetune.py --workdir runs/finetune
Variants (one string argument, comma-separated):
  runlocal         a few steps on a few examples: a smoke test in seconds.
  task=wnut16      NER on the offline WNUT-16 tweets (entity F1).
  task=<glue/...>  a tensorflow-datasets task (needs the dataset prepared locally).
"""

from sparse_attn import config as config_lib


def parse(arg: str | None) -> dict[str, str]:
  """'runlocal,task=wnut16' -> {'runlocal': '', 'task': 'wnut16'}."""
  out = {}
  for part in (arg or "").split(","):
    if part:
      k, _, v = part.partition("=")
      out[k.strip()] = v.strip()
  return out


def get_config(arg: str | None = None):
  args = parse(arg)
  c = config_lib.base_config()
  task = args.get("task", "rotten_tomatoes")
  if task.startswith("glue/") or task in ("imdb_reviews", "conll2003"):
    c.data.source = "tfds"
  c.data.task = task
  c.data.max_len = 64
  c.data.buckets = [32, 64]
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_fraction = 0.1
  c.train.batch_size = 32
  c.train.num_epochs = 1.0
  c.train.num_steps = 100
  c.train.eval_batch_size = 128
  c.train.log_every = 10
  c.checkpoint.every_steps = 50
  if "runlocal" in args:
    c.data.max_train_examples = 64
    c.data.max_eval_examples = 64
    c.train.batch_size = 8
    c.train.num_steps = 4
    c.train.log_every = 1
    c.checkpoint.every_steps = 2
  return c

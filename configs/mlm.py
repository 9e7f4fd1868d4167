"""SparseBERT's regime: masked-LM training of MiniLM at n = 128 with a fixed or learned mask.

The text is the Linux kernel's documentation (`linux_docs_mlm`, Debian's linux-doc-6.1),
packed into rows that fill all 128 positions, so sparsity over valid pairs and over the
128 x 128 matrix (SparseBERT's accounting) agree. Two phases:

1. Fit the masked-LM head on the frozen encoder (no offline package ships MiniLM's
   pretrained MLM head, so the head is fitted, dense, before any mask is searched; the
   encoder, word embeddings included, gets no update):
     python train.py --config configs/mlm.py:fit_head --workdir runs/mlm_head
2. Continued masked-LM training from that run with one arm's mask (same steps, data and
   seeds for every arm); held-out masked-token accuracy and loss are the metrics:
     python train.py --config configs/mlm.py:head=runs/mlm_head,arm=dense --workdir ...
   arm = dense | nodiag | strided | fixed | longformer | logsparse | bigbird | star (the
   SparseBERT presets at their README sparsities, `masks.patterns.sparsebert_*`) |
   dam_u | dam_s (the Differentiable Attention Mask learned jointly, per head, one mask
   for all layers, the code's penalty lam x ||M||_1 over the 12 x 128 x 128 mask and its
   initial logits ~ 0: lam=X, default 1e-4, the code's default and the README's smallest).
Then SparseBERT's order, fine-tuning with the mask frozen, is configs/finetune.py at
max_len=128 from the arm's encoder (`init=runs/<arm>`, with `masks=runs/<arm>/masks`).

Variants: steps=N (default 100), batch=B (16), seed=S (train and data seed), runlocal.
"""

from sparse_attn import config as config_lib
from sparse_attn.learn import dam as dam_lib

PRESETS = ("strided", "fixed", "longformer", "logsparse", "bigbird", "star")
ARMS = ("dense", "nodiag", *PRESETS, "dam_u", "dam_s")


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.data.task = "linux_docs_mlm"
  c.data.max_len = 128
  c.data.buckets = ()
  c.train.batch_size = int(args.get("batch", 16))
  c.train.eval_batch_size = 32
  c.train.max_eval_batches = 16             # 512 held-out rows, ~10,000 masked tokens.
  c.train.num_steps = int(args.get("steps", 100))
  c.train.log_every = 10
  c.train.seed = c.data.seed = int(args.get("seed", 0))
  c.checkpoint.every_steps = 50
  c.optimizer.learning_rate = 5e-5
  if "fit_head" in args:
    if "head" in args or "arm" in args:
      raise ValueError("configs/mlm.py: fit_head is phase one; arm= and head= are phase two.")
    c.optimizer.learning_rate = 1e-3
    c.optimizer.groups = [("model/bert/.*", dict(frozen=True)),
                          ("model/.*(bias|LayerNorm|scale).*", dict(weight_decay=0.0))]
    c.train.num_steps = int(args.get("steps", 200))
    c.export.masks = False
  else:
    if "head" not in args:
      raise ValueError("configs/mlm.py: phase two starts from a fitted head: add "
                       "head=<the fit_head run> (or fit_head to fit one).")
    c.init_from = "run:" + args["head"]
    _arm(c, args.get("arm", "dense"), float(args.get("lam", 1e-4)))
  if "runlocal" in args:
    config_lib.apply_runlocal(c)
    c.train.max_eval_batches = 2
  return c


def _arm(c, arm: str, lam: float) -> None:
  if arm not in ARMS:
    raise ValueError(f"configs/mlm.py: arm={arm!r}; use one of {', '.join(ARMS)}.")
  if arm == "nodiag":
    c.masks.remove_diagonal = True
  elif arm in PRESETS:
    c.masks.source = "pattern"
    c.masks.pattern = "sparsebert_" + arm
  elif arm in ("dam_u", "dam_s"):
    s = dam_lib.default_config(arm)
    s.share = "all_layers"
    s.per_head = True
    # The official code's search: logits ~ 0 (P(keep) = 0.5), penalty lam x ||M||_1
    # summed over the H x n x n mask (counted once: one mask for all layers).
    s.penalty = "l1_sum"
    s.lam = lam
    c.structure = s
    c.optimizer.groups = config_lib.structure_groups(0.1)

"""SparseBERT's Differentiable Attention Mask, learned while fine-tuning MiniLM.

The DAM logits are trained jointly with the weights (their own learning rate, no weight
decay) while a penalty pulls the mask's expected density over the data's valid pairs to a
target; evaluation, checkpoints and export use the deterministic mask that keeps the top
logits to that density (with lam=X: sigmoid(alpha) > 0.5).

Command (CPU, 2 cores: about 5 minutes; dev accuracy ~0.77 at ~77% attention sparsity,
against ~0.81 for the dense run of configs/finetune.py; see docs/results.md):
  python train.py --config configs/dam.py --workdir runs/dam
  python eval.py --workdir runs/dam --export_masks runs/dam/masks
Variants (comma-separated argument):
  method=dam_s|dam_u     structured (per diagonal offset) or unstructured (per position).
  official               the han-shi/SparseBERT code's settings: DAM_s per head shared by
                         all layers, hard Gumbel-sigmoid at tau=1, lambda * ||M||_1.
                         (The code also samples noisy masks at evaluation; the preset sets
                         stochastic_eval, but train.py evaluates, checkpoints and exports
                         the deterministic sigmoid(alpha) > 0.5 mask.)
  lam=X                  weight of the plain penalty lam * (mask density over valid
                         pairs), instead of the target (sweep e.g. 0.03 .. 3, higher =
                         sparser); the evaluation mask is then sigmoid(alpha) > 0.5.
  target=X               target density of the learned mask over the training data's
                         valid (query, key) pairs (default 0.15; the global [CLS] links
                         add ~0.07, so about 77% of valid pairs end up masked); the
                         evaluation mask keeps the top logits to exactly this density.
  global=G               the first G tokens ([CLS] for G=1) always attend and are attended
                         (a fixed mask OR-ed with the learned one; default 1, 0 = off).
  sep                    [SEP] is an attention sink: every query may attend to its
                         example's [SEP] in every layer (masks.sink_tokens), as BERT heads
                         park attention there; lower target by ~0.04 to keep the sparsity.
  init=X                 initial logit (default 2: P(keep) = 0.88, i.e. start near the
                         pretrained dense model; SparseBERT's pre-training used 0).
  per_layer              one mask per layer instead of one shared by all layers.
  block=B                one logit per B x B block (runs fast on block-sparse kernels).
  nodiag                 force the diagonal off (SparseBERT's diagonal finding).
  task=shakespeare       DAM during masked-LM training on the offline Shakespeare text.
  steps=N                training steps (default 150).
  teacher=DIR            distil from a finished run (e.g. the dense configs/finetune.py
                         run): loss (1 - alpha) CE + alpha T^2 KL; alpha=A (0.5), kd_temp=T (2).
  masks=DIR              fine-tune with fixed masks exported by a previous run (second
                         phase of the SparseBERT recipe: search, then train frozen).
  runlocal               a smoke test in seconds.
"""

from sparse_attn import config as config_lib
from sparse_attn.learn import dam


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.minilm_finetune(args)
  c.data.task = args.get("task", "rotten_tomatoes")
  if c.data.task == "shakespeare":
    c.init_from = "minilm"
    c.data.max_len = 128
    c.data.buckets = ()
    c.optimizer.learning_rate = 5e-5

  if "sep" in args:
    c.masks.sink_tokens = ("[SEP]",)
  if "masks" in args:  # Phase two: the learned mask, frozen.
    c.masks.source = args["masks"]
  else:
    s = dam.official() if "official" in args else dam.default_config()
    s.method = args.get("method", "dam_s")
    s.per_head = True
    s.share = "per_layer" if "per_layer" in args else "all_layers"
    s.block_size = int(args.get("block", 0))
    s.keep_diagonal = "nodiag" not in args
    g = int(args.get("global", 0 if "official" in args else 1))
    if g:
      c.masks.source = "pattern"
      c.masks.pattern = "global"
      c.masks.kwargs = {"g": g}
      c.masks.combine = "or"
    if "official" not in args:
      s.init_logit = float(args.get("init", 2.0))
      s.density_over = "data"  # Densities over valid pairs, as evaluation reports.
      if "lam" in args:
        s.penalty = "density"
        s.lam = float(args["lam"])
      else:
        s.target_density = float(args.get("target", 0.15))
        s.eval_rule = "topk"
        s.target_mode = "abs"
        s.lam = 1.0
        s.target_warmup_steps = 50
    c.structure = s
  # Mask logits: their own (larger) learning rate, constant, no weight decay.
  c.optimizer.groups = config_lib.structure_groups(float(args.get("mask_lr", 0.1)))
  if "runlocal" in args:
    config_lib.apply_runlocal(c)
    if "structure" in c and c.structure.get("target_warmup_steps"):
      c.structure.target_warmup_steps = 2
  return c

"""Train a sparse_attn experiment: python train.py --config configs/X.py[:arg] --workdir DIR."""

import sys

from absl import flags, logging
from ml_collections import config_flags

from sparse_attn import cli

config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  # After flag parsing: JAX reads its own flags on import.
  from sparse_attn import evaluation, train  # pylint: disable=import-outside-toplevel
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  summary = {k: v for k, v in results.items() if not isinstance(v, dict)}
  timing = results.pop("timing", None)
  masks = results.pop("masks", None)
  for split, metrics in results.items():
    if isinstance(metrics, dict):
      print(evaluation.format_metrics(split, metrics))
  if timing:
    step_s, rate = timing["train_step_s"], timing["eval_examples_per_s"]
    print(f"[timing] train step {step_s:.3f} s (median)  " if step_s else "[timing] ",
          f"evaluation {rate:.1f} examples/s" if rate else "", sep="")
    if (d := timing.get("dense_comparison")):
      print(f"[timing] at L={d['length']}: train step {d['train_step_s']:.3f} s with this "
            f"structure vs {d['dense_train_step_s']:.3f} s for the model dense: "
            f"x{d['speedup_vs_dense']:.2f}")
    for length, layers in timing["attention_backend"].items():
      groups: dict[str, list[str]] = {}   # Layers that ran the same way, once.
      for layer, why in layers.items():
        groups.setdefault(why, []).append(layer.removeprefix("layer_"))
      print(f"[attention] L={length}: " + "; ".join(
          f"layers {','.join(ids)}: {why}" for why, ids in groups.items()))
  if masks:
    blocks = "  ".join(f"b={b}: {d:.3f}" for b, d in masks["block_density"].items())
    over_pairs = "  ".join(f"{d:.4f} over {split}'s valid pairs (as reported)"
                           for split, d in masks["reported_density"].items())
    print(f"[masks] exported density: {over_pairs}  {masks['element_density']:.4f} over the "
          f"n x n matrix (n={masks['seq_len']})  block density {blocks}")
  print("  ".join(f"{k}={v}" for k, v in summary.items()))
  if results.get("preempted"):
    sys.exit(143)  # 128 + SIGTERM: the scheduler sees a preempted, resumable job.


if __name__ == "__main__":
  cli.run(main)

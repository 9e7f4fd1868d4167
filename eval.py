"""Evaluate a run's checkpoint and export its masks.

  python eval.py --workdir DIR                       # dev metrics of the latest checkpoint
  python eval.py --workdir DIR --export_masks OUT    # also export the masks (npz, JSON,
                                                     # orbax, FlexAttention, Splash, PNGs)
"""

import json

from absl import flags, logging
from ml_collections import config_flags

from sparse_attn import cli

config_flags.DEFINE_config_file("config", None, "Optional config (default: the run's own).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("export_masks", None, "Directory to export the run's masks into.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from sparse_attn import evaluation, export
  if FLAGS.export_masks:  # Refuse a bad destination before the evaluation, not after.
    export.check_destination(FLAGS.export_masks)
  metrics, run, frozen = evaluation.evaluate_workdir(FLAGS.workdir, FLAGS.config, FLAGS.step)
  for split, m in metrics.items():
    print(evaluation.format_metrics(split, m))
  evaluation.check_finite_metrics(metrics, f"eval.py --workdir {FLAGS.workdir}")
  if FLAGS.export_masks:
    written = export.export_masks(frozen, FLAGS.export_masks)
    print(json.dumps({"exported": [str(p) for p in written]}, indent=1))


if __name__ == "__main__":
  cli.run(main)

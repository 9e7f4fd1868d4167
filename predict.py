"""Apply a finished run to new text.

  python predict.py --workdir DIR --input FILE [--output OUT.jsonl] [--batch_size N]

FILE: one text per line, or CSV / TSV / JSONL with the run's text columns. Writes JSONL,
one object per input in input order (label and probabilities; tags for token tasks), to
OUT or to stdout; a progress line goes to stderr.
"""

import json
import os
import sys

from absl import flags, logging

from sparse_attn import cli

flags.DEFINE_string("workdir", None, "The finished run's directory.")
flags.DEFINE_string("input", None, "Texts: one per line, or .csv / .tsv / .jsonl.")
flags.DEFINE_string("output", None, "JSONL file to write (default: stdout).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("batch_size", 32, "Texts per forward pass.")
flags.mark_flags_as_required(["workdir", "input"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from sparse_attn import config as config_lib, predict, process, restore
  process.prepare_process(config_lib.validate(config_lib.base_config()))
  run = restore.load_run(FLAGS.workdir, FLAGS.step)
  texts = predict.read_inputs(FLAGS.input, run.task.text_fields)
  rows = run.predict(texts, batch_size=FLAGS.batch_size,
                     progress=predict.Progress(sys.stderr))
  lines = "".join(json.dumps(row) + "\n" for row in rows)
  if not FLAGS.output:
    sys.stdout.write(lines)
    return
  tmp = FLAGS.output + ".tmp"          # Renamed when complete: never a half-written file.
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(lines)
  os.replace(tmp, FLAGS.output)


if __name__ == "__main__":
  cli.run(main)

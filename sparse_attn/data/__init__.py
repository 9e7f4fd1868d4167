"""Data for sparse_attn: sources, tokenisation, batching, tasks and metrics.

Usage from a training loop::

  from sparse_attn import data
  task = data.get_task(config.data)          # kind, num_labels, metric_names, main_metric
  tok = data.load_tokenizer(config.data.tokenizer)
  ds = data.build_dataset(config.data, "train", tokenizer=tok)
  for batch in ds.batches(batch_size, seed=config.data.seed, start_step=step): ...
  metrics = data.compute_metrics(task, predictions, labels, weights)

Config keys and defaults: ``data.default_config()`` (documented in ``config.py``).
"""

from sparse_attn.data.batching import Dataset, bucket_lengths, epoch_permutation
from sparse_attn.data.build import build_dataset, get_task, load_examples
from sparse_attn.data.config import default_config, with_defaults
from sparse_attn.data.files import BadRowError
from sparse_attn.data.metrics import (accuracy, compute_metrics, entity_scores, f1_binary,
                                      matthews_corrcoef, pearson, rankdata, spearman)
from sparse_attn.data.mlm import mask_tokens
from sparse_attn.data.tasks import KINDS, SOURCES, SPLITS, Examples, Task, is_chunk_tag_set
from sparse_attn.data.text import (Encoded, SpecialIds, encode_texts, encode_words,
                                   load_tokenizer, pack_texts, special_ids)
from sparse_attn.data.tfds_source import TfdsNotPreparedError

__all__ = [
    "BadRowError", "Dataset", "Encoded", "Examples", "KINDS", "SOURCES", "SPLITS",
    "SpecialIds", "Task", "TfdsNotPreparedError", "accuracy", "bucket_lengths",
    "build_dataset", "compute_metrics", "default_config", "encode_texts", "encode_words",
    "entity_scores", "epoch_permutation", "f1_binary", "get_task", "is_chunk_tag_set",
    "load_examples", "load_tokenizer", "mask_tokens", "matthews_corrcoef", "pack_texts", "pearson",
    "rankdata", "spearman", "special_ids", "with_defaults",
]

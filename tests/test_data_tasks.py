"""Tests for the data config, task registry and get_task / build_dataset argument errors."""

from __future__ import annotations

import ml_collections
import pytest

from sparse_attn import data
from sparse_attn.data.tasks import OFFLINE_TASKS, TFDS_TASKS


def test_default_config_keys_and_with_defaults():
  c = data.default_config()
  assert isinstance(c, ml_collections.ConfigDict)
  assert (c.source, c.task, c.max_len, list(c.buckets), c.seed) == (
      "offline", "rotten_tomatoes", 128, [32, 64], 0)
  assert (c.mlm_probability, c.max_predictions_per_seq) == (0.15, 20)
  filled = data.with_defaults({"task": "wnut16", "splits": {"test": "validation"}})
  assert filled.task == "wnut16" and filled.max_len == 128
  assert dict(filled.splits) == dict(train="", validation="", test="validation")
  with pytest.raises(ValueError, match=r"Unknown data config key\(s\) \['max_length'\]"):
    data.with_defaults({"max_length": 64})
  with pytest.raises(ValueError, match=r"Unknown key\(s\) \['dev'\] in data.splits"):
    data.with_defaults({"splits": {"dev": "x"}})


def test_unknown_source_and_task_list_valid_names():
  with pytest.raises(ValueError, match=r"Unknown data source 'hf'; valid sources: "
                                       r"\['offline', 'tfds', 'files'\]"):
    data.get_task({"source": "hf"})
  with pytest.raises(ValueError, match=r"Unknown task 'sst2' for source 'tfds'; valid "
                                       r"tasks: \['conll2003', 'glue/cola'"):
    data.get_task({"source": "tfds", "task": "sst2"})
  with pytest.raises(ValueError, match="rotten_tomatoes"):
    data.get_task({"source": "offline", "task": "glue/sst2"})
  with pytest.raises(ValueError, match="Unknown data kind 'ranking'"):
    data.get_task({"source": "files", "kind": "ranking", "labels": ["a"]})
  with pytest.raises(ValueError, match="needs the label set"):
    data.get_task({"source": "files"})


def test_official_metrics_per_task():
  metrics = {n: t.metric_names for n, t in TFDS_TASKS.items()}
  assert metrics["glue/cola"] == ("matthews_corrcoef", "accuracy")
  assert metrics["glue/mrpc"] == metrics["glue/qqp"] == ("f1", "accuracy")
  assert metrics["glue/stsb"] == ("pearson", "spearman")
  for n in ("sst2", "mnli", "qnli", "rte", "wnli"):
    assert metrics[f"glue/{n}"] == ("accuracy",)
  assert metrics["imdb_reviews"] == ("accuracy",)
  assert metrics["conll2003"] == ("f1", "precision", "recall", "accuracy")
  assert len([n for n in TFDS_TASKS if n.startswith("glue/")]) == 9
  assert TFDS_TASKS["glue/mnli"].num_labels == 3 and TFDS_TASKS["conll2003"].num_labels == 9
  assert OFFLINE_TASKS["shakespeare"].main_metric == "accuracy"
  with pytest.raises(ValueError, match="Unknown task kind"):
    data.Task(name="x", source="files", kind="ranking")


def test_split_overrides_and_example_limits():
  task = data.get_task({"splits": {"validation": "test"}})
  assert task.splits == dict(train="train", validation="test", test="test")
  ex = data.load_examples({"max_eval_examples": 50, "splits": {"validation": "test"}},
                          "validation")
  assert len(ex) == 50 and ex.texts == data.load_examples({}, "test").texts[:50]
  assert len(data.load_examples({"max_train_examples": 7}, "train")) == 7
  with pytest.raises(ValueError, match="Offline sources have splits"):
    data.load_examples({"splits": {"train": "dev"}}, "train")
  with pytest.raises(ValueError, match=r"Unknown split 'dev'; valid splits"):
    data.load_examples({}, "dev")
  with pytest.raises(ValueError, match="max_len must be >= 8"):
    data.build_dataset({"max_len": 4}, "validation")

"""Long inputs: position embeddings extended past a checkpoint's (Longformer's recipe)."""

import logging

import numpy as np
import pytest

import _tiny
from sparse_attn import config as config_lib
from sparse_attn import model as model_lib
from sparse_attn import pretrained
from sparse_attn import restore
from sparse_attn import data as data_lib
from sparse_attn.errors import UserError

CFG = model_lib.BertConfig(**_tiny.TINY_MODEL)          # 64 positions.


def _params(positions=64, d=32):
  table = np.arange(positions * d, dtype=np.float32).reshape(positions, d)
  return {"embeddings": {"position_embeddings": {"embedding": table},
                         "word_embeddings": {"embedding": np.zeros((3, d), np.float32)}}}


def test_copy_repeats_the_learned_positions(caplog):
  with caplog.at_level(logging.WARNING):
    cfg, params = pretrained.extend_positions(CFG, _params(), 150, "auto")
  assert cfg.max_position_embeddings == 150
  table = params["embeddings"]["position_embeddings"]["embedding"]
  old = _params()["embeddings"]["position_embeddings"]["embedding"]
  assert table.shape == (150, 32)
  np.testing.assert_array_equal(table[:64], old)
  np.testing.assert_array_equal(table[64:128], old)
  np.testing.assert_array_equal(table[128:], old[:22])
  assert "extending them to 150" in caplog.text
  # Other parameters are untouched; a task tree ("bert") is extended inside.
  assert params["embeddings"]["word_embeddings"]["embedding"].shape == (3, 32)
  _, task_tree = pretrained.extend_positions(CFG, {"bert": _params(), "head": 1}, 100, "copy")
  assert task_tree["head"] == 1
  assert task_tree["bert"]["embeddings"]["position_embeddings"]["embedding"].shape == (100, 32)


def test_explicit_copy_is_silent_and_short_runs_are_unchanged(caplog):
  with caplog.at_level(logging.WARNING):
    cfg, _ = pretrained.extend_positions(CFG, None, 100, "copy")
    same_cfg, same = pretrained.extend_positions(CFG, _params(), 64, "auto")
  assert cfg.max_position_embeddings == 100 and not caplog.text
  assert same_cfg is CFG and same["embeddings"]["position_embeddings"]["embedding"].shape[0] == 64


def test_off_and_unknown_rules_are_clear_errors():
  with pytest.raises(UserError, match="extend_positions='copy'"):
    pretrained.extend_positions(CFG, _params(), 100, "off")
  with pytest.raises(UserError, match="use one of"):
    pretrained.extend_positions(CFG, _params(), 100, "stretch")


def test_build_model_extends_minilm_for_a_long_run():
  c = config_lib.validate(config_lib.base_config())
  c.data.max_len = 1024
  c.extend_positions = "copy"
  task = data_lib.get_task(c.data)
  cfg, module, params = restore.build_model(c, task)
  assert cfg.max_position_embeddings == 1024
  table = params["embeddings"]["position_embeddings"]["embedding"]
  assert table.shape[0] == 1024
  np.testing.assert_array_equal(table[512:], table[:512])
  # The architecture alone (a restored run) gets the same length.
  cfg_only, _, none = restore.build_model(c, task, weights=False)
  assert none is None and cfg_only == cfg


@pytest.mark.slow
@pytest.mark.parametrize("length", [1024, 2048, 4096])
def test_long_lengths_train_and_evaluate_on_the_fast_path(tmp_path, length):
  """(slow: a tiny model at 1,024-4,096 tokens with a Longformer mask, 2 steps.)"""
  import json
  workdir = tmp_path / "run"
  _tiny.run(_tiny.train_cmd(workdir, {
      "data.max_len": length, "data.buckets": [], "model.max_position_embeddings": length,
      "masks.source": "pattern", "masks.pattern": "longformer",
      "masks.kwargs": {"window": 32, "global_tokens": 1}, "train.num_steps": 2,
      "train.batch_size": 2, "train.eval_batch_size": 2, "data.max_eval_examples": 4,
      "checkpoint.every_steps": 0}))
  results = json.loads((workdir / "results.json").read_text())
  ran = results["timing"]["attention_backend"][str(length)]
  assert all(w.startswith("blocksparse:") for w in ran.values()), ran
  # Short sentences sit inside the band (every valid pair kept); the mask itself is sparse.
  assert results["validation"]["attention_density"] == pytest.approx(1.0)
  assert 0 < results["masks"]["element_density"] < 0.1
  assert results["masks"]["seq_len"] == length

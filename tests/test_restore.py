"""Loading a finished run (`restore.load_run`): no dataset, no optimizer, the saved structure."""

import numpy as np
import pytest

import _tiny
from sparse_attn import data as data_lib
from sparse_attn import distill, optim, restore, train


@pytest.fixture(scope="module")
def dam_and_prune_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("restore")
  dam = {"method": "dam_s", "lam": 1e-3}
  prune = {"method": "prune", "unit": "layer", "prune_fraction": 0.5, "beta": 1.0}
  runs = {}
  for name, s in (("dam", dam), ("prune", prune)):
    runs[name] = root / name
    train.train_and_evaluate(_tiny.tiny_config({"structure": s, "train.num_steps": 3}),
                             str(runs[name]))
  return runs


@pytest.fixture
def no_data_no_optimizer(monkeypatch):
  """Makes building a dataset, an optimizer or a whole training setup an error."""
  def refuse(what):
    def fail(*args, **kwargs):
      raise AssertionError(f"loading a finished run called {what}")
    return fail
  monkeypatch.setattr(data_lib, "build_dataset", refuse("data.build_dataset"))
  monkeypatch.setattr(optim, "make_optimizer", refuse("optim.make_optimizer"))
  monkeypatch.setattr(train, "make_optimizer", refuse("train.make_optimizer"))
  monkeypatch.setattr(train, "setup", refuse("train.setup"))


def test_guard_catches_a_full_setup(dam_and_prune_runs, no_data_no_optimizer, tmp_path):
  """The guard above would catch the old way (rebuilding the run with `train.setup`)."""
  with pytest.raises(AssertionError, match="called"):
    train.setup(_tiny.tiny_config(), tmp_path)
  with pytest.raises(AssertionError, match="build_dataset"):
    data_lib.build_dataset(None, "train")


def test_load_run_builds_no_dataset_and_no_optimizer(dam_and_prune_runs,
                                                     no_data_no_optimizer):
  run = restore.load_run(dam_and_prune_runs["dam"])
  assert run.step == 3 and run.config.structure.method == "dam_s"
  assert run.structure.learned is None  # What it learned is its frozen structure.
  saved = np.load(dam_and_prune_runs["dam"] / "masks" / "masks.npz")
  for i, m in enumerate(run.frozen.masks):
    np.testing.assert_array_equal(m, saved[f"layer_{i}"])


def test_loading_a_teacher_tokenises_nothing(dam_and_prune_runs, no_data_no_optimizer):
  config = _tiny.tiny_config({"distill.teacher": str(dam_and_prune_runs["dam"])})
  teacher, params = distill.load_teacher(config, data_lib.get_task(config.data))
  assert teacher.frozen.masks is not None and "bert" in params


def test_extracting_a_pruned_model_tokenises_nothing(dam_and_prune_runs,
                                                     no_data_no_optimizer):
  bert_config, params = restore.extract_pruned(str(dam_and_prune_runs["prune"]), {})
  assert sorted(bert_config.heads_per_layer) == [0, 4]  # One of two layers removed.
  assert "bert" in params


def test_gates_only_runs_save_their_gates(dam_and_prune_runs):
  run = restore.load_run(dam_and_prune_runs["prune"])
  assert run.frozen.masks is None
  assert sorted(float(np.asarray(g).mean()) for g in run.frozen.gates) == [0.0, 1.0]


def test_a_run_that_is_not_there_is_named(tmp_path):
  with pytest.raises(Exception, match="distill.teacher.*no checkpoint"):
    restore.load_run(tmp_path / "nowhere", role="distill.teacher={!r}")
  assert not (tmp_path / "nowhere").exists()

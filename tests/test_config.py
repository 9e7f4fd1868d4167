"""Tests for sparse_attn/config.py: the schema, key validation and its error messages."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import pytest

import _tiny
from sparse_attn import config as config_lib


def test_base_config_validates_and_fills_defaults():
  c = config_lib.validate(config_lib.base_config())
  assert c.structure.method == "none"
  assert c.data.source == "offline" and c.data.max_len == 128
  assert c.mesh.shape == (-1, 1)
  assert [tuple(r) for r in c.mesh.rules][0] == ("batch", "data")


def test_validate_completes_structure_and_partial_data_sections():
  c = config_lib.base_config()
  c.structure = ml_collections.ConfigDict({"method": "dam_s", "lam": 1e-3})
  c.data = ml_collections.ConfigDict({"max_len": 32})
  out = config_lib.validate(c)
  assert out.structure.lam == 1e-3  # Given value kept...
  assert out.structure.temperature == 1.0  # ...the method's defaults filled in.
  assert out.data.max_len == 32 and out.data.seed == 0 and tuple(out.data.buckets) == (32, 64)


@pytest.mark.parametrize("key,value,suggest", [
    ("train.batch_sizee", 8, "batch_size"),
    ("optimizer.learning_rat", 1e-3, "learning_rate"),
    ("checkpoint.keep_bset", 1, "keep_best"),
    ("mesh.shap", (1, 1), "shape"),
    ("data.max_lenn", 16, "max_len"),
    ("data.splits.validaton", "dev", "validation"),
    ("structure.lamb", 0.1, "lam"),
    ("model.hidden_sizee", 32, "hidden_size"),
    ("init_form", "", "init_from"),
])
def test_unknown_key_names_it_and_the_close_valid_ones(key, value, suggest):
  c = config_lib.base_config()
  if key.startswith("structure."):
    c.structure = ml_collections.ConfigDict({"method": "dam_s"})
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert f"'{key}'" in msg, msg
  assert suggest in msg, msg


def test_free_form_sections_accept_any_key():
  c = config_lib.base_config()
  c.masks.kwargs = {"k": 2, "anything_goes": True}
  config_lib.validate(c)


def test_unknown_structure_method_is_an_error():
  c = config_lib.base_config()
  c.structure = ml_collections.ConfigDict({"method": "dam_x"})
  with pytest.raises(ValueError, match="dam_s"):
    config_lib.validate(c)


def test_bert_overrides_resolves_dtypes_and_tuples():
  out = config_lib.bert_overrides(ml_collections.ConfigDict(
      {"dtype": "bfloat16", "param_dtype": "float32", "heads_per_layer": [4, 0],
       "hidden_size": 32}))
  assert out["dtype"] == jnp.bfloat16 and out["param_dtype"] == jnp.float32
  assert out["heads_per_layer"] == (4, 0) and out["hidden_size"] == 32


def test_validate_accepts_a_config_saved_in_a_checkpoint():
  """evaluate_workdir rebuilds the config from its JSON: lists where tuples were."""
  import json
  saved = json.loads(json.dumps(_tiny.tiny_config().to_dict()))
  out = config_lib.validate(ml_collections.ConfigDict(saved))
  assert list(out.mesh.shape) == [-1, 1] and out.model.hidden_size == 32


def test_validate_fills_keys_that_an_older_saved_config_lacks():
  """A run saved before a key existed still restores: the key gets its default."""
  import json
  saved = json.loads(json.dumps(_tiny.tiny_config().to_dict()))
  del saved["train"]["compilation_cache"], saved["masks"]["sink_tokens"]
  del saved["data"]["length_grouping"], saved["export"]
  saved["masks"]["kwargs"] = {"k": 2}
  out = config_lib.validate(ml_collections.ConfigDict(saved))
  base = config_lib.base_config()
  assert out.train.compilation_cache == base.train.compilation_cache
  assert tuple(out.masks.sink_tokens) == () and out.data.length_grouping == 0
  assert out.export.to_dict() == base.export.to_dict()
  assert out.masks.kwargs.to_dict() == {"k": 2}  # Free-form: nothing added.
  assert out.model.hidden_size == 32


@pytest.mark.parametrize("arg", ["", "runlocal", "task=wnut16", "runlocal,task=glue/mrpc"])
def test_shipped_experiment_config_validates(arg):
  import importlib.util
  spec = importlib.util.spec_from_file_location("finetune", _tiny.REPO / "configs/finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config_lib.validate(module.get_config(arg or None))


# ------------------------------------------------------------ through the train.py CLI


def test_unknown_key_in_an_experiment_file_fails_train_py(tmp_path):
  exp = tmp_path / "exp.py"
  exp.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(_tiny.TESTS)!r})\n"
      "import _tiny\n"
      "def get_config(arg=None):\n"
      "  c = _tiny.tiny_config()\n"
      "  c.train.batch_sizee = 8\n"
      "  return c\n")
  p = _tiny.run([_tiny.PYTHON, str(_tiny.REPO / "train.py"), f"--config={exp}",
                 f"--workdir={tmp_path / 'run'}"], check=False, timeout=300)
  assert p.returncode != 0
  assert "Unknown config key 'train.batch_sizee'" in p.stderr
  assert "Did you mean ['batch_size'" in p.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_key_in_a_flag_override_fails_train_py(tmp_path):
  p = _tiny.run(_tiny.train_cmd(tmp_path / "run", None, "--config.train.batch_sizee=8"),
                check=False, timeout=300)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert "--config.train.batch_sizee=8: the config has no key 'batch_sizee' in train. " \
         "Did you mean ['batch_size'" in p.stderr
  assert not (tmp_path / "run").exists()

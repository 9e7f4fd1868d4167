"""Learned structure through the trainer: DAM export -> import round trip, pruning, windows."""

import json

import jax
import numpy as np
import pytest

import _tiny
from sparse_attn import train


def _dam(**extra):
  s = {"method": "dam_s", "per_head": True, "lam": 0.0, "target_density": 0.5,
       "target_mode": "abs"}
  s.update(extra)
  return s


@pytest.fixture(scope="module")
def dam_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dam")
  config = _tiny.tiny_config({"structure": _dam(), "train.num_steps": 4})
  results = train.train_and_evaluate(config, str(workdir))
  return workdir, results


def test_dam_run_exports_masks_and_reports_sparsity(dam_run):
  workdir, results = dam_run
  m = results["validation"]
  assert 0.0 < m["attention_density"] < 1.0
  assert m["attention_sparsity"] == pytest.approx(1 - m["attention_density"])
  for f in ("masks/masks.npz", "masks/metadata.json", "masks/png/layer_0.png",
            "masks/flex/layer_1.npz", "masks/splash/layer_0.npy"):
    assert (workdir / f).is_file(), f
  meta = json.loads((workdir / "masks" / "metadata.json").read_text())
  assert meta["method"] == "dam_s" and meta["seq_len"] == 32 and meta["num_layers"] == 2


def test_exported_density_is_the_reported_density(dam_run):
  """The export carries the run's reported density, and its masks, applied to the dev
  examples' lengths, give that same number (each layer, and the mean)."""
  from sparse_attn import data as data_lib
  from sparse_attn.masks import stats
  workdir, results = dam_run
  m = results["validation"]
  meta = json.loads((workdir / "masks" / "metadata.json").read_text())
  reported = meta["reported_density"]["validation"]
  assert reported["attention_density"] == pytest.approx(m["attention_density"], abs=1e-7)
  assert results["masks"]["reported_density"]["validation"] == reported["attention_density"]
  assert results["masks"]["element_density"] == meta["element_density"]
  _, loaded, _ = train.evaluate_workdir(workdir)
  lengths = data_lib.build_dataset(loaded.config.data, "validation",
                                   tokenizer=loaded.tokenizer).lengths
  arrays = np.load(workdir / "masks" / "masks.npz")
  weights = stats.pair_weights(lengths, meta["seq_len"])
  per_layer = [float(np.sum(weights * arrays[f"layer_{i}"].mean(0))) for i in range(2)]
  np.testing.assert_allclose(per_layer, reported["per_layer"], atol=1e-6)
  assert np.mean(per_layer) == pytest.approx(m["attention_density"], abs=1e-6)
  # The other accounting, the n x n matrix, is the arrays' plain mean.
  assert np.mean([arrays[k].mean() for k in arrays]) == pytest.approx(
      meta["element_density"], abs=1e-9)


def test_export_import_round_trip_is_exact(dam_run, tmp_path):
  """A run started from exported masks computes bit-identical masks and the same metric."""
  workdir, results = dam_run
  metrics_a, _, frozen_a = train.evaluate_workdir(workdir)
  assert metrics_a["validation"]["accuracy"] == results["validation"]["accuracy"]
  config = _tiny.tiny_config({"init_from": f"run:{workdir}",
                              "masks.source": str(workdir / "masks")})
  run = train.setup(config, tmp_path / "reuse", restore=False)
  metrics_b, frozen_b = run.evaluate(run.state)
  run.ckpt.close()
  for a, b in zip(frozen_a.masks, frozen_b.masks):
    np.testing.assert_array_equal(a, b)
  assert metrics_b["validation"] == metrics_a["validation"]


def test_round_trip_rejects_a_longer_sequence(dam_run, tmp_path):
  workdir, _ = dam_run
  config = _tiny.tiny_config({"masks.source": str(workdir / "masks"), "data.max_len": 48})
  with pytest.raises(ValueError, match="sequence length 32"):
    train.setup(config, tmp_path / "longer", restore=False)


@pytest.mark.slow
def test_prune_search_then_extracted_smaller_model(tmp_path):
  search = tmp_path / "search"
  s = {"method": "prune", "unit": "layer", "prune_fraction": 0.5, "beta": 1.0}
  train.train_and_evaluate(_tiny.tiny_config({"structure": s, "train.num_steps": 3}),
                           str(search))
  report = (search / "pruned_layers.md").read_text()
  assert "pruned" in report
  gates = json.loads((search / "masks" / "gates.json").read_text())
  assert sorted(gates.values()) == [0.0, 1.0]  # Exactly one of two layers removed.
  # The gated model with hard gates and the extracted smaller model agree exactly.
  metrics_gated, _, _ = train.evaluate_workdir(search)
  config = _tiny.tiny_config({"init_from": f"pruned:{search}", "train.num_steps": 1})
  run = train.setup(config, tmp_path / "pruned", restore=False)
  pruned_layer = [k for k, g in gates.items() if g == 0.0][0]
  assert run.bert_config.layer_heads(int(pruned_layer.split("_")[1])) == 0
  assert "attention" not in run.state.params["model"]["bert"][pruned_layer]
  metrics_pruned, _ = run.evaluate(run.state)
  run.ckpt.close()
  a, b = metrics_gated["validation"], metrics_pruned["validation"]
  assert a["accuracy"] == b["accuracy"]
  assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_learned_window_run(tmp_path):
  s = {"method": "learned_window", "max_width": 8, "beta": 1.0, "layers": [1]}
  results = train.train_and_evaluate(_tiny.tiny_config({"structure": s,
                                                        "train.num_steps": 3}),
                                     str(tmp_path / "w"))
  m = results["validation"]
  assert m["density/layer_0"] == 1.0 and m["density/layer_1"] < 1.0
  meta = json.loads((tmp_path / "w" / "masks" / "metadata.json").read_text())
  assert meta["method"] == "learned_window"


def test_sink_tokens_are_kept_for_every_query(tmp_path):
  """masks.sink_tokens: each query also attends to its example's [SEP], in training and
  evaluation, and the reported density counts those links."""
  from sparse_attn import data, fixed_masks
  base = {"masks.source": "pattern", "masks.pattern": "window", "masks.kwargs": {"k": 0},
          "train.num_steps": 2}
  c = _tiny.tiny_config(base)
  plain = train.train_and_evaluate(c, str(tmp_path / "plain"))["validation"]
  sunk = train.train_and_evaluate(_tiny.tiny_config(dict(base, **{
      "masks.sink_tokens": ("[SEP]",)})), str(tmp_path / "sink"))["validation"]
  # Diagonal only vs diagonal + the [SEP] column: per example 1/n vs (2n - 1)/n^2.
  ds = data.build_dataset(c.data, "validation")
  n = np.minimum(ds.lengths, c.data.max_len).astype(np.float64)
  np.testing.assert_allclose(plain["density/layer_0"], np.mean(1 / n), rtol=1e-5)
  np.testing.assert_allclose(sunk["density/layer_0"], np.mean((2 * n - 1) / n**2), rtol=1e-5)
  meta = json.loads((tmp_path / "sink" / "masks" / "metadata.json").read_text())
  assert meta["sink_tokens"] == ["[SEP]"]
  # Reusing those masks without the same sinks would silently change them: an error.
  bert = train.build_model(c, data.get_task(c.data))[0]
  reuse = c.masks.copy_and_resolve_references()
  reuse.update(source=str(tmp_path / "sink" / "masks"), pattern="", kwargs={})
  with pytest.raises(ValueError, match="learned with sink tokens"):
    fixed_masks.build(reuse, bert, c.data.max_len)
  reuse.sink_tokens = ("[SEP]",)
  assert fixed_masks.build(reuse, bert, c.data.max_len) is not None
  tok = data.load_tokenizer("")
  with pytest.raises(ValueError, match="not a token of the vocabulary"):
    fixed_masks.resolve_sinks(("[NOPE]",), tok)


def test_add_sinks_on_bool_float_and_dense_layers():
  from sparse_attn import fixed_masks
  ids = jax.numpy.asarray([[101, 7, 102, 0], [101, 102, 0, 0]])
  eye = np.eye(4, dtype=bool)[None]
  soft = np.full((2, 4, 4), 0.25, np.float32)
  out = fixed_masks.add_sinks((eye, soft, None), ids, (102,))
  assert out[2] is None and out[0].shape == (2, 1, 4, 4) and out[1].shape == (2, 2, 4, 4)
  sink = (np.asarray(ids) == 102)[:, None, None, :]
  np.testing.assert_array_equal(out[0], eye[None] | sink)
  np.testing.assert_allclose(out[1], np.broadcast_to(np.maximum(0.25, sink), (2, 2, 4, 4)))
  assert fixed_masks.add_sinks((eye,), ids, ()) == (eye,)

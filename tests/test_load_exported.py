"""Tests of `fixed_masks.load_exported`: every array checked against metadata.json, and
corrupt files named with the way out, at load time rather than at the first long batch."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from sparse_attn import errors, fixed_masks, model

N, HEADS = 40, 2


def _export(d, arrays=None, meta=None, raw_meta=None):
  """A masks directory as export.py writes it: masks.npz + metadata.json."""
  d.mkdir(exist_ok=True)
  if arrays is None:
    band = np.abs(np.subtract.outer(np.arange(N), np.arange(N))) <= 3
    arrays = {"layer_0": np.stack([band, band.T]), "layer_2": band[None]}
  np.savez_compressed(d / "masks.npz", **arrays)
  if meta is None:
    meta = {"method": "test", "seq_len": N, "num_layers": 3, "num_heads": HEADS,
            "layers": {k: {"head_density": [0.2] * v.shape[0]} for k, v in arrays.items()
                       if np.ndim(v) == 3}}
  (d / "metadata.json").write_text(raw_meta if raw_meta is not None else json.dumps(meta))
  return d


def test_a_valid_export_loads(tmp_path):
  per_layer, meta = fixed_masks.load_exported(_export(tmp_path / "e"))
  assert [None if m is None else m.shape for m in per_layer] == [(2, N, N), None, (1, N, N)]
  assert meta["seq_len"] == N


def _band(n, heads=1, dtype=bool):
  return np.broadcast_to(np.eye(n, dtype=bool), (heads, n, n)).astype(dtype)


@pytest.mark.parametrize("arrays,problem", [
    ({"layer_0": _band(32, 2)}, "layer_0 is 32 x 32 but metadata seq_len is 40"),
    ({"layer_0": _band(N, 2, np.float32)}, "layer_0 has dtype float32; masks are bool"),
    ({"layer_0": _band(N)[0]}, r"layer_0 has shape \[40, 40\]; expected \[H, n, n\]"),
    ({"layer_0": _band(N)[:, :, :32]}, r"shape \[1, 40, 32\]"),
    ({"layer_0": _band(N, 3)}, "layer_0 has 3 heads but metadata num_heads is 2"),
    ({"layer_5": _band(N)}, "layer_5 is beyond metadata num_layers = 3"),
    ({"mask": _band(N)}, r"unexpected arrays \['mask'\]"),
    ({}, "no layer_<i> arrays"),
])
def test_arrays_that_disagree_with_the_metadata_fail_at_load(tmp_path, arrays, problem):
  meta = {"seq_len": N, "num_layers": 3, "num_heads": HEADS}
  d = _export(tmp_path / "e", arrays, meta)
  with pytest.raises(fixed_masks.ExportedMasksError, match=problem) as e:
    fixed_masks.load_exported(d)
  assert f"{d / 'masks.npz'} (against {d / 'metadata.json'})" in str(e.value)
  assert "--export_masks" in str(e.value)  # The way out.
  assert isinstance(e.value, errors.UserError) and isinstance(e.value, ValueError)


def test_masks_npz_missing_or_changing_layers_the_metadata_describes(tmp_path):
  meta = {"seq_len": N, "num_layers": 3, "num_heads": HEADS,
          "layers": {"layer_0": {"head_density": [0.5, 0.5]}, "layer_2": {}}}
  d = _export(tmp_path / "a", {"layer_0": _band(N, 2)}, meta)
  with pytest.raises(fixed_masks.ExportedMasksError, match=r"describes \['layer_2'\] but "
                                                           "the masks lack them"):
    fixed_masks.load_exported(d)
  d = _export(tmp_path / "b", {"layer_0": _band(N, 1), "layer_2": _band(N)}, meta)
  with pytest.raises(fixed_masks.ExportedMasksError, match="layer_0 has 1 heads but the "
                                                           "metadata lists densities of 2"):
    fixed_masks.load_exported(d)


@pytest.mark.parametrize("raw,problem", [
    ('{"seq_len": 40,', r"metadata.json, line 1 column 16: not valid JSON"),
    ("[40, 2, 2]", "metadata.json holds a JSON list, not an object"),
    ('{"num_layers": 3, "num_heads": 2}', "metadata.json lacks 'seq_len'"),
    ('{"seq_len": "40", "num_layers": 3, "num_heads": 2}',
     "'seq_len' is '40'; it must be a positive integer"),
    ('{"seq_len": 40, "num_layers": true, "num_heads": 2}', "'num_layers' is True"),
    ('{"seq_len": 40, "num_layers": 3, "num_heads": 0}', "'num_heads' is 0"),
    ('{"seq_len": 40, "num_layers": 3, "num_heads": 2, "sink_tokens": "[SEP]"}',
     "'sink_tokens' is '\\[SEP\\]'; it must be a list"),
    ('{"seq_len": 40, "num_layers": 3, "num_heads": 2, "layers": [1]}',
     "'layers' must be an object"),
])
def test_garbage_metadata_names_the_file(tmp_path, raw, problem):
  d = _export(tmp_path / "e", raw_meta=raw)
  with pytest.raises(fixed_masks.ExportedMasksError, match=problem) as e:
    fixed_masks.load_exported(d)
  assert str(d / "metadata.json") in str(e.value) and "Way out" in str(e.value)


def test_corrupt_npz_names_the_file(tmp_path):
  d = _export(tmp_path / "e")
  good = (d / "masks.npz").read_bytes()
  for content in (b"not a zip at all", good[:len(good) // 2],
                  good[:-40] + bytes(40)):  # Garbage, truncated, damaged directory.
    (d / "masks.npz").write_bytes(content)
    with pytest.raises(fixed_masks.ExportedMasksError,
                       match="masks.npz is not a readable masks archive.*--export_masks"):
      fixed_masks.load_exported(d)
  np.save(tmp_path / "one.npy", _band(N))
  (tmp_path / "one.npy").rename(tmp_path / "one.npz")
  with pytest.raises(fixed_masks.ExportedMasksError, match="one.npz holds a single array"):
    fixed_masks.load_exported(tmp_path / "one.npz")


def test_bare_npz_layers_must_agree_and_build_uses_their_length(tmp_path):
  np.savez(tmp_path / "m.npz", layer_0=_band(32), layer_1=_band(40))
  with pytest.raises(fixed_masks.ExportedMasksError, match="layer_1 is 40 x 40 but other "
                                                           "layers are 32 x 32"):
    fixed_masks.load_exported(tmp_path / "m.npz")
  np.savez(tmp_path / "m.npz", layer_1=_band(32))
  per_layer, meta = fixed_masks.load_exported(tmp_path / "m.npz")
  assert meta == {} and per_layer[0] is None and per_layer[1].shape == (1, 32, 32)
  cfg = model.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=8,
                         intermediate_size=8)
  masks_cfg = ml_collections.ConfigDict(dict(
      source=str(tmp_path / "m.npz"), pattern="", kwargs={}, layers=None, start_layer=0,
      remove_diagonal=False))
  assert fixed_masks.build(masks_cfg, cfg, 16)[1].shape == (1, 16, 16)
  with pytest.raises(ValueError, match="made for sequence length 32; this run uses "
                                       "data.max_len=40"):
    fixed_masks.build(masks_cfg, cfg, 40)

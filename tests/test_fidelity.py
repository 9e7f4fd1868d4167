"""The machinery of the fidelity experiments: both sparsity accountings, masked-LM head
fitting on a frozen encoder, scoring only the predicted positions, encoder transfer from
another task's run, and the verdict rule of scripts/reproduce.py."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
from sparse_attn import checkpoint as ckpt_lib
from sparse_attn import data as data_lib
from sparse_attn import evaluation, model, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


# ------------------------------------------------------------------ both accountings

def test_nxn_density_counts_dense_pruned_and_gated_layers():
  band = np.zeros((2, 4, 4), bool)
  band[:, np.arange(4), np.arange(4)] = True            # The diagonal: 4 of 16.
  got = evaluation.nxn_density((None, band, band, None), (None, None, np.array([1., 0.]),
                                                          None), (4, 4, 4, 0))
  assert got == [1.0, 0.25, 0.125, 0.0]


def _mlm_config(overrides=None):
  return _tiny.tiny_config({"data.task": "shakespeare", "data.max_len": 32,
                            **(overrides or {})})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The tiny runs the tests below read (trained once, in this process)."""
  root = tmp_path_factory.mktemp("fidelity")
  window = _tiny.tiny_config({"train.num_steps": 1, "masks.source": "pattern",
                              "masks.pattern": "window", "masks.kwargs": {"k": 1}})
  out = {"window": (window, train.train_and_evaluate(window, str(root / "window")))}
  mlm = _load(REPO / "configs" / "mlm.py", "mlm_config")
  fit = _mlm_config({"train.num_steps": 4, "checkpoint.every_steps": 0})
  fit.optimizer.groups = mlm.get_config("fit_head").optimizer.groups
  out["init"] = _host(train.setup(fit, root / "init", restore=False).state)
  train.train_and_evaluate(fit, str(root / "fit"))
  ft = _tiny.tiny_config({"init_from": f"run:{root / 'fit'}"})
  ft.model = {}   # The architecture comes from that run.
  out["ft"] = _host(train.setup(ft, root / "ft", restore=False).state)
  out["root"] = root
  return out


def _host(state):
  return jax.device_get(state.params["model"])


def _params(workdir):
  ckpt = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False,
                               read_only=True)
  try:
    return ckpt.restore_model_params()
  finally:
    ckpt.close()


def test_results_report_a_window_mask_in_both_accountings(runs):
  """A +-1 band at n = 32: 3 n - 2 of the n^2 entries of the matrix are kept; over a
  length-l example's valid pairs, 3 l - 2 of l^2. Both numbers are in results.json."""
  c, results = runs["window"]
  v = results["validation"]
  n = c.data.max_len
  assert v["nxn_length"] == n
  assert v["attention_density_nxn"] == pytest.approx((3 * n - 2) / n**2)
  assert v["attention_sparsity_nxn"] == pytest.approx(1 - (3 * n - 2) / n**2)
  lengths = np.asarray(data_lib.build_dataset(c.data, "validation").lengths, float)
  expected = np.mean((3 * lengths - 2) / lengths**2)
  assert v["attention_density"] == pytest.approx(expected, rel=1e-5)
  assert v["attention_density"] > v["attention_density_nxn"]   # Padding counts as kept-out.
  text = evaluation.format_metrics("validation", v)
  assert "of valid pairs" in text and f"of the {n} x {n} matrix" in text


# ------------------------------------------------------------------ masked LM

def test_fit_head_changes_the_head_and_never_the_encoder(runs):
  """configs/mlm.py:fit_head's optimizer groups on a tiny masked-LM run: after 4 steps,
  every encoder parameter (the word embeddings, which the decoder shares, included)
  equals the initial one, and the head moved."""
  p0, p1 = runs["init"], _params(runs["root"] / "fit")
  enc0, enc1 = jax.tree.leaves(p0["bert"]), jax.tree.leaves(p1["bert"])
  assert len(enc0) == len(enc1) > 10
  assert all(np.array_equal(a, b) for a, b in zip(enc0, enc1))
  assert not np.array_equal(p0["transform"]["kernel"], p1["transform"]["kernel"])
  assert not np.array_equal(p0["decoder_bias"], p1["decoder_bias"])


def test_frozen_group_drops_its_gradient_before_clipping():
  import ml_collections
  from sparse_attn import optim
  opt = ml_collections.ConfigDict(dict(
      learning_rate=0.1, warmup_fraction=0.0, schedule="constant", weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
      groups=[("model/enc/.*", dict(frozen=True))]))
  tx, _, _ = optim.make_optimizer(opt, 10)
  params = {"model": {"enc": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}}
  grads = {"model": {"enc": {"w": jnp.full(3, 1e6)}, "head": {"w": jnp.full(3, 0.1)}}}
  upd, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(upd["model"]["enc"]["w"]) == 0)
  # Not clipped by the frozen group's huge gradient: Adam's first step is ~lr in size.
  np.testing.assert_allclose(np.asarray(upd["model"]["head"]["w"]), -0.1, rtol=1e-3)
  opt.groups = [("model/enc/.*", dict(frozen=True, learning_rte=1.0))]
  with pytest.raises(ValueError, match="learning_rte"):
    optim.make_optimizer(opt, 10)


def test_scoring_the_predicted_positions_equals_scoring_every_position():
  c = model.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
  m = model.BertForMaskedLM(c)
  ids = jax.random.randint(jax.random.PRNGKey(0), (3, 12), 5, 50)
  am = jnp.ones((3, 12), jnp.int32)
  params = m.init(jax.random.PRNGKey(1), ids, am)["params"]
  full, _ = m.apply({"params": params}, ids, am)
  pos = jnp.array([[1, 4, 0], [2, 3, 11], [0, 0, 0]])
  part, _ = m.apply({"params": params}, ids, am, positions=pos)
  np.testing.assert_allclose(part, jnp.take_along_axis(full, pos[..., None], axis=1),
                             rtol=1e-5, atol=1e-5)


def test_mask_tokens_lists_exactly_the_predicted_positions():
  from sparse_attn.data import mlm, text
  special = text.SpecialIds(pad=0, cls=101, sep=102, mask=103, unk=100,
                            all=np.array([0, 100, 101, 102, 103]))
  ids = np.full((4, 40), 2000, np.int32)
  ids[:, 0], ids[:, -1] = 101, 102
  out = mlm.mask_tokens(ids, np.ones_like(ids), seed=3, step=1, rows_B=np.arange(4),
                        special=special, vocab_size=30522, max_predictions=5)
  assert out["mlm_positions"].shape == (4, 5)
  for r in range(4):
    listed = out["mlm_positions"][r][out["mlm_position_mask"][r] > 0]
    np.testing.assert_array_equal(listed, np.flatnonzero(out["label_mask"][r]))


def test_init_from_a_masked_lm_run_takes_its_encoder(runs):
  src, dst = _params(runs["root"] / "fit"), runs["ft"]
  assert "classifier" in dst and "pooler" in dst["bert"]
  for k, v in src["bert"].items():
    jax.tree.map(np.testing.assert_array_equal, v, dst["bert"][k])


# ------------------------------------------------------------------ verdicts

def test_verdict_rule_needs_the_difference_to_exceed_the_combined_error():
  sys.path.insert(0, str(REPO / "scripts"))
  from fidelity import common as rep  # pylint: disable=import-outside-toplevel
  a = rep.arm_stats([0.80, 0.82, 0.81], [1000] * 3)
  assert a["sd"] == pytest.approx(0.01) and a["se"] == pytest.approx(0.01 / math.sqrt(3))
  b_close = rep.arm_stats([0.805, 0.81, 0.80], [1000] * 3)   # d 0.005 < se 0.0065
  b_far = rep.arm_stats([0.70, 0.71, 0.72], [1000] * 3)
  assert rep.verdict(a, b_far)[0] == "reproduced"
  assert rep.verdict(a, b_close)[0] == "direction reproduced"
  assert rep.verdict(b_far, a)[0] == "not reproduced"
  # "No worse": a shortfall within the combined error does not refute it; beyond, it does.
  assert rep.verdict(b_close, a, "no_worse")[0] == "reproduced"
  assert rep.verdict(a, b_far, "no_worse")[0] == "reproduced"
  assert rep.verdict(b_far, a, "no_worse")[0] == "not reproduced"
  one = rep.arm_stats([0.8], [1600])
  assert one["se"] == pytest.approx(0.01)           # sqrt(0.8 * 0.2 / 1600)
  assert rep.verdict(one, rep.arm_stats([0.75], [1600]))[0] == (
      "reproduced (one seed: provisional)")


def test_sparsebert_claim_runs_every_arm_after_its_masked_lm_run():
  sys.path.insert(0, str(REPO / "scripts"))
  from fidelity import sparsebert  # pylint: disable=import-outside-toplevel
  runs = sparsebert.runs((0, 1), "R")
  names = [r.name for r in runs]
  assert names[0] == "mlm_head" and len(names) == 1 + 2 * 2 * 12
  for r in runs[1:]:
    assert all(names.index(n) < names.index(r.name) for n in r.needs)
    if r.name.startswith("ft_dam"):
      assert f"masks=R/{r.needs[0]}/masks" in r.config and "max_len=128" in r.config
  assert {r.seed for r in runs if r.name.startswith("ft_")} == {0, 1}


def test_pruning_claim_remeasures_best_median_worst_with_fresh_seeds(tmp_path, monkeypatch):
  """Once every fixed choice of k layers has its first-seed run, the best, median and
  worst by that ranking are rerun with the other seeds (never with the ranking seed)."""
  import json
  sys.path.insert(0, str(REPO / "scripts"))
  from fidelity import common, pruning  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(common, "OUT", tmp_path)
  before = {r.name for r in pruning.runs((0, 1, 2), "R")}
  assert not any(n.startswith("fixed_k5_") and n.endswith("_s1") for n in before)
  accs = {layers: 0.70 + 0.01 * i
          for i, layers in enumerate(__import__("itertools").combinations(range(6), 5))}
  for layers, acc in accs.items():
    path = common.record_path("pruning", pruning._fixed(5, layers, 0).name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"validation": {"accuracy": acc}, "wall_time_s": 1.0}))
  chosen = pruning.picks(5, 0)
  order = sorted(accs, key=accs.get, reverse=True)
  assert chosen == {"best": order[0], "median": order[3], "worst": order[-1]}
  added = {r.name for r in pruning.runs((0, 1, 2), "R")} - before
  assert added == {pruning._fixed(5, layers, s).name for layers in chosen.values()
                   for s in (1, 2)}
  run = pruning._fixed(5, order[0], 1)
  assert f"--config.model.heads_per_layer={pruning._hpl(order[0])}" in run.command("R")


def test_matched_masks_and_their_ablations():
  """match=D picks the degrees closest to D over the training data's valid pairs; drop=
  zeroes exactly one part of the matched BigBird mask."""
  ft = _load(REPO / "configs" / "finetune.py", "finetune_config")
  base = dict(ft.get_config("pattern=bigbird,match=0.25,runlocal").masks.kwargs)
  assert base["window"] >= 1 and base["global_tokens"] == 1 and base["random_keys"] >= 1
  for drop, key in (("window", "window"), ("global", "global_tokens"),
                    ("random", "random_keys")):
    kw = dict(ft.get_config(f"pattern=bigbird,match=0.25,drop={drop},runlocal").masks.kwargs)
    assert kw == dict(base, **{key: 0})
  band = dict(ft.get_config("pattern=window,match=0.2,runlocal").masks.kwargs)
  rand = dict(ft.get_config("pattern=random,match=0.2,runlocal").masks.kwargs)
  assert band["random_keys"] == 0 and band["global_tokens"] == 0 and band["window"] >= 1
  assert rand["window"] == 0 and rand["random_keys"] >= 1


def test_pruning_claim_times_the_searched_model_once_it_is_extracted(tmp_path, monkeypatch):
  import json
  sys.path.insert(0, str(REPO / "scripts"))
  from fidelity import common, pruning  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(common, "OUT", tmp_path)
  assert not any(r.name.startswith("speed_") for r in pruning.runs((0,), "R"))
  path = common.record_path("pruning", "retune_k2_s0")
  path.parent.mkdir(parents=True)
  dens = {f"density/layer_{i}": (1.0 if i in (3, 5) else 0.0) for i in range(6)}
  path.write_text(json.dumps({"validation": {"accuracy": 0.7, **dens}, "wall_time_s": 1}))
  speed = [r for r in pruning.runs((0,), "R") if r.name.startswith("speed_")]
  assert [r.name for r in speed] == ["speed_k2"]
  assert speed[0].command("R") == ["-m", "sparse_attn.bench", "--out=R/speed_k2",
                                   "--only=pruned", "--keep-layers=3,5"]

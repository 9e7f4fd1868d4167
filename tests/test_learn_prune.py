"""Tests for sparse_attn.learn.prune (attention-sublayer / head pruning, a reconstruction)."""

from __future__ import annotations

import json
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import learn
from sparse_attn import model
from sparse_attn.learn import prune

L, H, N = 4, 4, 10


def _bert(keep_layernorm=False, **kw):
  return model.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=L,
                          num_attention_heads=H, intermediate_size=64,
                          max_position_embeddings=32, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0,
                          pruned_keep_layernorm=keep_layernorm, **kw)


def _cfg(**kw):
  c = prune.default_config()
  c.update(kw)
  return c


_IDS = jax.random.randint(jax.random.key(1), (2, N), 1, 100)
_VALID = jnp.ones((2, N), bool).at[1, N - 3:].set(False)


def _random_params(module, boxed=False, seed=0):
  """Random params of `module` with the tree of module.init (no init compile: fast)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), _IDS)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    x = rng.normal(0.0, 0.1, s.shape)
    return jnp.asarray(x + 1.0 if "scale" in jax.tree_util.keystr(path) else x, s.dtype)
  p = jax.tree_util.tree_map_with_path(fill, shapes)
  return p if boxed else nn.meta.unbox(p)


@pytest.fixture(scope="module")
def params():
  """Unboxed BertModel params (the same weights for both LayerNorm settings)."""
  return _random_params(model.BertModel(_bert()))


def _apply(bert, p, gates=None):
  """(hidden [B, N, D], pooled [B, D]) of BertModel(bert) with `gates`.

  Eager on purpose: op-by-op compilations are cached across the many configs tested here.
  """
  h, aux = model.BertModel(bert).apply({"params": p}, _IDS, _VALID, gates=gates)
  return np.asarray(h), np.asarray(aux["pooled"])


# --- relaxations ------------------------------------------------------------------------------


def test_hard_concrete_range_and_zero_one_probabilities():
  theta = jnp.array([-2.0, 0.0, 1.5])
  tau, (gamma, zeta) = 2.0 / 3.0, (-0.1, 1.1)
  z = np.asarray(jax.jit(jax.vmap(lambda r: prune.hard_concrete(theta, r)))(
      jax.random.split(jax.random.key(0), 40000)))
  assert z.min() >= 0.0 and z.max() <= 1.0
  sig = lambda x: 1.0 / (1.0 + np.exp(-np.asarray(x)))
  p_zero = sig(tau * math.log(-gamma / zeta) - theta)            # Louizos et al. (2018).
  p_one = sig(theta - tau * math.log((1 - gamma) / (zeta - 1)))
  np.testing.assert_allclose((z == 0).mean(0), p_zero, atol=0.01)
  np.testing.assert_allclose((z == 1).mean(0), p_one, atol=0.01)
  np.testing.assert_allclose(prune.hard_concrete_keep_prob(theta), 1 - p_zero, rtol=1e-6)
  assert ((z > 0) & (z < 1)).any()


def test_gumbel_sigmoid_open_probability():
  theta = jnp.array([-1.0, 0.5])
  z = np.asarray(jax.jit(jax.vmap(lambda r: prune.gumbel_sigmoid(theta, r, 0.5)))(
      jax.random.split(jax.random.key(1), 40000)))
  np.testing.assert_allclose((z > 0.5).mean(0), jax.nn.sigmoid(theta), atol=0.01)


def test_straight_through_forward_exact_and_gradient():
  z = jnp.array([0.0, 0.2, 0.5, 0.51, 0.97, 1.0])
  np.testing.assert_array_equal(prune.straight_through(z), [0, 0, 0, 1, 1, 1])
  g = jax.grad(lambda x: jnp.sum(prune.straight_through(x) * jnp.arange(6.0)))(z)
  np.testing.assert_allclose(g, np.arange(6.0))


@pytest.mark.parametrize("unit", ["layer", "head"])
@pytest.mark.parametrize("relaxation", ["hard_concrete", "gumbel_sigmoid"])
def test_sample_gates_are_hard_and_shaped(unit, relaxation):
  s = learn.METHODS["prune"](_cfg(method="prune", unit=unit, relaxation=relaxation,
                                  init_logit=0.0), _bert(), N)
  p = s.init(jax.random.key(0))
  out = jax.jit(s.sample, static_argnums=3)(p, jax.random.key(2), 0, True)
  assert out.masks is None and len(out.gates) == L
  for g in out.gates:
    assert np.shape(g) == ((H,) if unit == "head" else ())
    assert set(np.unique(np.asarray(g)).tolist()) <= {0.0, 1.0}
  kp = 0.5  # Straight-through gates: P(z > 1/2) = sigmoid(0) for both relaxations.
  assert float(out.metrics["prune/expected_kept"]) == pytest.approx(float(kp), rel=1e-5)
  assert float(out.penalty) == pytest.approx(abs(float(kp) - 0.2), rel=1e-5)


def test_l0_penalty_without_budget():
  s = prune.make_structure(_cfg(prune_fraction=None, beta=2.0, init_logit=1.0), _bert(), N)
  out = s.sample(s.init(jax.random.key(0)), jax.random.key(0), 0, True)
  # Straight-through gates (the default): the expected open count, P(z > 1/2).
  assert float(out.penalty) == pytest.approx(2.0 * float(prune.hard_concrete_open_prob(1.0)),
                                             rel=1e-5)
  s = prune.make_structure(_cfg(prune_fraction=None, beta=2.0, init_logit=1.0, hard=False),
                           _bert(), N)
  out = s.sample(s.init(jax.random.key(0)), jax.random.key(0), 0, True)
  assert float(out.penalty) == pytest.approx(2.0 * float(prune.hard_concrete_keep_prob(1.0)),
                                             rel=1e-5)  # Relaxed gates: the L0 norm.


@pytest.mark.parametrize("unit, relaxation", [("layer", "gumbel_sigmoid"),
                                               ("head", "hard_concrete")])
def test_gradients_reach_gate_logits_through_bert(params, unit, relaxation):
  bert = _bert()
  s = prune.make_structure(_cfg(unit=unit, relaxation=relaxation, init_logit=0.0), bert, N)
  sp = s.init(jax.random.key(0))
  target = jax.random.normal(jax.random.key(3), (2, N, 32))
  rng = jax.random.key(5)

  def loss(structure_params):
    gates = s.sample(structure_params, rng, 0, True).gates
    h, _ = model.BertModel(bert).apply({"params": params}, _IDS, _VALID, gates=gates)
    return jnp.mean((h - target) ** 2)

  grads = jax.jit(jax.grad(loss))(sp)
  for i in range(L):
    g = np.asarray(grads[f"layer_{i}"])
    assert np.all(np.isfinite(g))
    if relaxation == "gumbel_sigmoid":
      assert np.all(g != 0), f"layer {i}"
    else:  # Hard concrete passes gradient exactly where the stretched sample is not clipped.
      z = np.asarray(prune.hard_concrete(sp[f"layer_{i}"], jax.random.fold_in(rng, i)))
      np.testing.assert_array_equal(g != 0, (z > 0) & (z < 1))


# --- budget -----------------------------------------------------------------------------------


@pytest.mark.parametrize("unit, relaxation", [("layer", "hard_concrete"),
                                               ("head", "gumbel_sigmoid")])
def test_shift_budget_meets_the_kept_fraction_exactly_without_penalty(unit, relaxation):
  s = prune.make_structure(_cfg(unit=unit, relaxation=relaxation, budget="shift",
                                prune_fraction=0.75), _bert(), N)
  p = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(1), jnp.shape(x)),
                   s.init(jax.random.key(0)))
  out = jax.jit(s.sample, static_argnums=3)(p, jax.random.key(2), 7, True)
  assert float(out.metrics["prune/expected_kept"]) == pytest.approx(0.25, abs=1e-4)
  assert float(out.penalty) == 0.0


@pytest.mark.parametrize("relaxation", ["hard_concrete", "gumbel_sigmoid"])
def test_shift_budget_holds_for_the_sampled_forward_gates(relaxation):
  """The budget is about the gates the model sees: averaged over many draws, the open
  fraction of the straight-through gates equals k / U."""
  s = prune.make_structure(_cfg(unit="head", relaxation=relaxation, budget="shift",
                                prune_fraction=0.75), _bert(), N)
  p = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(1), jnp.shape(x)),
                   s.init(jax.random.key(0)))
  kept = jax.vmap(lambda r: s.sample(p, r, 0, True).metrics["prune/kept"])(
      jax.random.split(jax.random.key(9), 4000))
  assert float(jnp.mean(kept)) == pytest.approx(0.25, abs=0.01)


def test_open_prob_matches_sampling():
  z = jax.vmap(lambda r: prune.hard_concrete(jnp.float32(0.7), r, 0.5, (-0.2, 1.05)))(
      jax.random.split(jax.random.key(0), 100000))
  assert float(jnp.mean(z > 0.5)) == pytest.approx(
      float(prune.hard_concrete_open_prob(0.7, 0.5, (-0.2, 1.05))), abs=0.005)
  assert float(jnp.mean(z > 0)) == pytest.approx(
      float(prune.hard_concrete_keep_prob(0.7, 0.5, (-0.2, 1.05))), abs=0.005)


def test_shift_budget_warmup_opens_every_gate_first():
  s = prune.make_structure(_cfg(budget="shift", prune_fraction=0.5, budget_warmup_steps=10),
                           _bert(), N)
  p = s.init(jax.random.key(0))
  kept = lambda step: float(s.sample(p, jax.random.key(3), step, True)
                            .metrics["prune/expected_kept"])
  assert kept(0) == pytest.approx(1.0, abs=1e-4)
  assert kept(5) == pytest.approx(0.75, abs=1e-4)
  assert kept(10) == pytest.approx(0.5, abs=1e-4) and kept(50) == pytest.approx(0.5, abs=1e-4)


def test_shift_budget_gradient_orders_logits_by_the_task_alone():
  """Only the task gradient reaches theta: a loss that wants layer 2's gate open raises it
  relative to the rest, and the common offset carries no gradient."""
  s = prune.make_structure(_cfg(budget="shift", prune_fraction=0.5,
                                relaxation="gumbel_sigmoid", hard=False), _bert(), N)
  p = s.init(jax.random.key(0))
  loss = lambda q: -s.sample(q, jax.random.key(4), 0, True).gates[2]
  g = jax.grad(loss)(p)
  assert float(g["layer_2"]) < 0
  assert all(float(g[f"layer_{i}"]) == 0 for i in (0, 1, 3))


def test_budget_shift_solves_the_mean():
  theta = jnp.array([[3.0, -1.0], [0.5, 9.0]])
  valid = np.array([[True, True], [True, False]])
  c = prune.budget_shift(theta, valid, 0.4, jax.nn.sigmoid)
  got = jnp.sum(jax.nn.sigmoid(theta + c) * valid) / 3
  assert float(got) == pytest.approx(0.4, abs=1e-5)



@pytest.mark.parametrize("units, frac, kept", [
    (12, 0.8, 2),    # 9.6 -> prune 10 (nearest).
    (12, 0.75, 3),
    (10, 0.25, 7),   # 2.5 -> prune 3 (halves prune more).
    (4, 0.5, 2), (12, 0.0, 12), (12, 1.0, 0), (48, 0.8, 10),
])
def test_kept_count_rounding(units, frac, kept):
  assert prune.kept_count(units, frac) == kept


def test_freeze_keeps_exact_top_k_layers_and_metadata():
  s = prune.make_structure(_cfg(prune_fraction=0.5), _bert(), N)
  theta = {"layer_0": 0.3, "layer_1": -1.0, "layer_2": 2.0, "layer_3": 0.3}
  f = s.freeze({k: jnp.float32(v) for k, v in theta.items()})
  # k = 4 - floor(2 + 1/2) = 2: layer 2, then the tie 0.3/0.3 goes to the lower index.
  assert [float(g) for g in f.gates] == [1.0, 0.0, 1.0, 0.0]
  assert all(np.ndim(g) == 0 for g in f.gates)
  meta = json.loads(json.dumps(f.metadata))
  assert meta["pruned_layers"] == [1, 3] and meta["pruned_heads"] == {}
  assert meta["kept_fraction"] == 0.5
  # Evaluation-time sampling gives the same gates.
  ev = s.sample({k: jnp.float32(v) for k, v in theta.items()}, jax.random.key(0), 0, False)
  assert [float(g) for g in ev.gates] == [1.0, 0.0, 1.0, 0.0]


def test_head_budget_min_layers_and_whole_layer_removal():
  s = prune.make_structure(_cfg(unit="head", prune_fraction=0.75, min_layers_kept=3),
                           _bert(), N)
  theta = {"layer_0": jnp.array([5.0, 4.0, -1.0, -1.0]),
           "layer_1": jnp.array([3.0, -2.0, -2.0, -2.0]),
           "layer_2": jnp.array([-3.0, -3.0, -1.5, -3.0]),
           "layer_3": jnp.array([-4.0, -4.0, -4.0, -4.0])}
  f = s.freeze(theta)
  # Top 16 - 12 = 4 heads: (0,0), (0,1), (1,0), then the tie -1/-1 goes to (0,2).
  # Two layers have heads; min_layers_kept=3 adds the best head (2) of layer 2.
  np.testing.assert_array_equal(f.gates[0], [1, 1, 1, 0])
  np.testing.assert_array_equal(f.gates[1], [1, 0, 0, 0])
  np.testing.assert_array_equal(f.gates[2], [0, 0, 1, 0])
  assert np.ndim(f.gates[3]) == 0 and float(f.gates[3]) == 0.0   # Whole sublayer removed.
  assert f.metadata["pruned_layers"] == [3]
  assert f.metadata["pruned_heads"] == {"layer_0": [3], "layer_1": [1, 2, 3],
                                        "layer_2": [0, 1, 3]}
  assert f.metadata["kept_fraction"] == 5 / 16
  text = prune.report(f)
  assert "| 3 | **pruned** |" in text and "| 1 | kept | 1/4 | 1, 2, 3 |" in text


def test_min_layers_kept_raises_layer_budget():
  s = prune.make_structure(_cfg(prune_fraction=1.0, min_layers_kept=1), _bert(), N)
  f = s.freeze({f"layer_{i}": jnp.float32(i) for i in range(L)})
  assert [float(g) for g in f.gates] == [0.0, 0.0, 0.0, 1.0]


def test_budget_that_prunes_every_layer():
  with pytest.raises(ValueError, match="prunes every one of the 4 attention layers"):
    prune.make_structure(_cfg(prune_fraction=0.9), _bert(), N)   # 3.6 -> prune 4.
  s = prune.make_structure(_cfg(prune_fraction=1.0, allow_prune_all=True), _bert(), N)
  f = s.freeze(s.init(jax.random.key(0)))
  assert f.metadata["pruned_layers"] == [0, 1, 2, 3] and f.metadata["kept_fraction"] == 0.0


def test_no_budget_keeps_positive_logits_and_at_least_one():
  s = prune.make_structure(_cfg(prune_fraction=None), _bert(), N)
  f = s.freeze({"layer_0": jnp.float32(0.5), "layer_1": jnp.float32(-1.0),
                "layer_2": jnp.float32(2.0), "layer_3": jnp.float32(-0.1)})
  assert [float(g) for g in f.gates] == [1.0, 0.0, 1.0, 0.0]
  f = s.freeze({f"layer_{i}": jnp.float32(-1.0 - i) for i in range(L)})
  assert [float(g) for g in f.gates] == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("kw, match", [
    ({"keep_layernorm": True}, "pruned_keep_layernorm"),
    ({"beta": -1.0}, "beta"),
    ({"budget": "lagrange"}, "budget"),
    ({"budget": "shift", "prune_fraction": None}, "prune_fraction"),
    ({"budget_warmup_steps": -2}, "budget_warmup_steps"),
    ({"temperature": 0.0}, "temperature"),
    ({"prune_fraction": 1.2}, "prune_fraction"),
    ({"min_layers_kept": 5}, "min_layers_kept"),
    ({"unit": "block"}, "unit"),
    ({"limits": (0.0, 1.1)}, "limits"),
])
def test_bad_config_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    prune.make_structure(_cfg(**kw), _bert(), N)


def test_unknown_key_raises():
  c = _cfg()
  c.prune_frac = 0.5
  with pytest.raises(ValueError, match="Unknown prune config keys"):
    prune.make_structure(c, _bert(), N)


# --- extraction -------------------------------------------------------------------------------


_MIXED = (np.float32(0.0), np.array([1, 0, 1, 0], np.float32), None,
          np.array([0, 0, 1, 1], np.float32))


@pytest.mark.parametrize("keep_layernorm", [False, True])
@pytest.mark.parametrize("gates", [
    _MIXED,                                                           # Layers and heads.
    (np.float32(1.0), np.float32(0.0), np.float32(0.0), np.float32(1.0)),
    "frozen_heads",
])
def test_extracted_model_matches_gated_model(params, keep_layernorm, gates):
  bert = _bert(keep_layernorm)
  if isinstance(gates, str):   # Head pruning that empties layer 3 (freeze -> scalar 0).
    s = prune.make_structure(_cfg(unit="head", prune_fraction=0.5), bert, N)
    gates = s.freeze({"layer_0": jnp.array([1.0, -1.0, 2.0, 3.0]),
                      "layer_1": jnp.array([4.0, 4.0, 4.0, 4.0]),
                      "layer_2": jnp.array([-1.0, 5.0, -1.0, -1.0]),
                      "layer_3": jnp.array([-5.0, -5.0, -5.0, -5.0])}).gates
    assert np.ndim(gates[3]) == 0
  want = _apply(bert, params, gates)
  new_bert, new_params = prune.extract(bert, params, gates)
  got = _apply(new_bert, new_params)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)
  removed = [i for i in range(L) if new_bert.heads_per_layer[i] == 0]
  for i in removed:
    assert "attention" not in new_params[f"layer_{i}"]
    assert ("attention_LayerNorm" in new_params[f"layer_{i}"]) == keep_layernorm
  # A physically smaller model: fewer parameters than the full one.
  size = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))
  assert size(new_params) < size(params)


def test_extraction_picks_the_right_heads(params):
  bert = _bert()
  want = _apply(bert, params, _MIXED)[0]
  wrong = (_MIXED[0], np.array([0, 1, 0, 1], np.float32), None, _MIXED[3])
  new_bert, new_params = prune.extract(bert, params, wrong)
  assert np.abs(_apply(new_bert, new_params)[0] - want).max() > 1e-3


def test_extracted_params_match_fresh_init_and_serialize(params):
  bert = _bert(True)
  new_bert, new_params = prune.extract(bert, params, _MIXED)
  assert new_bert.heads_per_layer == (0, 2, 4, 2)
  fresh = _random_params(model.BertModel(new_bert), seed=1)
  shapes = lambda t: jax.tree_util.tree_map(np.shape, t)
  assert shapes(fresh) == shapes(new_params)
  restored = flax.serialization.from_bytes(fresh, flax.serialization.to_bytes(new_params))
  for a, b in zip(_apply(new_bert, restored), _apply(new_bert, new_params)):
    np.testing.assert_array_equal(a, b)


def test_extract_boxed_params_keep_partitioning():
  bert = _bert()
  boxed = _random_params(model.BertModel(bert), boxed=True)
  _, new = prune.extract(bert, boxed, _MIXED)
  q = new["layer_1"]["attention"]["query"]["kernel"]
  assert isinstance(q, nn.meta.AxisMetadata) and q.unbox().shape == (32, 2, 8)
  assert q.names == ("embed", "heads", "kv")


def test_extract_task_params(params):
  bert = _bert()
  clf = model.BertForSequenceClassification(bert, num_labels=3)
  task = _random_params(clf, seed=2)
  want, _ = jax.jit(lambda p: clf.apply({"params": p}, _IDS, _VALID, gates=_MIXED))(task)
  new_bert, new_task = prune.extract_task(bert, task, _MIXED)
  small = model.BertForSequenceClassification(new_bert, 3)
  got, _ = jax.jit(lambda p: small.apply({"params": p}, _IDS, _VALID))(new_task)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert "classifier" in new_task
  with pytest.raises(ValueError, match="extract_task"):
    prune.extract(bert, task, _MIXED)


def test_extract_bad_gates(params):
  bert = _bert()
  with pytest.raises(ValueError, match="Gates for 3 layers .* 4 layers"):
    prune.extract(bert, params, _MIXED[:3])
  with pytest.raises(ValueError, match="another depth"):
    prune.extract(bert, params, {"layer_6": np.float32(0.0)})
  with pytest.raises(ValueError, match="hard"):
    prune.extract(bert, params, (np.float32(0.5), None, None, None))
  with pytest.raises(ValueError, match="has 4 heads"):
    prune.extract(bert, params, (np.ones(3, np.float32), None, None, None))
  six = model.BertConfig(**{**bert.__dict__, "num_hidden_layers": 6})
  with pytest.raises(ValueError):
    prune.extract(six, params, (None,) * 6)


def test_report_lists_layers():
  frozen = learn.Frozen(gates=_MIXED, metadata={"unit": "head"})
  text = prune.report(frozen)
  assert "1/4 attention sublayers removed (0)" in text
  assert "| 0 | **pruned** |" in text and "| 3 | kept | 2/4 | 0, 1 |" in text
  assert "| 2 | kept (not gated) |" in text

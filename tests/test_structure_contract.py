"""The `learn.Structure` contract, checked on every registered method (a new one included).

Each case builds a method from its default config on a tiny BertConfig (methods with
`density_over` also with density_over="data" and example lengths) and checks what the
train step and the exporters rely on: the shapes and dtypes of sampled masks and gates, a
finite scalar penalty, deterministic evaluation samples, and a deterministic `freeze` with
bool masks, {0, 1} gates and JSON-able metadata.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
from sparse_attn import learn
from sparse_attn import model

N = 12
# The tests' tiny model with 4 layers (2 would be fully pruned by prune's default budget).
BERT = model.BertConfig(**{**_tiny.TINY_MODEL, "num_hidden_layers": 4})
LENGTHS = np.array([3, 5, 8, 8, 12, 20])  # 20 > N counts as N.


def _cases():
  cases = []
  for name in learn.names():
    cases.append(pytest.param(name, {}, id=name))
    if "density_over" in learn.default_config(name):
      cases.append(pytest.param(name, {"density_over": "data"}, id=f"{name}-data"))
  return cases


def _build(name, overrides):
  cfg = learn.default_config(name)
  cfg.update(overrides)
  lengths = LENGTHS if cfg.get("density_over") == "data" else None
  return learn.build(cfg, BERT, N, lengths=lengths)


def _params(structure):
  """Init params moved off their (often symmetric) init, so decisions differ per unit."""
  params = structure.init(jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  assert leaves, "init returned no parameters"
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [
      x + jax.random.normal(k, jnp.shape(x), jnp.asarray(x).dtype)
      for x, k in zip(leaves, keys)])


def _heads(i):
  return BERT.layer_heads(i)


def _per_layer(tree):
  """(layer, leaf) of a per-layer tuple's non-None entries ([] for None)."""
  if tree is None:
    return []
  assert isinstance(tree, tuple) and len(tree) == BERT.num_hidden_layers, tree
  return [(i, leaf) for i, leaf in enumerate(tree) if leaf is not None]


def _check_masks(masks, *, frozen):
  for i, m in _per_layer(masks):
    shape = tuple(np.shape(m))
    assert shape in {(h, N, N) for h in (1, _heads(i))} | {
        (1, h, N, N) for h in (1, _heads(i))}, (i, shape)
    dtype = np.asarray(m).dtype
    if frozen:
      assert dtype == np.bool_, f"layer {i}: frozen masks must be bool, got {dtype}"
    else:
      assert dtype == np.bool_ or np.issubdtype(dtype, np.floating), (i, dtype)
      assert np.all((np.asarray(m) >= 0) & (np.asarray(m) <= 1)), i


def _check_gates(gates, *, frozen):
  for i, g in _per_layer(gates):
    assert np.shape(g) in {(), (_heads(i),)}, (i, np.shape(g))
    g = np.asarray(g)
    assert np.issubdtype(g.dtype, np.floating), (i, g.dtype)
    if frozen:
      assert np.all((g == 0) | (g == 1)), f"layer {i}: frozen gates must be 0 or 1, got {g}"


def _assert_same(a, b, what):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, what
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def check_contract(structure):
  """Asserts the Structure contract (see the module docstring) for `structure`."""
  assert isinstance(structure, learn.Structure)
  params = _params(structure)
  sample = jax.jit(structure.sample, static_argnums=3)
  s = sample(params, jax.random.key(2), jnp.asarray(3), True)
  assert isinstance(s, learn.Sample)
  assert s.masks is not None or s.gates is not None, "the method gives neither masks nor gates"
  _check_masks(s.masks, frozen=False)
  _check_gates(s.gates, frozen=False)
  assert np.shape(s.penalty) == () and np.isfinite(float(s.penalty)), s.penalty
  assert all(np.all(np.isfinite(np.asarray(v))) for v in s.metrics.values()), s.metrics

  a = sample(params, jax.random.key(3), jnp.asarray(3), False)
  b = sample(params, jax.random.key(4), jnp.asarray(3), False)
  _check_masks(a.masks, frozen=False)
  _check_gates(a.gates, frozen=False)
  _assert_same((a.masks, a.gates, a.penalty), (b.masks, b.gates, b.penalty),
               "sample(train=False) depends on the rng")

  f = structure.freeze(params)
  assert isinstance(f, learn.Frozen)
  assert f.masks is not None or f.gates is not None
  _check_masks(f.masks, frozen=True)
  _check_gates(f.gates, frozen=True)
  g = structure.freeze(params)
  _assert_same((f.masks, f.gates), (g.masks, g.gates), "freeze is not deterministic")
  text = json.dumps(f.metadata)
  assert json.dumps(g.metadata) == text, "freeze metadata is not deterministic"
  assert set(f.mask_arrays()) == {f"layer_{i}" for i, m in enumerate(f.masks or ())
                                  if m is not None}
  return f


@pytest.mark.parametrize("name, overrides", _cases())
def test_structure_contract(name, overrides):
  structure = _build(name, overrides)
  assert structure.name == name
  frozen = check_contract(structure)
  method = learn.get(name)
  assert (method.report is None) == (method.report_file is None)
  if method.report is not None:
    assert isinstance(method.report(frozen), str)


def test_every_registered_method_is_checked():
  checked = {p.values[0] for p in _cases()}
  assert checked == set(learn.METHODS) and checked, checked


def test_the_contract_catches_float_frozen_masks():
  """A method whose freeze returned float masks (or fractional gates) fails the check."""
  good = _build("dam_s", {})

  def float_masks(params):
    f = good.freeze(params)
    return learn.Frozen(tuple(None if m is None else m.astype(np.float32) for m in f.masks),
                        f.gates, f.metadata)

  with pytest.raises(AssertionError, match="frozen masks must be bool"):
    check_contract(dataclasses.replace(good, freeze=float_masks))
  gates = _build("prune", {})

  def soft_gates(params):
    f = gates.freeze(params)
    return learn.Frozen(f.masks, tuple(None if g is None else g * 0.5 + 0.25
                                       for g in f.gates), f.metadata)

  with pytest.raises(AssertionError, match="frozen gates must be 0 or 1"):
    check_contract(dataclasses.replace(gates, freeze=soft_gates))


def test_registry_lookup():
  assert learn.get("prune").report_file == "pruned_layers.md"
  assert learn.get("prune").extract is not None
  assert learn.default_config("dam_u").method == "dam_u"
  with pytest.raises(ValueError, match=r"Did you mean \['dam_s'"):
    learn.get("dam_ss")
  with pytest.raises(ValueError, match="none"):
    learn.get("none")
  assert learn.build({"method": "none"}, BERT, N) is None

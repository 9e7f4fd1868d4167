"""Tests for sparse_attn.learn.window (learned neighbour degrees, a reconstruction)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import learn
from sparse_attn import model
from sparse_attn.learn import window
from sparse_attn.masks import stats
from sparse_attn.masks import patterns

N = 12


def _bert(layers=2, **kw):
  return model.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                          num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=32, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, **kw)


def _cfg(**kw):
  c = window.default_config()
  c.update(kw)
  return c


def _loop_band(w, n, include_self=True):
  m = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(n):
      m[i, j] = abs(i - j) <= w and (include_self or i != j)
  return m


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize("include_self", [True, False])
def test_band_masks_match_loop(include_self):
  widths = np.array([[0, 1], [3, N - 1]])
  got = window.band_masks(widths, N, include_self)
  assert got.shape == (2, 2, N, N) and got.dtype == bool
  for a in range(2):
    for b in range(2):
      np.testing.assert_array_equal(got[a, b], _loop_band(widths[a, b], N, include_self))
  np.testing.assert_array_equal(window.band_masks(2, N), patterns.window(N, 2))


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_band_density_closed_form(n):
  for w in range(n):
    loop = _loop_band(w, n).mean()
    formula = (n + 2 * sum(n - d for d in range(1, w + 1))) / n**2
    assert window.band_density(w, n) == pytest.approx(loop, abs=1e-12)
    assert formula == pytest.approx(loop, abs=1e-12)
    assert window.band_density(w, n, include_self=False) == pytest.approx(
        _loop_band(w, n, False).mean(), abs=1e-12)


def test_offset_counts_match_loop():
  d = np.abs(np.arange(N)[:, None] - np.arange(N)[None, :])
  np.testing.assert_array_equal(window.offset_counts(N), np.bincount(d.ravel(), minlength=N))


@pytest.mark.parametrize("include_self", [True, False])
def test_expected_density_closed_form_vs_loop(include_self):
  rng = np.random.default_rng(0)
  cands = [0, 2, 3, 7, N - 1]
  probs = rng.dirichlet(np.ones(len(cands)), size=3)            # [3, C]
  fixed = window.fixed_links(N, global_tokens=1, random_keys=2, seed=5)
  got = np.asarray(window.expected_density(probs, cands, N, include_self, fixed))
  for row in range(3):
    loop = sum(p * (_loop_band(w, N, include_self) | fixed).mean()
               for p, w in zip(probs[row], cands))
    assert got[row] == pytest.approx(loop, abs=1e-6)
  # Without fixed links: the band densities' mixture.
  plain = np.asarray(window.expected_density(probs[0], cands, N))
  assert plain == pytest.approx(sum(p * window.band_density(w, N)
                                    for p, w in zip(probs[0], cands)), abs=1e-6)


def test_masks_from_keep_and_density_agree():
  t = jax.random.uniform(jax.random.key(0), (3, N))
  fixed = window.fixed_links(N, 2, 1, seed=1)
  m = np.asarray(window.masks_from_keep(t, fixed))
  for h in range(3):
    for i in range(N):
      for j in range(N):
        want = 1.0 if fixed[i, j] else float(t[h, abs(i - j)])
        assert m[h, i, j] == pytest.approx(want)
  np.testing.assert_allclose(window.density_from_keep(t, fixed), m.mean(axis=(1, 2)),
                             rtol=1e-6)
  # Over a dataset's valid pairs: the mean over examples of each one's density.
  lengths = np.array([3, 5, N, N + 4])
  pairs = stats.pair_weights(lengths, N)
  want = [np.mean([m[h, :k, :k].mean() for k in np.minimum(lengths, N)]) for h in range(3)]
  np.testing.assert_allclose(window.density_from_keep(t, fixed, pairs), want, rtol=1e-5)


def test_gumbel_softmax_st_forward_one_hot_and_gradient():
  logits = jax.random.normal(jax.random.key(1), (5, 6))
  st = jax.jit(window.gumbel_softmax_st)
  for seed in range(5):
    z = st(logits, jax.random.key(seed), 0.5)
    assert set(np.unique(np.asarray(z)).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(z).sum(-1), 1.0)
  g = jax.jit(jax.grad(lambda l: jnp.sum(
      window.gumbel_softmax_st(l, jax.random.key(0), 0.5) * jnp.arange(6.0))))(logits)
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_temperature_annealing():
  assert float(window.temperature_at(5, 2.0, None, 10)) == 2.0
  assert float(window.temperature_at(0, 2.0, 0.5, 10)) == pytest.approx(2.0)
  assert float(window.temperature_at(5, 2.0, 0.5, 10)) == pytest.approx(1.0)
  assert float(window.temperature_at(50, 2.0, 0.5, 10)) == pytest.approx(0.5)


# --- the Structure --------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
def test_gumbel_sample_is_exact_band_or_fixed(per_head):
  bert = _bert(layers=3)
  s = learn.METHODS["learned_window"](
      _cfg(method="learned_window", per_head=per_head, layers=[0, 2], max_width=6,
           global_tokens=1, random_keys=1, beta=0.5, init="uniform"), bert, N)
  params = s.init(jax.random.key(0))
  out = jax.jit(s.sample, static_argnums=3)(params, jax.random.key(3), 0, True)
  assert out.masks[1] is None and out.gates is None
  fixed = window.fixed_links(N, 1, 1, 0)
  h = 4 if per_head else 1
  for i in (0, 2):
    m = np.asarray(out.masks[i])
    assert m.shape == (h, N, N) and m.dtype == np.float32
    for head in range(h):
      assert any(np.array_equal(m[head], window.band_masks(w, N) | fixed)
                 for w in range(7)), "sample is not a band OR fixed links"
  probs = jax.nn.softmax(jnp.stack([params["layer_0"], params["layer_2"]]), -1)
  want = 0.5 * np.mean(window.expected_density(probs, range(7), N, True, fixed))
  assert float(out.penalty) == pytest.approx(float(want), rel=1e-5)
  assert set(out.metrics) >= {"window/expected_width", "window/density",
                              "window/expected_density"}


def test_widest_init_starts_near_dense():
  s = window.make_structure(_cfg(init_prob=0.99), _bert(), N)
  out = s.sample(s.init(jax.random.key(0)), jax.random.key(1), 0, False)
  assert float(out.metrics["window/density"]) == 1.0
  assert float(out.metrics["window/expected_density"]) > 0.98


@pytest.fixture(scope="module")
def task():
  """A tiny BertModel, its params and a regression loss of its hidden states."""
  bert = _bert()
  ids = jax.random.randint(jax.random.key(7), (2, N), 1, 100)
  valid = jnp.ones((2, N), bool).at[1, N - 3:].set(False)
  mdl = model.BertModel(bert)
  shapes = jax.eval_shape(mdl.init, jax.random.key(8), ids)["params"]
  rng = np.random.default_rng(8)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                                  nn.meta.unbox(shapes))
  target = jax.random.normal(jax.random.key(9), (2, N, bert.hidden_size))

  def loss(masks):
    h, _ = mdl.apply({"params": params}, ids, valid, masks=masks)
    return jnp.mean((h - target) ** 2)
  return bert, loss


@pytest.mark.parametrize("relaxation", ["gumbel_softmax", "soft_window"])
def test_gradients_reach_structure_params_through_bert(task, relaxation):
  bert, loss = task
  s = window.make_structure(_cfg(relaxation=relaxation, per_head=True, max_width=6,
                                 init="uniform", global_tokens=1), bert, N)
  params = s.init(jax.random.key(0))

  def total(p):
    return loss(s.sample(p, jax.random.key(4), 0, True).masks)

  grads = jax.jit(jax.grad(total))(params)
  for name in ("layer_0", "layer_1"):
    g = np.asarray(grads[name])
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name


@pytest.mark.parametrize("relaxation", ["gumbel_softmax", "soft_window"])
def test_penalty_step_lowers_expected_density(relaxation):
  s = window.make_structure(_cfg(relaxation=relaxation, max_width=8, beta=1.0,
                                 init="uniform"), _bert(), N)
  params = s.init(jax.random.key(0))
  pen = jax.jit(lambda p: s.sample(p, jax.random.key(1), 0, True).penalty)
  g = jax.jit(jax.grad(pen))(params)
  new = jax.tree_util.tree_map(lambda p, d: p - 2.0 * d, params, g)
  assert float(pen(new)) < float(pen(params))


def test_freeze_argmax_widths_masks_and_metadata():
  bert = _bert()
  s = window.make_structure(_cfg(per_head=True, max_width=5, global_tokens=1), bert, N)
  logits = np.full((4, 6), -3.0, np.float32)
  widths = [0, 2, 5, 3]
  logits[np.arange(4), widths] = 2.0
  params = {"layer_0": jnp.asarray(logits), "layer_1": jnp.asarray(logits[::-1])}
  frozen = s.freeze(params)
  fixed = patterns.global_tokens(N, 1)
  for i, ws in ((0, widths), (1, widths[::-1])):
    m = frozen.masks[i]
    assert m.dtype == bool and m.shape == (4, N, N)
    for h, w in enumerate(ws):
      np.testing.assert_array_equal(m[h], patterns.window(N, w) | fixed)
    assert frozen.metadata["widths"][f"layer_{i}"] == list(ws)
  meta = json.loads(json.dumps(frozen.metadata))
  assert meta["densities"]["layer_0"][1] == pytest.approx(frozen.masks[0][1].mean())
  assert "reconstruction" in meta
  # Evaluation-time sample equals the frozen masks.
  ev = s.sample(params, jax.random.key(0), 0, False)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(ev.masks[i]) > 0.5, frozen.masks[i])


def test_soft_window_freeze_floors_width():
  s = window.make_structure(_cfg(relaxation="soft_window", max_width=6), _bert(), N)
  frozen = s.freeze({"layer_0": jnp.array([2.7]), "layer_1": jnp.array([40.0])})
  np.testing.assert_array_equal(frozen.masks[0][0], patterns.window(N, 2))
  np.testing.assert_array_equal(frozen.masks[1][0], patterns.window(N, 6))  # Clipped.
  assert frozen.metadata["widths"] == {"layer_0": 2, "layer_1": 6}
  # The soft band crosses 1/2 exactly at the frozen width.
  t = np.asarray(window.soft_keep(jnp.array(2.7), N, 0.5))
  assert np.all((t > 0.5) == (np.arange(N) <= 2))


def test_layers_with_no_attention_are_skipped_or_rejected():
  bert = _bert(layers=3, heads_per_layer=(4, 0, 4))
  s = window.make_structure(_cfg(max_width=3), bert, N)
  out = s.sample(s.init(jax.random.key(0)), jax.random.key(0), 0, True)
  assert out.masks[1] is None and out.masks[0] is not None
  with pytest.raises(ValueError, match="no attention"):
    window.make_structure(_cfg(layers=[1]), bert, N)


@pytest.mark.parametrize("kw, match", [
    ({"max_width": N}, "larger than the sequence"),
    ({"candidates": [0, 4, N + 3], "max_width": None}, "larger than the sequence"),
    ({"candidates": [3, 1]}, "strictly increasing"),
    ({"beta": -0.1}, "beta"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature_final": 0.1}, "anneal_steps"),
    ({"relaxation": "sparsemax"}, "relaxation"),
    ({"layers": [5]}, "outside"),
    ({"global_tokens": N + 1}, "global_tokens"),
])
def test_bad_config_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    window.make_structure(_cfg(**kw), _bert(), N)


def test_unknown_key_raises():
  c = _cfg()
  c.widht = 3
  with pytest.raises(ValueError, match="Unknown learned_window config keys"):
    window.make_structure(c, _bert(), N)


def test_max_width_n_minus_1_is_dense():
  s = window.make_structure(_cfg(max_width=N - 1), _bert(), N)
  frozen = s.freeze(s.init(jax.random.key(0)))
  assert frozen.masks[0].all()


# --- BigBird baseline -------------------------------------------------------------------------


def test_bigbird_counts_match_patterns():
  n = 10
  counts = window._bigbird_counts(n, 1, 3)
  for w in range(n):
    for r in range(n + 1):
      assert counts[w, r] == patterns.bigbird(n, w, 1, r, 3).sum()


@pytest.mark.parametrize("target", [0.05, 0.2, 0.45, 0.8])
def test_bigbird_matched_rule(target):
  n, g, seed = 24, 1, 2
  mask, density, w, r = window.bigbird_matched(n, target, g, seed)
  np.testing.assert_array_equal(mask, patterns.bigbird(n, w, g, r, seed))
  assert density == pytest.approx(mask.mean())
  # Largest window whose band + globals fits, then the closest random-key count.
  base = [(patterns.window(n, k) | patterns.global_tokens(n, g)).mean() for k in range(n)]
  fits = [k for k in range(n) if base[k] <= target + 1e-12]
  assert w == (max(fits) if fits else 0)
  best = min(abs(patterns.bigbird(n, w, g, k, seed).mean() - target) for k in range(n + 1))
  assert abs(density - target) == pytest.approx(best)


def test_bigbird_matched_over_a_datasets_valid_pairs():
  n, g, seed, lengths = 24, 1, 2, np.array([5, 8, 8, 13, 30])
  pairs = stats.pair_weights(lengths, n)
  counts = window._bigbird_counts(n, g, seed, pairs)
  for w in (0, 3, 23):
    for r in (0, 2, 24):
      np.testing.assert_allclose(counts[w, r], (patterns.bigbird(n, w, g, r, seed)
                                                * pairs).sum())
  mask, density, w, r = window.bigbird_matched(n, 0.4, g, seed, pairs_NxN=pairs)
  valid = np.arange(n)[None, :] < np.minimum(lengths, n)[:, None]
  assert density == pytest.approx(stats.density(mask, valid))
  best = min(abs(stats.density(patterns.bigbird(n, w, g, k, seed), valid) - 0.4)
             for k in range(n + 1))
  assert abs(density - 0.4) == pytest.approx(best)


def test_bigbird_matched_fixed_window():
  m = window.bigbird_matched(32, 0.3, 1, 0, window=1)
  assert m.window == 1 and abs(m.density - 0.3) < 1.0 / 32
  with pytest.raises(ValueError, match="target_density"):
    window.bigbird_matched(32, 1.5)


@pytest.mark.parametrize("relaxation", ["gumbel_softmax", "soft_window"])
def test_target_density_pulls_the_expected_density_to_the_target(relaxation):
  lengths = np.array([4, 6, 9, N])
  s = window.make_structure(_cfg(relaxation=relaxation, max_width=N - 1, beta=1.0,
                                 target_density=0.3, density_over="data"), _bert(), N,
                            lengths=lengths)
  params = s.init(jax.random.key(0))  # "widest": far above the target.
  gap = jax.jit(lambda p: s.sample(p, jax.random.key(1), 0, True).metrics[
      "window/expected_density"] - 0.3)
  pen = jax.jit(lambda p: s.sample(p, jax.random.key(1), 0, True).penalty)
  assert float(gap(params)) > 0.3
  np.testing.assert_allclose(pen(params), gap(params), rtol=1e-5)  # beta * |gap|, one gap.
  for _ in range(300):
    g = jax.grad(pen)(params)
    params = jax.tree_util.tree_map(lambda p, d: p - 5.0 * d, params, g)
  assert abs(float(gap(params))) < 0.1
  if relaxation == "gumbel_softmax":  # Frozen widths: the valid-pair density is recorded.
    frozen = s.freeze(params)
    got = frozen.metadata["valid_pair_densities"]["layer_0"]
    np.testing.assert_allclose(got, [(frozen.masks[0][0] * stats.pair_weights(lengths, N))
                                     .sum()], rtol=1e-6)
  with pytest.raises(ValueError, match="lengths=dataset.lengths"):
    window.make_structure(_cfg(density_over="data"), _bert(), N)
  with pytest.raises(ValueError, match="target_density"):
    window.make_structure(_cfg(target_density=1.5), _bert(), N)


def test_block_size_rounds_the_frozen_band_to_whole_tiles():
  from sparse_attn.masks import layout
  n, b = 32, 8
  c = _cfg(per_head=True, max_width=20, block_size=b)
  s = window.make_structure(c, _bert(), n)
  params = s.init(jax.random.key(0))
  frozen = s.freeze(params)
  for m in frozen.masks:
    lay = layout.from_mask(m, b)
    assert not (lay.block_mask == layout.PARTIAL).any()      # Whole tiles only.
  widths = frozen.metadata["widths"]["layer_0"]
  for h, w in enumerate(widths):
    assert (frozen.masks[0][h] >= patterns.window(n, w)).all()   # Covers the learned band.
  assert frozen.metadata["block_size"] == b
  np.testing.assert_array_equal(patterns.block_band(16, 4, 5),
                                np.abs(np.arange(16)[:, None] // 4
                                       - np.arange(16)[None] // 4) <= 2)

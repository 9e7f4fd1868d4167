"""Tests for sparse_attn.learn.dam (SparseBERT's Differentiable Attention Mask)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_attn import model as model_lib
from sparse_attn.learn import dam

TINY = model_lib.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64)


def _build(n=12, bert_config=TINY, lengths=None, **overrides):
  cfg = {"method": "dam_s", **overrides}
  factory = dam.dam_s if cfg["method"] == "dam_s" else dam.dam_u
  return factory(cfg, bert_config, n, lengths=lengths)


def _sample(st, params, key, step, train):
  """Structure.sample under jit (one compile instead of many eager op compiles)."""
  return jax.jit(st.sample, static_argnums=3)(params, key, jnp.asarray(step), train)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# ---------------------------------------------------------------- expansion

@pytest.mark.parametrize("block", [0, 1, 3, 4])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_toeplitz_expansion_matches_loop(asymmetric, block):
  n, h = 10, 3
  u = dam.num_units(n, block)
  p = 2 * u - 1 if asymmetric else u
  m = np.random.default_rng(0).normal(size=(h, p)).astype(np.float32)
  got = np.asarray(dam.expand_toeplitz(m, n, asymmetric, block))
  want = np.zeros((h, n, n), np.float32)
  for k in range(h):
    for i in range(n):
      for j in range(n):
        bi, bj = (i // block, j // block) if block else (i, j)
        want[k, i, j] = m[k, bi - bj + u - 1] if asymmetric else m[k, abs(bi - bj)]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block", [0, 3])
def test_unstructured_expansion_matches_loop(block):
  n, h = 10, 2
  u = dam.num_units(n, block)
  a = np.random.default_rng(1).normal(size=(h, u, u)).astype(np.float32)
  got = np.asarray(dam.expand_unstructured(a, n, symmetric=False, block_size=block))
  want = np.zeros((h, n, n), np.float32)
  for k in range(h):
    for i in range(n):
      for j in range(n):
        want[k, i, j] = a[k, i // block, j // block] if block else a[k, i, j]
  np.testing.assert_array_equal(got, want)


def test_dam_u_symmetric_tying_is_the_codes_triu_form():
  n = 9
  a = np.random.default_rng(2).normal(size=(3, n, n)).astype(np.float32)
  got = np.asarray(dam.expand_unstructured(a, n, symmetric=True))
  code = np.triu(a) + np.swapaxes(np.triu(a, 1), -1, -2)  # triu(a) + triu(a, 1)^T
  np.testing.assert_array_equal(got, code)
  np.testing.assert_array_equal(got, np.swapaxes(got, -1, -2))
  assert not np.array_equal(got, a)


def test_logit_weights_count_entries():
  n = 10
  idx = dam.toeplitz_index(n)
  w = dam.logit_weights(idx, n)
  np.testing.assert_array_equal(w, [n] + [2 * (n - d) for d in range(1, n)])
  eligible = 1.0 - np.eye(n)
  w_nodiag = dam.logit_weights(idx, n, eligible)
  assert w_nodiag[0] == 0 and np.array_equal(w_nodiag[1:], w[1:])
  idx_b = dam.toeplitz_index(n, block_size=4)  # Blocks of 4, 4, 2.
  w_b = dam.logit_weights(idx_b, 3)
  np.testing.assert_array_equal(w_b, [16 + 16 + 4, 2 * (16 + 8), 2 * 8])


# ---------------------------------------------------------------- relaxation

def test_hard_gumbel_sigmoid_is_binary_with_the_soft_gradient():
  a = jnp.linspace(-3.0, 3.0, 64)
  key = jax.random.key(3)
  for tau in (0.5, 1.0, 2.0):
    hard = dam.gumbel_sigmoid(a, key, tau, hard=True)
    assert set(np.unique(np.asarray(hard))) <= {0.0, 1.0}
    soft = dam.gumbel_sigmoid(a, key, tau, hard=False)
    np.testing.assert_array_equal(np.asarray(hard), np.asarray(soft) > 0.5)
    c = jnp.cos(jnp.arange(64.0))  # Any cotangent.
    g_hard = jax.grad(lambda x: jnp.sum(c * dam.gumbel_sigmoid(x, key, tau, True)))(a)
    g_soft = jax.grad(lambda x: jnp.sum(c * dam.gumbel_sigmoid(x, key, tau, False)))(a)
    np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(g_hard) != 0)


def test_hard_keep_probability_is_sigmoid_for_any_temperature():
  # P(alpha + Logistic > 0) = sigmoid(alpha), whatever tau; checked to 4 Monte Carlo SE.
  alphas = jnp.array([-2.0, -0.5, 0.0, 1.0, 3.0])
  n = 20000
  p = _sigmoid(alphas)
  se = np.sqrt(p * (1 - p) / n)
  for i, tau in enumerate((0.3, 1.0, 3.0)):
    x = jnp.broadcast_to(alphas, (n, 5))
    mean = np.asarray(jnp.mean(dam.gumbel_sigmoid(x, jax.random.key(i), tau, True), 0))
    np.testing.assert_array_less(np.abs(mean - p), 4 * se + 1e-9)


def test_soft_sample_mean_is_sigmoid_only_at_zero_or_low_temperature():
  n = 20000
  key = jax.random.key(7)
  # alpha = 0: the soft sample is symmetric about 1/2 for every tau.
  for tau in (0.5, 2.0):
    mean = float(jnp.mean(dam.gumbel_sigmoid(jnp.zeros(n), key, tau, False)))
    assert abs(mean - 0.5) < 4 * 0.5 / np.sqrt(n)
  # tau -> 0: the soft sample tends to the hard one, whose mean is sigmoid(alpha).
  alphas = jnp.array([-2.0, 1.0, 3.0])
  x = jnp.broadcast_to(alphas, (n, 3))
  mean = np.asarray(jnp.mean(dam.gumbel_sigmoid(x, key, 0.02, False), 0))
  p = _sigmoid(alphas)
  np.testing.assert_array_less(np.abs(mean - p), 4 * np.sqrt(p * (1 - p) / n) + 0.005)
  # At tau = 3 the soft mean is pulled towards 1/2, away from sigmoid(alpha).
  mean3 = np.asarray(jnp.mean(dam.gumbel_sigmoid(x, key, 3.0, False), 0))
  assert np.all(np.abs(mean3 - 0.5) < np.abs(p - 0.5) - 0.05)


def test_temperature_schedule_is_jit_safe_and_annealed():
  f = jax.jit(lambda s: dam.temperature_at(s, 2.0, 0.5, 100, "exponential"))
  np.testing.assert_allclose([f(0), f(50), f(100), f(1000)], [2.0, 1.0, 0.5, 0.5],
                             rtol=1e-6)
  g = jax.jit(lambda s: dam.temperature_at(s, 2.0, 0.5, 100, "linear"))
  np.testing.assert_allclose([g(0), g(50), g(100)], [2.0, 1.25, 0.5], rtol=1e-6)
  assert float(dam.temperature_at(jnp.asarray(77), 1.0, 1.0, 0)) == 1.0
  st = _build(temperature=2.0, temperature_final=0.5, anneal_steps=100)
  s = jax.jit(st.sample, static_argnums=3)(st.init(jax.random.key(0)), jax.random.key(1),
                                           jnp.asarray(50), True)
  np.testing.assert_allclose(s.metrics["dam/temperature"], 1.0, rtol=1e-6)


# ---------------------------------------------------------------- sample / penalty

def test_sample_masks_per_layer_shapes_and_sharing():
  st = _build(n=12)
  params = st.init(jax.random.key(0))
  assert set(params) == {"logits"} and params["logits"]["shared"].shape == (4, 12)
  s = _sample(st, params, jax.random.key(1), jnp.asarray(0), True)
  assert len(s.masks) == 2 and s.masks[0].shape == (4, 12, 12)
  np.testing.assert_array_equal(s.masks[0], s.masks[1])
  assert s.gates is None
  st2 = _build(n=12, share="per_layer", per_head=False, layers=[1])
  s2 = _sample(st2, st2.init(jax.random.key(0)), jax.random.key(1), 0, True)
  assert s2.masks[0] is None and s2.masks[1].shape == (1, 12, 12)


def test_l1_sum_penalty_weights_offsets_by_their_diagonal_length():
  n, lam = 12, 0.25
  st = _build(n=n, lam=lam, init_std=2.0)
  s = _sample(st, st.init(jax.random.key(0)), jax.random.key(1), jnp.asarray(0), True)
  mask = np.asarray(s.masks[0])
  m = mask[:, 0, :]  # m[h, d] = M[h, 0, d].
  c = np.array([n] + [2 * (n - d) for d in range(1, n)])
  assert 0 < m.sum() < m.size  # A mix of kept and dropped offsets.
  np.testing.assert_allclose(s.penalty, lam * np.sum(c * m), rtol=1e-6)
  np.testing.assert_allclose(s.penalty, lam * mask.sum(), rtol=1e-6)  # Shared: once.
  np.testing.assert_allclose(s.metrics["dam/density"], mask.mean(), rtol=1e-6)
  # "density" is the same sum divided by H * n^2.
  st_d = _build(n=n, lam=lam, init_std=2.0, penalty="density")
  s_d = _sample(st_d, st_d.init(jax.random.key(0)), jax.random.key(1), 0, True)
  np.testing.assert_allclose(s_d.penalty, lam * mask.mean(), rtol=1e-6)
  # One mask per layer: each counts.
  st_p = _build(n=n, lam=lam, share="per_layer")
  s_p = _sample(st_p, st_p.init(jax.random.key(0)), jax.random.key(1), 0, True)
  np.testing.assert_allclose(
      s_p.penalty, lam * sum(np.asarray(m_).sum() for m_ in s_p.masks), rtol=1e-6)


def test_l1_gradient_reaches_only_kept_offsets_in_hard_mode():
  st = _build(n=12, lam=1.0, init_std=2.0)
  params = st.init(jax.random.key(0))
  key = jax.random.key(1)
  s = _sample(st, params, key, jnp.asarray(0), True)
  kept = np.asarray(s.masks[0])[:, 0, :] > 0
  grad = jax.jit(jax.grad(lambda p: st.sample(p, key, jnp.asarray(0), True).penalty))
  g = np.asarray(grad(params)["logits"]["shared"])
  assert np.all(g[~kept] == 0) and np.all(g[kept] > 0)


def test_keep_diagonal_false_zeroes_the_diagonal():
  st = _build(n=8, keep_diagonal=False, init_logit=5.0)
  s = _sample(st, st.init(jax.random.key(0)), jax.random.key(1), jnp.asarray(0), True)
  mask = np.asarray(s.masks[0])
  assert np.all(np.diagonal(mask, axis1=1, axis2=2) == 0)
  assert mask.sum() > 0.9 * mask.size - mask.shape[0] * 8


# ---------------------------------------------------------------- evaluation / freeze

def test_eval_is_deterministic_and_equals_threshold():
  st = _build(n=12, init_std=1.0)
  params = st.init(jax.random.key(0))
  sample = jax.jit(st.sample, static_argnums=3)
  a = sample(params, jax.random.key(1), jnp.asarray(5), False)
  b = sample(params, jax.random.key(2), jnp.asarray(5), False)
  np.testing.assert_array_equal(a.masks[0], b.masks[0])
  want = np.asarray(dam.expand_toeplitz(params["logits"]["shared"] > 0, 12))
  np.testing.assert_array_equal(np.asarray(a.masks[0]) > 0, want)
  frozen = st.freeze(params)
  assert frozen.masks[0].dtype == np.bool_
  np.testing.assert_array_equal(frozen.masks[0], want)
  # The code's behaviour: noise at evaluation too.
  st_n = _build(n=12, init_std=1.0, stochastic_eval=True)
  c = _sample(st_n, params, jax.random.key(1), 5, False)
  d = _sample(st_n, params, jax.random.key(2), 5, False)
  assert not np.array_equal(c.masks[0], d.masks[0])


def test_topk_hits_the_target_density():
  n, t = 10, 0.3
  st = _build(n=n, method="dam_u", init_std=1.0, target_density=t, eval_rule="topk")
  params = st.init(jax.random.key(0))
  frozen = st.freeze(params)
  mask = frozen.masks[0]
  assert mask.sum() == round(t * mask.size)  # Element level: exact.
  a = np.asarray(dam.expand_unstructured(params["logits"]["shared"], n))
  assert a[mask].min() > a[~mask].max()  # The kept entries are the highest logits.
  s = _sample(st, params, jax.random.key(1), jnp.asarray(0), False)
  np.testing.assert_array_equal(np.asarray(s.masks[0]) > 0, mask)
  # DAM_s: exact up to half of one offset's entries (at most n).
  st_s = _build(n=n, init_std=1.0, target_density=t, eval_rule="topk")
  m_s = st_s.freeze(st_s.init(jax.random.key(0))).masks[0]
  assert abs(m_s.sum() - t * m_s.size) <= n / 2


def _valid_pair_density(mask_HxNxN, lengths):
  """Mean over examples of a mask's density over their valid pairs (a loop)."""
  return np.mean([mask_HxNxN[:, :m, :m].mean() for m in lengths])


@pytest.mark.parametrize("method", ["dam_s", "dam_u"])
def test_density_over_data_counts_the_datas_valid_pairs(method):
  n, t = 16, 0.3
  lengths = np.array([3, 5, 5, 8, 11, 16, 20])  # 20 > n counts as n.
  st = _build(n=n, method=method, init_std=1.0, target_density=t, eval_rule="topk",
              density_over="data", lengths=lengths)
  params = st.init(jax.random.key(0))
  mask = st.freeze(params).masks[0]
  got = _valid_pair_density(mask, np.minimum(lengths, n))
  # Top-k is exact up to one logit's share of the pairs (an offset's, for dam_s).
  assert abs(got - t) < (0.01 if method == "dam_u" else 0.08), got
  # The logged expected density is the valid-pair one.
  s = _sample(st, params, jax.random.key(1), 0, True)
  p = dam.expand_toeplitz(jax.nn.sigmoid(params["logits"]["shared"]), n) if method == "dam_s" \
      else dam.expand_unstructured(jax.nn.sigmoid(params["logits"]["shared"]), n)
  np.testing.assert_allclose(s.metrics["dam/expected_density"],
                             _valid_pair_density(np.asarray(p), np.minimum(lengths, n)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="lengths=dataset.lengths"):
    _build(n=n, density_over="data")


def test_freeze_metadata_is_json_and_matches_masks():
  st = _build(n=10, method="dam_u", share="per_layer", layers=[1], block_size=4,
              keep_diagonal=False, init_std=1.0)
  frozen = st.freeze(st.init(jax.random.key(0)))
  assert frozen.masks[0] is None and frozen.masks[1].shape == (4, 10, 10)
  assert not np.diagonal(frozen.masks[1], axis1=1, axis2=2).any()
  md = json.loads(json.dumps(frozen.metadata))
  assert md["method"] == "dam_u" and md["seq_len"] == 10 and md["block_size"] == 4
  assert md["element_density_per_layer"][0] is None
  np.testing.assert_allclose(md["element_density_per_layer"][1], frozen.masks[1].mean())
  np.testing.assert_allclose(md["element_density_per_head"][1],
                             frozen.masks[1].mean(axis=(1, 2)))
  assert md["block_density_per_layer"][1] is not None


# ---------------------------------------------------------------- learning

def test_task_loss_alone_reaches_the_logits_through_the_model():
  n, b = 16, 3
  mdl = model_lib.BertModel(TINY)
  ids = jax.random.randint(jax.random.key(0), (b, n), 1, TINY.vocab_size)
  pad = jnp.arange(n)[None, :] < jnp.array([[n], [n - 3], [n - 7]])
  # Random weights of the right shapes (eval_shape traces init without compiling it).
  shapes = jax.eval_shape(mdl.init, jax.random.key(1), ids, pad)["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(
      tree, [jnp.asarray(rng.normal(0.0, 0.2, x.shape), jnp.float32) for x in leaves])
  w_out = jax.random.normal(jax.random.key(2), (TINY.hidden_size, 2))
  labels = jnp.array([0, 1, 1])
  st = _build(n=n, lam=0.0)
  sp = st.init(jax.random.key(3))

  def loss(sp, key):
    s = st.sample(sp, key, jnp.asarray(0), True)
    _, aux = mdl.apply({"params": params}, ids, pad, masks=s.masks)
    logp = jax.nn.log_softmax(aux["pooled"] @ w_out)
    return -jnp.mean(logp[jnp.arange(b), labels]) + s.penalty, s.penalty

  g, penalty = jax.jit(jax.grad(loss, has_aux=True))(sp, jax.random.key(4))
  g = np.asarray(g["logits"]["shared"])
  assert float(penalty) == 0.0
  assert np.all(np.isfinite(g)) and np.count_nonzero(g) > 0.9 * g.size


def _fit_penalty(st, steps, lr=0.05):
  params = st.init(jax.random.key(0))
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state, i):
    g = jax.grad(lambda p: _sample(st, p, jax.random.fold_in(jax.random.key(1), i), i,
                                     True).penalty)(params)
    updates, state = opt.update(g, state, params)
    d = _sample(st, params, jax.random.key(2), i, True).metrics["dam/expected_density"]
    return optax.apply_updates(params, updates), state, d

  densities = []
  for i in range(steps):
    params, state, d = step(params, state, jnp.asarray(i))
    densities.append(float(d))
  return params, np.array(densities)


def test_abs_target_moves_density_to_the_target():
  st = _build(n=16, target_density=0.1, target_mode="abs", lam=1.0)
  _, d = _fit_penalty(st, 300)
  assert abs(d[0] - 0.5) < 0.01 and abs(d[-1] - 0.1) < 0.05


def test_lagrangian_multipliers_get_reversed_gradients():
  t = 0.2
  st = _build(n=12, target_density=t, init_std=1.0)
  params = st.init(jax.random.key(0))
  params["lagrange"] = jnp.array([[0.7, 1.3]])
  key, step = jax.random.key(1), jnp.asarray(0)
  s = _sample(st, params, key, step, True)
  gap = float(s.metrics["dam/expected_density"]) - t
  np.testing.assert_allclose(s.penalty, 0.7 * gap + 1.3 * gap ** 2, rtol=1e-5)
  g = jax.jit(jax.grad(lambda p: st.sample(p, key, step, True).penalty))(params)
  np.testing.assert_allclose(g["lagrange"], [[-gap, -gap ** 2]], rtol=1e-5)
  w = dam.logit_weights(dam.toeplitz_index(12), 12)
  g_ref = jax.grad(lambda a: (lambda d: 0.7 * (d - t) + 1.3 * (d - t) ** 2)(
      dam.expected_density(a, w)))(params["logits"]["shared"])
  np.testing.assert_allclose(g["logits"]["shared"], g_ref, rtol=1e-5, atol=1e-9)


def test_lagrangian_target_moves_density_to_the_target_on_average():
  st = _build(n=16, target_density=0.1, target_warmup_steps=100)
  params, d = _fit_penalty(st, 400)
  assert abs(d[0] - 0.5) < 0.01
  assert abs(d[200:].mean() - 0.1) < 0.05  # It circles the target (dual ascent).
  assert float(params["lagrange"][0, 1]) > 0  # mu2 only grows (gap^2 >= 0).


# ---------------------------------------------------------------- config

def test_official_preset_is_the_released_code():
  c = dam.PRESETS["dam_s_official"]()
  assert (c.method, c.share, c.per_head, c.asymmetric, c.block_size, c.relaxation,
          c.temperature, c.penalty, c.stochastic_eval) == (
              "dam_s", "all_layers", True, False, 0, "hard", 1.0, "l1_sum", True)
  st = dam.dam_s(c, TINY, 8)
  assert st.init(jax.random.key(0))["logits"]["shared"].shape == (4, 8)


@pytest.mark.parametrize("overrides, message", [
    ({"lam": -1.0}, "lam must be"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature_final": 0.5}, "anneal_steps"),
    ({"target_density": 1.5}, "target_density must be"),
    ({"target_density": 0.0}, "target_density must be"),
    ({"method": "dam_x"}, "method='dam_x'"),
    ({"relaxation": "sharp"}, "relaxation='sharp'"),
    ({"penalty": "l2"}, "penalty='l2'"),
    ({"eval_rule": "argmax"}, "eval_rule='argmax'"),
    ({"eval_rule": "topk"}, "needs target_density"),
    ({"layers": [5]}, "outside [0, 2)"),
    ({"layers": []}, "non-empty"),
    ({"temprature": 2.0}, "Did you mean ['temperature'"),
    ({"symmetric": True}, "symmetric"),
    ({"block_size": 13}, "exceeds seq_len"),
    ({"block_size": -1}, "integer >= 0"),
    ({"per_head": 1}, "True or False"),
])
def test_bad_config_raises_clearly(overrides, message):
  with pytest.raises(ValueError, match=None) as e:
    _build(n=12, **overrides)
  assert message in str(e.value), str(e.value)


def test_bad_structure_combinations_raise():
  with pytest.raises(ValueError, match="built by the 'dam_u' factory"):
    dam.dam_u({"method": "dam_s"}, TINY, 8)
  ragged = model_lib.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                heads_per_layer=(4, 2))
  with pytest.raises(ValueError, match="equal head counts"):
    dam.dam_s({}, ragged, 8)
  st = dam.dam_s({"share": "per_layer"}, ragged, 8)  # Ragged heads: one mask per layer.
  s = _sample(st, st.init(jax.random.key(0)), jax.random.key(1), jnp.asarray(0), True)
  assert s.masks[0].shape == (4, 8, 8) and s.masks[1].shape == (2, 8, 8)
  pruned = model_lib.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                heads_per_layer=(4, 0))
  with pytest.raises(ValueError, match="no attention sublayer"):
    dam.dam_s({"layers": [1]}, pruned, 8)
  st = dam.dam_s({}, pruned, 8)
  s = _sample(st, st.init(jax.random.key(0)), jax.random.key(1), 0, True)
  assert s.masks[0].shape == (4, 8, 8) and s.masks[1] is None
  with pytest.raises(ValueError, match="topk"):
    dam.binarize(jnp.zeros((1, 3)), "topk")

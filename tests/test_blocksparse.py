"""The block-sparse executor equals the dense reference: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _require
from sparse_attn import attention
from sparse_attn import blocksparse
from sparse_attn.attention.kernels.blocksparse import executor
from sparse_attn import model as model_lib
from sparse_attn.masks import patterns

B, L, H, D = 2, 50, 3, 8


def _qkv(seed=0, b=B, q_len=L, k_len=L):
  rng = np.random.default_rng(seed)
  mk = lambda n: jnp.asarray(rng.standard_normal((b, n, H, D)), jnp.float32)
  return mk(q_len), mk(k_len), mk(k_len), mk(q_len)


@pytest.fixture(params=["xla", "kernel"])
def impl(request, monkeypatch):
  """Runs a test with the pure-JAX executor and with the compiled CPU kernel."""
  if request.param == "xla":
    monkeypatch.setenv("SPARSE_ATTN_CPU_KERNEL", "0")
  else:
    monkeypatch.delenv("SPARSE_ATTN_CPU_KERNEL", raising=False)
    _require.cpu_kernel()   # Skips; fails under CI=true.
  return request.param


def _check(mask, impl, block_size=16, key_valid=None, seed=0, **plan_options):
  """Forward and q/k/v gradients of 'blocksparse' (executed by `impl`) vs 'dense'."""
  q, k, v, w = _qkv(seed, k_len=mask.shape[-1], q_len=mask.shape[-2])
  obj = blocksparse.BlockSparseMask.from_mask(mask, block_size, **plan_options)

  def loss(q, k, v, m, backend):
    out = attention.dot_product_attention(q, k, v, mask=m, key_valid=key_valid,
                                          backend=backend)
    return jnp.sum(out * w), out

  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  (gd, od) = grad(q, k, v, jnp.asarray(mask), "dense")
  step = jax.jit(grad, static_argnums=4)
  (gs, os_) = step(q, k, v, obj, "blocksparse")
  # The kernel ran iff asked for (its custom calls are in the compiled step).
  hlo = step.lower(q, k, v, obj, "blocksparse").as_text()
  assert ("sparse_attn_blocksparse_bwd" in hlo) == (impl == "kernel")
  np.testing.assert_allclose(os_, od, atol=2e-6)
  for a, b in zip(gs, gd):
    np.testing.assert_allclose(a, b, atol=5e-6)
  # The dense executor on the object is the reference itself.
  np.testing.assert_allclose(
      attention.dot_product_attention(q, k, v, mask=obj, key_valid=key_valid,
                                      backend="dense"), od, atol=1e-6)
  return obj, os_


def _kv(lengths):
  return jnp.asarray(np.arange(L)[None, :] < np.asarray(lengths)[:, None])


def test_band_uses_offset_slots_only(impl):
  obj, _ = _check(patterns.window(L, 7), impl)
  assert [g.kind for g in obj.plan.groups] == ["offset"] * 3


@pytest.mark.parametrize("stack", [False, True])
def test_band_with_key_padding(stack, impl):
  _check(patterns.window(L, 9), impl, key_valid=_kv([40, 13]), stack_offsets=stack)


def test_random_per_head_layout_with_fully_masked_rows(impl):
  mask = np.random.default_rng(1).random((H, L, L)) < 0.1
  mask[:, 5] = False              # Row 5 attends nothing (static).
  _, out = _check(mask, impl, key_valid=_kv([L, 30]))
  assert np.all(np.asarray(out)[:, 5] == 0)


def test_rows_emptied_by_padding_are_zero(impl):
  mask = patterns.window(L, 2)
  kv = jnp.asarray(np.tile(np.arange(L) < 20, (B, 1)))   # Queries >= 23 see only padding.
  _, out = _check(mask, impl, key_valid=kv)
  assert np.all(np.asarray(out)[:, 23:] == 0)


def test_per_example_layout_and_gathered_slots(impl):
  mask = np.random.default_rng(2).random((B, 1, L, L)) < 0.08
  obj, _ = _check(mask, impl, key_valid=_kv([L, 41]), min_fill=1.01)   # Forces gathers.
  assert [g.kind for g in obj.plan.groups] == ["gather"]


def test_mixed_offset_and_gathered_slots(impl):
  mask = patterns.union(patterns.window(L, 4), patterns.global_tokens(L, 2))
  mask = np.broadcast_to(mask, (H, L, L)).copy()
  mask[1, 30:40, 0:10] = True     # One head has an extra off-band patch.
  obj, _ = _check(mask, impl, key_valid=_kv([L, 33]), min_fill=0.9)
  assert {g.kind for g in obj.plan.groups} == {"offset", "gather"}


@pytest.mark.parametrize("q_len,k_len", [(33, 50), (50, 21)])
def test_cross_attention_lengths(q_len, k_len, impl):
  mask = np.random.default_rng(3).random((q_len, k_len)) < 0.3
  _check(mask, impl, block_size=8)


def test_empty_and_full_masks(impl):
  _, out = _check(np.zeros((L, L), bool), impl)
  assert not np.asarray(out).any()
  obj, _ = _check(np.ones((L, L), bool), impl, key_valid=_kv([L, 17]))
  assert obj.layout.block_density == 1.0


def test_block_size_larger_than_sequence(impl):
  _check(patterns.window(L, 3), impl, block_size=64)


@pytest.mark.slow
def test_dropout_gradients_are_consistent_and_mean_matches():
  """The pure-JAX executor's dropout (the kernel's: tests/test_cpu_kernel.py).
  (slow: ~20 s of compiles.)"""
  q, k, v, _ = _qkv(4, b=1, q_len=16, k_len=16)
  obj = blocksparse.BlockSparseMask.from_mask(patterns.window(16, 3), 4)
  rng = jax.random.PRNGKey(0)
  f = jax.jit(lambda q, k, v: blocksparse.attend(obj.plan, q, k, v, dropout_rng=rng,
                                                  dropout_rate=0.3, impl="xla"))
  # The custom VJP under dropout agrees with a central difference along a direction.
  dirs = _qkv(9, b=1, q_len=16, k_len=16)[:3]
  obj_fn = lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
  grads = jax.grad(obj_fn, argnums=(0, 1, 2))(q, k, v)
  eps = 1e-2
  plus = obj_fn(*(x + eps * d for x, d in zip((q, k, v), dirs)))
  minus = obj_fn(*(x - eps * d for x, d in zip((q, k, v), dirs)))
  directional = sum(jnp.vdot(g, d) for g, d in zip(grads, dirs))
  np.testing.assert_allclose((plus - minus) / (2 * eps), directional, rtol=2e-2)
  assert not np.allclose(f(q, k, v), blocksparse.attend(obj.plan, q, k, v))
  many = jax.jit(jax.vmap(lambda r: blocksparse.attend(obj.plan, q, k, v, dropout_rng=r,
                                                       dropout_rate=0.3, impl="xla")))(
      jax.random.split(rng, 500))
  np.testing.assert_allclose(many.mean(0), blocksparse.attend(obj.plan, q, k, v), atol=0.1)


def test_model_with_block_sparse_mask_equals_array_mask():
  cfg = model_lib.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=64, attention_backend="blocksparse")
  ids = jnp.asarray(np.random.default_rng(5).integers(1, 50, (2, 40)))
  pad = jnp.asarray(np.arange(40)[None, :] < np.array([[40], [25]]))
  mask = patterns.window(40, 5)
  obj = blocksparse.BlockSparseMask.from_mask(mask, 8)
  net = model_lib.BertModel(cfg)
  params = net.init(jax.random.PRNGKey(0), ids)["params"]
  run = jax.jit(lambda p, m: net.apply({"params": p}, ids, pad, masks=(None, m)))
  h_obj, aux_obj = run(params, obj)
  dense_net = model_lib.BertModel(cfg.__class__(**{**cfg.__dict__,
                                                   "attention_backend": "dense"}))
  h_arr, aux_arr = dense_net.apply({"params": params}, ids, pad,
                                   masks=(None, jnp.asarray(mask)))
  np.testing.assert_allclose(h_obj, h_arr, atol=2e-5)
  np.testing.assert_allclose(aux_obj["density"], aux_arr["density"], atol=1e-6)


def test_mask_object_is_a_pytree_and_a_bool_leaf():
  obj = blocksparse.BlockSparseMask.from_mask(np.random.default_rng(6).random((2, 20, 20))
                                              < 0.3, 8)
  leaves, tree = jax.tree_util.tree_flatten(obj)
  back = jax.tree_util.tree_unflatten(tree, leaves)
  assert back.plan == obj.plan and back.preferred == obj.preferred
  assert obj.shape == (1, 2, 20, 20) and obj.dtype == np.bool_ and obj.ndim == 4


def test_density_matches_model_definition():
  mask = np.random.default_rng(7).random((H, L, L)) < 0.2
  obj = blocksparse.BlockSparseMask.from_mask(mask, 16)
  valid = _kv([L, 31])
  np.testing.assert_allclose(obj.density(valid),
                             model_lib.mask_density(jnp.asarray(mask), valid), atol=1e-6)


def test_unsupported_inputs_raise_helpful_errors():
  q, k, v, _ = _qkv()
  obj = blocksparse.BlockSparseMask.from_mask(patterns.window(L, 3), 16)
  with pytest.raises(ValueError, match="bias"):
    attention.dot_product_attention(q, k, v, jnp.zeros((L, L)), mask=obj,
                                    backend="blocksparse")
  with pytest.raises(ValueError, match="BlockSparseMask"):
    attention.dot_product_attention(q, k, v, mask=jnp.asarray(patterns.window(L, 3)),
                                    backend="blocksparse")
  with pytest.raises(ValueError, match="bool"):
    blocksparse.BlockSparseMask.from_mask(np.full((L, L), 0.5, np.float32), 16)
  with pytest.raises(ValueError, match="Q=50"):
    attention.dot_product_attention(q[:, :20], k, v, mask=obj, backend="blocksparse")
  # Dense layers (mask None) under backend='blocksparse' run the reference.
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, backend="blocksparse"),
                             attention.dot_product_attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("head_loop, per_step, loops", [
    (False, 2, None), (True, 2, None), (True, 1, 1), (True, 1, 2), (True, 2, 2),
    (True, 1, 3)])  # H = 3: one head per loop.
def test_head_loop_on_and_off_agree_with_dense(head_loop, per_step, loops):
  mask = np.random.default_rng(8).random((H, L, L)) < 0.15    # Per-head layout.
  q, k, v, w = _qkv(8)
  obj = blocksparse.BlockSparseMask.from_mask(mask, 16)
  kv = _kv([L, 36])
  f = lambda q, k, v: jnp.sum(blocksparse.attend(
      obj.plan, q, k, v, key_valid=kv, head_loop=head_loop, heads_per_step=per_step,
      loops=loops, impl="xla") * w)
  ref = lambda q, k, v: jnp.sum(attention.dot_product_attention(
      q, k, v, mask=jnp.asarray(mask), key_valid=kv) * w)
  np.testing.assert_allclose(f(q, k, v), ref(q, k, v), rtol=1e-5)
  for a, b in zip(jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=5e-6)


@pytest.mark.parametrize("per_head_layout", [False, True])
def test_several_loops_of_several_steps_match_one_loop_with_dropout(per_head_layout):
  """H = 8 split as 2 loops x 2 steps x 2 heads: same numbers (and the same dropout draws,
  keyed by the global head index) as one loop, forward and backward."""
  h = 8
  rng = np.random.default_rng(3)
  q, k, v, w = (jnp.asarray(rng.standard_normal((1, L, h, D)), jnp.float32)
                for _ in range(4))
  shape = (h, L, L) if per_head_layout else (L, L)
  obj = blocksparse.BlockSparseMask.from_mask(rng.random(shape) < 0.2, 16)
  kv = _kv([44])
  key = jax.random.key(7)

  def f(loops):
    return lambda q, k, v: jnp.sum(blocksparse.attend(
        obj.plan, q, k, v, key_valid=kv, head_loop=True, heads_per_step=2, loops=loops,
        dropout_rng=key, dropout_rate=0.3, impl="xla") * w)

  np.testing.assert_allclose(jax.jit(f(2))(q, k, v), jax.jit(f(1))(q, k, v), rtol=1e-6)
  for a, b in zip(jax.jit(jax.grad(f(2), (0, 1, 2)))(q, k, v),
                  jax.jit(jax.grad(f(1), (0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Without dropout, also equal to the dense reference.
  g = lambda q, k, v: blocksparse.attend(obj.plan, q, k, v, key_valid=kv, loops=2,
                                         heads_per_step=2, impl="xla")
  mask = obj.element_mask()
  np.testing.assert_allclose(g(q, k, v), attention.dot_product_attention(
      q, k, v, mask=mask, key_valid=kv), atol=1e-5)


def test_bad_number_of_loops():
  with pytest.raises(ValueError, match="loops must be >= 1"):
    executor._num_loops(-1, 4)


def test_number_of_head_loops():
  assert executor._num_loops(2, 4) == 2 and executor._num_loops(3, 4) == 2
  assert executor._num_loops(8, 6) == 6 and executor._num_loops(5, 5) == 5
  assert executor._num_loops(1, 4) == 1 and executor._num_loops(None, 1) == 1

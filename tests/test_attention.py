"""Tests of the attention seam: masks, padding, fully masked rows, gradients, signature."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import attention

B, L, H, D = 2, 7, 3, 4


def _qkv(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(k, (B, L, H, D)) for k in ks]


def _reference(q, k, v, keep=None, scale=None):
  """Plain numpy masked softmax, row by row, float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros((B, L, H, D))
  for b in range(B):
    for h in range(H):
      for i in range(L):
        s = np.array([q[b, i, h] @ k[b, j, h] / np.sqrt(D) for j in range(L)])
        w = np.exp(s - s.max())
        if keep is not None:
          w = w * keep[b, h, i]
        if scale is not None:
          w = w * scale[b, h, i]
        z = w.sum()
        out[b, i, h] = (w / z) @ v[b, :, h] if z > 0 else 0.0
  return out


def test_dense_matches_flax_and_numpy():
  q, k, v = _qkv()
  ours = attention.dot_product_attention(q, k, v)
  ref = nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  np.testing.assert_allclose(ours, _reference(q, k, v), atol=1e-5)


@pytest.mark.parametrize("shape", [(L, L), (H, L, L), (B, 1, L, L), (1, H, L, L), (B, H, L, L)])
def test_bool_mask_shapes(shape):
  q, k, v = _qkv(1)
  mask = np.random.default_rng(0).random(shape) < 0.5
  out = attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
  keep = np.broadcast_to(mask.reshape((1,) * (4 - mask.ndim) + mask.shape), (B, H, L, L))
  np.testing.assert_allclose(out, _reference(q, k, v, keep=keep), atol=1e-5)


def test_float_mask_is_papers_masked_softmax_and_equals_bool_at_01():
  q, k, v = _qkv(2)
  rng = np.random.default_rng(1)
  m = rng.random((H, L, L)).astype(np.float32)
  out = attention.dot_product_attention(q, k, v, mask=jnp.asarray(m))
  np.testing.assert_allclose(out, _reference(q, k, v, scale=np.broadcast_to(m, (B, H, L, L))),
                             atol=1e-5)
  hard = rng.random((H, L, L)) < 0.5
  a = attention.dot_product_attention(q, k, v, mask=jnp.asarray(hard))
  b = attention.dot_product_attention(q, k, v, mask=jnp.asarray(hard, jnp.float32))
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_changing_the_mask_changes_the_output_through_linen():
  """linen drops keywords a custom attention_fn does not name: prove ours are used."""
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, H * D))
  mha = nn.MultiHeadDotProductAttention(num_heads=H, attention_fn=attention.dot_product_attention)
  params = mha.init(jax.random.PRNGKey(1), x)
  full = mha.apply(params, x, mask=jnp.ones((L, L), bool))
  band = mha.apply(params, x, mask=jnp.abs(jnp.arange(L)[:, None] - jnp.arange(L)) <= 1)
  assert float(jnp.max(jnp.abs(full - band))) > 1e-3


def test_padding_and_fully_masked_rows_never_nan_and_zero():
  q, k, v = _qkv(3)
  key_valid = jnp.array([[True] * L, [True] * 3 + [False] * (L - 3)])
  mask = np.ones((L, L), bool)
  mask[2] = False  # Query 2 may attend to nothing.
  out = attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask), key_valid=key_valid)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(out[:, 2], 0.0)
  keep = np.broadcast_to(mask, (B, H, L, L)) & np.asarray(key_valid)[:, None, None, :]
  np.testing.assert_allclose(out, _reference(q, k, v, keep=keep), atol=1e-5)
  # Gradient of a fully masked row is finite too.
  g = jax.grad(lambda q: jnp.sum(attention.dot_product_attention(
      q, k, v, mask=jnp.zeros((L, L), bool))))(q)
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) == 0.0


def test_masked_positions_get_exactly_zero_weight_and_gradient():
  """nanodo-style: perturbing a masked key/value never changes the output; its gradient is 0."""
  q, k, v = _qkv(4)
  mask = np.tril(np.ones((L, L), bool))  # Causal: query i sees keys <= i.
  f = lambda k, v: attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
  for i in range(L):
    gk, gv = jax.grad(lambda k, v: jnp.sum(f(k, v)[:, i]), argnums=(0, 1))(k, v)
    assert float(jnp.abs(gk[:, i + 1:]).max(initial=0.0)) == 0.0
    assert float(jnp.abs(gv[:, i + 1:]).max(initial=0.0)) == 0.0
    assert float(jnp.abs(gv[:, :i + 1]).max()) > 0.0


def test_float_mask_receives_gradient_even_where_zero():
  q, k, v = _qkv(5)
  m = jnp.asarray(np.random.default_rng(2).random((H, L, L)) < 0.5, jnp.float32)
  g = jax.grad(lambda m: jnp.sum(attention.dot_product_attention(q, k, v, mask=m) ** 2))(m)
  assert np.isfinite(np.asarray(g)).all()
  assert float(jnp.abs(jnp.where(m == 0, g, 0)).max()) > 0


def test_bad_mask_shape_and_dtype_and_backend_errors():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="cannot broadcast"):
    attention.dot_product_attention(q, k, v, mask=jnp.ones((L + 1, L), bool))
  with pytest.raises(ValueError, match="cannot broadcast"):
    attention.dot_product_attention(q, k, v, mask=jnp.ones((B, L, L), bool))
  with pytest.raises(ValueError, match="neither bool"):
    attention.dot_product_attention(q, k, v, mask=jnp.ones((L, L), jnp.int32))
  with pytest.raises(ValueError, match="Unknown attention backend"):
    attention.dot_product_attention(q, k, v, backend="nope")


def test_bfloat16_inputs_softmax_in_float32():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(6))
  out = attention.dot_product_attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             _reference(*(np.asarray(x, np.float32) for x in (q, k, v))),
                             atol=3e-2)


def test_float_mask_gradients_stay_finite_when_kept_scores_are_tiny():
  """Kept entries far below a dropped entry's score: no underflow, no NaN gradient."""
  q, k, v = _qkv(7)
  k = k.at[:, 0].mul(60.0)  # Key 0 dominates every row...
  m = jnp.ones((H, L, L)).at[:, :, 0].set(0.0)  # ...but is dropped.
  m = m.at[:, 3].set(0.0)  # And query 3 keeps nothing at all.
  f = lambda q, k, m: jnp.sum(attention.dot_product_attention(q, k, v, mask=m) ** 2)
  grads = jax.grad(f, argnums=(0, 1, 2))(q, k, m)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  out = attention.dot_product_attention(q, k, v, mask=m)
  keep = np.broadcast_to(np.asarray(m, bool), (B, H, L, L))
  np.testing.assert_allclose(out, _reference(q, k, v, keep=keep), atol=1e-5)

"""The contract every registered attention executor keeps: it equals the dense reference.

Parametrised over `attention.BACKENDS` as it stands when the tests are collected, so a new
executor is checked by registering it. Each one runs a block-sparse mask object (per-head
layout, a fully masked row, key padding), directly and through 'auto' with the object's
`preferred` executor set to it, forward and gradients, and a layer without a mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import attention
from sparse_attn.masks import patterns

B, L, H, D, BLOCK = 2, 64, 2, 8, 16
NAMES = sorted(attention.BACKENDS)


def _inputs():
  rng = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
                for _ in range(4))
  band = patterns.window(L, 6)
  band[9] = False                                            # A fully masked row.
  mask = np.stack([band, rng.random((L, L)) < 0.1])          # [H, L, L], per head.
  kv = jnp.asarray(np.arange(L)[None, :] < np.array([[L], [41]]))
  return q, k, v, w, mask, kv


def _loss_and_grads(backend, mask, q, k, v, w, kv):
  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, mask=mask, key_valid=kv,
                                          backend=backend)
    return jnp.sum(out * w), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def test_the_registry_holds_the_documented_executors():
  assert {"dense", "blocksparse", "splash", "cudnn"} <= set(NAMES)


# 'auto' runs an object's `preferred` executor, which is never the reference.
CASES = [(n, False) for n in NAMES] + [(n, True) for n in NAMES if n != "dense"]


@pytest.mark.parametrize("name, via_auto", CASES,
                         ids=[f"{n}-{'auto' if a else 'direct'}" for n, a in CASES])
def test_executor_equals_dense_on_a_block_sparse_mask(name, via_auto):
  q, k, v, w, mask, kv = _inputs()
  ref_out, ref_grads = _loss_and_grads("dense", jnp.asarray(mask), q, k, v, w, kv)
  obj = attention.BlockSparseMask.from_mask(
      mask, BLOCK, preferred=name if name != "dense" else "blocksparse")
  backend = "auto" if via_auto else name
  out, grads = _loss_and_grads(backend, obj, q, k, v, w, kv)
  np.testing.assert_allclose(out, ref_out, atol=2e-6)
  assert not np.asarray(out)[:, 9, 0].any()                 # The masked row is exactly 0.
  for g, e in zip(grads, ref_grads):
    np.testing.assert_allclose(g, e, atol=5e-6)


@pytest.mark.parametrize("name", NAMES)
def test_executor_runs_a_layer_without_a_mask_as_dense(name):
  q, k, v, w, _, kv = _inputs()
  ref_out, ref_grads = _loss_and_grads("dense", None, q, k, v, w, kv)
  out, grads = _loss_and_grads(name, None, q, k, v, w, kv)
  np.testing.assert_allclose(out, ref_out, atol=1e-6)
  for g, e in zip(grads, ref_grads):
    np.testing.assert_allclose(g, e, atol=1e-6)


def test_resolve_names_the_executor_auto_runs():
  q, _, _, _, mask, _ = _inputs()
  obj = attention.BlockSparseMask.from_mask(mask, BLOCK, preferred="splash")
  assert attention.resolve("auto", obj, q) == "splash"
  assert attention.resolve("blocksparse", obj, q) == "blocksparse"
  assert attention.resolve("auto", jnp.asarray(mask), q) == "dense"   # Arrays, on CPU.
  assert attention.resolve("auto", None, q) == "dense"
  with pytest.raises(ValueError, match="cannot be registered"):
    attention.register_backend("auto")
  bogus = attention.BlockSparseMask.from_mask(mask, BLOCK, preferred="bogus")
  with pytest.raises(ValueError, match="Unknown executor 'bogus'"):
    attention.dot_product_attention(q, q, q, mask=bogus, backend="auto")

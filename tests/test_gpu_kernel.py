"""The Pallas GPU block-sparse kernel equals the dense reference (interpreted off GPU).

Forward and q/k/v gradients for every layout kind the executors serve (offset and
gathered slots, per-head and per-example layouts, partial tiles with element masks, full
tiles, key padding, fully masked rows), in float32 and bfloat16; its dropout; and the
lowering of forward + backward for CUDA on this host (`jax.export`), through the
'blocksparse' executor, which is what a CUDA GPU runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import attention
from sparse_attn.attention import policy
from sparse_attn.attention.kernels import gpu
from sparse_attn.attention.kernels.blocksparse import executor
from sparse_attn.masks import layout as layout_lib
from sparse_attn.masks import patterns

B, L, H, D, BLOCK = 2, 64, 2, 16, 16
TRITON = gpu.CUSTOM_CALL


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
  """Off a CUDA GPU the kernel runs in Pallas's interpreter; on one, compiled."""
  if jax.default_backend() != "gpu":
    monkeypatch.setenv("SPARSE_ATTN_GPU_INTERPRET", "1")


def _qkvw(dtype, length=L, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((B, length, H, D)), dtype) for _ in range(4))


def _masks(length=L):
  """Name -> (bool mask, key_valid or None, plan group kinds it exercises)."""
  rng = np.random.default_rng(1)
  band = patterns.window(length, 20) | patterns.global_tokens(length, 2)
  nb = -(-length // BLOCK)
  blocks = rng.random((nb, nb)) < 0.4
  block_random = np.kron(blocks, np.ones((BLOCK, BLOCK), bool))[:length, :length]
  per_head = np.stack([patterns.window(length, 6), rng.random((length, length)) < 0.2])
  per_example = np.stack([patterns.window(length, 10),
                          patterns.random(length, 9, seed=3)])[:, None]
  padded = patterns.window(length, 6)
  padded[9] = False                                      # A fully masked row.
  kv = jnp.asarray(np.arange(length)[None, :] < np.array([[length], [41]]))
  return {"offset": (band, None), "gather_full_tiles": (block_random, None),
          "per_head_partial": (per_head, None), "per_example": (per_example, None),
          "padding_empty_rows": (padded, kv)}


def _loss_grads(fn, q, k, v, w):
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _dense(mask, kv):
  return lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask=jnp.asarray(mask), key_valid=kv, backend="dense")


def _kernel(mask, kv, plan_options=None, **kw):
  obj = attention.BlockSparseMask.from_mask(mask, BLOCK, **(plan_options or {}))
  return obj, jax.jit(lambda q, k, v: executor.attend(obj.plan, q, k, v, key_valid=kv,
                                                      impl="gpu", **kw))


CASES = [(name, jnp.float32) for name in _masks()] + [
    ("offset", jnp.bfloat16), ("per_head_partial", jnp.bfloat16),
    ("padding_empty_rows", jnp.bfloat16)]


@pytest.mark.parametrize("name, dtype", CASES,
                         ids=[f"{n}-{jnp.dtype(d).name}" for n, d in CASES])
def test_kernel_equals_dense_forward_and_gradients(name, dtype):
  length = 60 if name == "per_example" else L            # Also a ragged last block.
  mask, kv = _masks(length)[name]
  q, k, v, w = _qkvw(dtype, length)
  ref_out, ref_grads = _loss_grads(_dense(mask, kv), *(x.astype(jnp.float32) for x in
                                                        (q, k, v)), w)
  # min_fill > 1: the executors' plan puts every tile in gathered slots.
  obj, fn = _kernel(mask, kv, {"min_fill": 1.1} if name == "gather_full_tiles" else None)
  kinds = {g.kind for g in obj.plan.groups}
  assert {"offset": "offset" in kinds, "gather_full_tiles": kinds == {"gather"}}.get(
      name, True)
  out, grads = _loss_grads(fn, q, k, v, w)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=tol, rtol=tol)
  for g, e in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), e, atol=5 * tol, rtol=tol)


def test_the_layouts_cover_partial_and_full_tiles():
  masks = _masks()
  lay = lambda n: layout_lib.from_mask(masks[n][0], BLOCK)
  assert len(lay("gather_full_tiles").partial_blocks) == 0     # Full tiles, no masks.
  assert np.any(lay("offset").block_mask == layout_lib.FULL)
  assert len(lay("per_head_partial").partial_blocks) > 0
  assert lay("per_head_partial").block_mask.shape[:2] == (1, H)
  assert layout_lib.from_mask(_masks(60)["per_example"][0], BLOCK).block_mask.shape[:2] == (
      B, 1)


def test_fully_masked_rows_and_padding_keys_get_exact_zeros():
  mask, kv = _masks()["padding_empty_rows"]
  q, k, v, w = _qkvw(jnp.float32)
  _, fn = _kernel(mask, kv)
  out, (dq, dk, dv) = _loss_grads(fn, q, k, v, w)
  assert not np.asarray(out)[:, 9].any() and not np.asarray(dq)[:, 9].any()
  assert np.isfinite(np.asarray(out)).all()
  assert not np.asarray(dk)[1, 41:].any() and not np.asarray(dv)[1, 41:].any()


def test_tables_list_each_tile_once_both_ways():
  mask = _masks()["per_head_partial"][0]
  lay = layout_lib.from_mask(mask, BLOCK)
  tab = gpu.tables(lay)
  on = lay.block_mask != layout_lib.EMPTY
  nq, nk = lay.num_q_blocks, lay.num_k_blocks
  qn, qc, qp = tab["q"]
  kn, kr, kp = tab["k"]
  for h in range(H):
    for i in range(nq):
      r = h * nq + i
      cols = qc[r * tab["c"]:r * tab["c"] + qn[r]]
      assert list(cols) == list(np.flatnonzero(on[0, h, i]))
      assert list(qp[r * tab["c"]:r * tab["c"] + qn[r]]) == list(
          lay.partial_index[0, h, i, cols])
    for j in range(nk):
      r = h * nk + j
      rows = kr[r * tab["ct"]:r * tab["ct"] + kn[r]]
      assert list(rows) == list(np.flatnonzero(on[0, h, :, j]))
      assert list(kp[r * tab["ct"]:r * tab["ct"] + kn[r]]) == list(
          lay.partial_index[0, h, rows, j])


# ---- dropout ---------------------------------------------------------------------------

def test_dropout_rate_zero_equals_no_dropout():
  mask, _ = _masks()["offset"]
  q, k, v, _ = _qkvw(jnp.float32)
  _, plain = _kernel(mask, None)
  _, zero = _kernel(mask, None, dropout_rng=jax.random.key(0), dropout_rate=0.0)
  np.testing.assert_array_equal(zero(q, k, v), plain(q, k, v))


def test_dropout_preserves_the_mean_and_drops_at_the_rate():
  mask, _ = _masks()["offset"]
  rate = 0.25
  q = jnp.zeros((B, L, H, D), jnp.float32)        # Uniform weights over each row's keys.
  v = jnp.ones((B, L, H, D), jnp.float32)
  _, fn = _kernel(mask, None, dropout_rng=jax.random.key(0), dropout_rate=rate)
  out = np.asarray(fn(q, q, v))
  assert abs(out.mean() - 1.0) < 0.02             # E[keep / (1 - rate)] = 1.
  # One key alone per value channel: the kept fraction of the weights is 1 - rate.
  v1 = jnp.asarray(np.eye(L)[None, :, None, :D].repeat(B, 0).repeat(H, 2), jnp.float32)
  kept = np.asarray(fn(q, q, v1))[:, :D] * (1 - rate)      # [B, query, H, key], first D.
  allowed = layout_lib.from_mask(mask, BLOCK).to_element_mask()[0, 0]
  weights = (allowed / allowed.sum(-1, keepdims=True))[:D, :D]
  on = np.broadcast_to(allowed[None, :D, None, :D], kept.shape)
  frac = (kept > 0).sum() / on.sum()
  assert abs(frac - (1 - rate)) < 0.05
  assert not kept[~on].any()
  np.testing.assert_allclose(kept[kept > 0], np.broadcast_to(
      weights[None, :, None], kept.shape)[kept > 0], rtol=1e-5)


def test_dropout_gradients_use_the_forward_pattern():
  mask, kv = _masks()["padding_empty_rows"]
  q, k, v, w = _qkvw(jnp.float32)
  _, fn = _kernel(mask, kv, dropout_rng=jax.random.key(3), dropout_rate=0.2)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  # The loss is linear in v: <dL/dv, v> = L exactly when both passes drop the same weights.
  np.testing.assert_allclose(jnp.vdot(grads[2], v), loss(q, k, v), rtol=1e-4)
  rng = np.random.default_rng(5)
  eps = 1e-2
  for i in (0, 1):                                  # Directional derivatives in q and k.
    t = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    args = [q, k, v]
    up = list(args); up[i] = args[i] + eps * t
    dn = list(args); dn[i] = args[i] - eps * t
    fd = (loss(*up) - loss(*dn)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grads[i], t), fd, rtol=2e-3, atol=2e-3)


# ---- CUDA lowering and executor wiring -------------------------------------------------

def _export_cuda(fn, *args):
  return jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower_for_cuda_through_the_executor(dtype, monkeypatch):
  monkeypatch.delenv("SPARSE_ATTN_GPU_INTERPRET", raising=False)
  mask, kv = _masks()["padding_empty_rows"]
  obj = attention.BlockSparseMask.from_mask(mask, BLOCK)
  x = jax.ShapeDtypeStruct((B, L, H, D), dtype)

  def step(q, k, v, kv, rng):
    def loss(q, k, v):
      out = attention.dot_product_attention(q, k, v, mask=obj, key_valid=kv,
                                            dropout_rng=rng, dropout_rate=0.1,
                                            backend="blocksparse")
      return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  exp = _export_cuda(step, x, x, x, jax.ShapeDtypeStruct((B, L), jnp.bool_),
                     jax.random.key(0))
  text = exp.mlir_module()
  for name in ("blocksparse_attention_fwd", "blocksparse_attention_dq",
               "blocksparse_attention_dkv"):
    assert f'name = "{name}"' in text
  assert text.count(TRITON) == 3


def test_outside_its_scope_the_executor_runs_pure_jax_with_the_reason(monkeypatch):
  mask, _ = _masks()["offset"]
  obj = attention.BlockSparseMask.from_mask(mask, BLOCK)
  q = jnp.zeros((B, L, H, 8), jnp.bfloat16)               # Head size 8: too small.
  why = executor.gpu_unsupported(obj.layout, q)
  assert "head size" in why
  with pytest.raises(ValueError, match="head size"):
    executor.attend(obj.plan, q, q, q, impl="gpu")
  f = lambda q: attention.dot_product_attention(q, q, q, mask=obj, backend="blocksparse")
  assert TRITON not in _export_cuda(f, q).mlir_module()
  monkeypatch.setenv("SPARSE_ATTN_GPU_KERNEL", "0")
  assert "SPARSE_ATTN_GPU_KERNEL" in executor.gpu_unsupported(
      obj.layout, jnp.zeros((B, L, H, D), jnp.bfloat16))


# ---- policy ----------------------------------------------------------------------------

def test_the_gpu_policy_uses_the_kernel_cost_model_where_the_kernel_runs(monkeypatch):
  n = 4096
  band_global = patterns.union(patterns.window(n, 128), patterns.global_tokens(n, 2))
  c, lay = attention.choose(band_global, platform_name="gpu", dtype=jnp.bfloat16,
                            head_dim=64)
  assert c.executor == "blocksparse" and lay is not None
  cm = attention.COST_MODELS["gpu_kernel"]
  slots = float(np.mean(np.sum(lay.block_mask != layout_lib.EMPTY, -1)))
  assert c.predicted_speedup == pytest.approx(
      cm.speedup(lay.num_k_blocks, slots, c.block_size))
  # Nearly dense: the kernel cannot pay, dense runs.
  c, lay = attention.choose(patterns.window(n, 3000), platform_name="gpu",
                            dtype=jnp.float32, head_dim=64)
  assert c.executor == "dense" and lay is None
  # A head size outside the kernel's scope, or the kernel turned off: the pure-JAX table.
  gpu_xla = attention.COST_MODELS["gpu"]
  assert policy._cost_model("gpu", jnp.bfloat16, 8) is gpu_xla
  monkeypatch.setenv("SPARSE_ATTN_GPU_KERNEL", "0")
  assert policy._cost_model("gpu", jnp.bfloat16, 64) is gpu_xla

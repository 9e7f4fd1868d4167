"""Executor choice (platform injected), Splash adapter in interpret mode, fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import accel
from sparse_attn import attention
from sparse_attn import blocksparse
from sparse_attn import cpu_kernel
from sparse_attn.masks import patterns


def _qkv(b, length, h, d, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32)
          for _ in range(4)]


def test_splash_adapter_matches_dense_in_interpret_mode():
  b, length, h, d = 2, 200, 2, 16
  q, k, v, w = _qkv(b, length, h, d)
  band = patterns.window(length, 20)
  band[5] = False                                          # A fully masked row.
  mask = np.stack([band, np.random.default_rng(1).random((length, length)) < 0.05])
  kv = jnp.asarray(np.arange(length)[None, :] < np.array([[150], [length]]))
  obj = blocksparse.BlockSparseMask.from_mask(mask, 64, preferred="splash")

  def loss(q, k, v, m, backend):
    out = attention.dot_product_attention(q, k, v, mask=m, key_valid=kv, backend=backend)
    return jnp.sum(out * w), out

  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  gd, od = grad(q, k, v, jnp.asarray(mask), "dense")
  gs, os_ = grad(q, k, v, obj, "auto")                     # preferred -> splash
  np.testing.assert_allclose(os_, od, atol=2e-6)
  assert not np.asarray(os_)[:, 5, 0].any()
  for a, e in zip(gs, gd):
    np.testing.assert_allclose(a, e, atol=5e-6)


# ---- the chooser on synthetic inputs -------------------------------------------------

@pytest.mark.parametrize("kernel", [False, True])
def test_long_band_chooses_block_sparse_on_cpu_and_splash_on_tpu(kernel, monkeypatch):
  if not kernel:
    monkeypatch.setenv("SPARSE_ATTN_CPU_KERNEL", "0")
  band = patterns.window(4096, 128)
  c, lay = accel.choose(band, platform_name="cpu")
  assert c.executor == "blocksparse" and lay.block_size == c.block_size
  assert c.predicted_speedup > 5 and c.block_density < 0.15
  # Measured on CPU (docs/benchmarks.md): at L=4096, ±128, the pure-JAX executor is
  # faster at b=128 than at b=64 (fwd 32 vs 44 ms, fwd+bwd 110 vs 136 ms); the compiled
  # kernel ran b=64 and b=128 within run-to-run noise.
  assert c.block_size == 128 if not kernel else c.block_size in (64, 128)
  c, _ = accel.choose(band, platform_name="tpu")
  assert c.executor == "splash" and c.block_size >= 128


def test_short_or_dense_masks_stay_dense():
  c, lay = accel.choose(patterns.window(256, 16), platform_name="cpu")
  assert c.executor == "dense" and lay is None and "length" in c.reason
  unstructured = np.random.default_rng(0).random((2048, 2048)) < 0.1   # rho_block ~ 1
  c, _ = accel.choose(unstructured, platform_name="cpu")
  assert c.executor == "dense" and "predicted" in c.reason


def test_cpu_kernel_has_its_own_cost_model(monkeypatch):
  """Where the compiled kernel runs the calls (float32) block-sparse pays off at more
  lengths: L=1024 ±256 measured 2.2x fwd / 1.9x fwd+bwd with the kernel and 1.0x with
  the pure-JAX executor."""
  monkeypatch.delenv("SPARSE_ATTN_CPU_KERNEL", raising=False)
  if not cpu_kernel.load()[0]:
    pytest.skip("CPU kernel unavailable")
  band = patterns.window(1024, 256)
  assert accel.choose(band, platform_name="cpu")[0].executor == "blocksparse"
  assert accel.choose(band, platform_name="cpu", dtype=jnp.bfloat16)[0].executor == "dense"
  monkeypatch.setenv("SPARSE_ATTN_CPU_KERNEL", "0")
  assert accel.choose(band, platform_name="cpu")[0].executor == "dense"


def test_cost_model_margin_and_injected_constants():
  band = patterns.window(1024, 200)
  slow = accel.CostModel(eff_table=((16, 0.05), (512, 0.1)), min_length=0)
  assert accel.choose(band, platform_name="cpu", cost_model=slow)[0].executor == "dense"
  fast = accel.CostModel(eff_table=((16, 1.0), (512, 1.0)), min_length=0)
  assert accel.choose(band, platform_name="cpu", cost_model=fast)[0].executor == \
      "blocksparse"
  cm = accel.CostModel()
  assert cm.speedup(32, 3, 128) > cm.speedup(32, 6, 128) > cm.speedup(32, 6, 32)


def test_gpu_windows_go_to_cudnn_in_half_precision_only():
  band = patterns.window(2048, 64)
  c, _ = accel.choose(band, platform_name="gpu", dtype=jnp.bfloat16, head_dim=64)
  assert c.executor == "cudnn"
  c, _ = accel.choose(band, platform_name="gpu", dtype=jnp.float32, head_dim=64)
  assert c.executor == "blocksparse"
  bigbird_like = patterns.union(band, patterns.global_tokens(2048, 4))
  c, _ = accel.choose(bigbird_like, platform_name="gpu", dtype=jnp.bfloat16)
  assert c.executor != "cudnn"


def test_window_recogniser():
  assert accel.window_of(patterns.window(40, left=3, right=5)) == (3, 5)
  assert accel.window_of(np.stack([patterns.window(40, 2)] * 3)) == (2, 2)
  assert accel.window_of(patterns.strided(40, 4, 2)) is None
  assert accel.window_of(np.zeros((8, 8), bool)) is None


def test_prepare_and_prepare_masks():
  band = patterns.window(2048, 64)
  obj = accel.prepare(band, platform_name="cpu")
  assert isinstance(obj, blocksparse.BlockSparseMask) and obj.preferred == "blocksparse"
  short = accel.prepare(patterns.window(64, 4), platform_name="cpu")
  assert isinstance(short, np.ndarray) and short.dtype == bool
  assert accel.prepare(None) is None
  layers = accel.prepare_masks(band, 3, platform_name="cpu")
  assert len(layers) == 3 and layers[0] is layers[1] is layers[2]


# ---- fallbacks and the 'auto' backend ------------------------------------------------

def test_cudnn_executor_falls_back_off_gpu():
  q, k, v, _ = _qkv(1, 40, 2, 8)
  mask = patterns.window(40, 3)
  obj = blocksparse.BlockSparseMask.from_mask(mask, 8, preferred="cudnn")
  np.testing.assert_allclose(
      attention.dot_product_attention(q, k, v, mask=obj, backend="auto"),
      attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask)), atol=2e-6)


def test_auto_backend_on_arrays_is_dense_on_cpu():
  q, k, v, _ = _qkv(2, 12, 2, 4)
  mask = jnp.asarray(np.random.default_rng(2).random((12, 12)) < 0.5)
  np.testing.assert_allclose(
      attention.dot_product_attention(q, k, v, mask=mask, backend="auto"),
      attention.dot_product_attention(q, k, v, mask=mask), atol=1e-6)
  with pytest.raises(ValueError, match="mask objects"):
    attention.dot_product_attention(q, k, v, mask=mask, backend="splash")


def test_calibrated_choice_is_cached():
  band = patterns.window(64, 4)
  c1 = accel.calibrated_choice(band, 1, 2, 8, block_sizes=(16,), repeats=1)
  c2 = accel.calibrated_choice(band, 1, 2, 8, block_sizes=(16,), repeats=1)
  assert c1 is c2 and c1.executor in ("dense", "blocksparse")

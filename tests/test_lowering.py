"""Lowering checks (sparse_attn.lowering) and the target platform they trace for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import attention
from sparse_attn import lowering
from sparse_attn.attention import seam
from sparse_attn.attention import target
from sparse_attn.attention.kernels import cpu as cpu_kernel
from sparse_attn.attention.kernels import gpu as gpu_kernel
from sparse_attn.masks import patterns


def test_target_platform_sets_nests_and_restores():
  host = attention.platform()
  assert host == "cpu"   # conftest: JAX_PLATFORMS=cpu.
  with seam.target_platform("cuda") as name:
    assert name == "gpu" and seam.platform() == "gpu" == target.platform()
    with attention.target_platform("tpu"):
      assert seam.platform() == "tpu"
    assert seam.platform() == "gpu"
  assert seam.platform() == host
  with pytest.raises(RuntimeError), seam.target_platform("tpu"):
    raise RuntimeError("inside")
  assert seam.platform() == host
  with pytest.raises(ValueError, match="Unknown target platform"):
    with seam.target_platform("metal"):
      pass


def test_executor_choices_follow_the_target():
  mask = patterns.window(1024, 32)
  chosen = {}
  for plat in ("gpu", "tpu"):
    with seam.target_platform(plat):
      chosen[plat] = attention.choose(mask)[0].executor
  assert chosen == {"gpu": "blocksparse", "tpu": "splash"}
  probe = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32)
  with seam.target_platform("gpu"):
    assert "target platform is 'gpu'" in cpu_kernel.unsupported(probe, probe, probe)
    q = jnp.zeros((1, 4, 1, 8), jnp.bfloat16)
    assert seam.resolve("auto", None, q) == "cudnn"   # Unmasked half precision on GPU.
  assert seam.resolve("auto", None, q) == "dense"


def test_dense_and_blocksparse_lower_for_cuda_and_tpu(capsys):
  assert lowering.main(["--configs", "dense,blocksparse", "--platforms", "cuda,tpu"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("lowered")]
  assert len(lines) == 8   # 2 configs x 2 steps x 2 platforms.
  bs_eval = [l for l in lines if " blocksparse " in l and " eval " in l]
  assert len(bs_eval) == 2 and all("attention=blocksparse" in l for l in bs_eval)
  # On cuda the block-sparse steps run the Pallas GPU kernel (train and eval); the dense
  # steps and every tpu step here run none.
  gpu_calls = {tuple(l.split()[1:4]) for l in lines if gpu_kernel.CUSTOM_CALL in l}
  assert gpu_calls == {("blocksparse", "train", "cuda"), ("blocksparse", "eval", "cuda")}


def _host_callback(query, key, value, **kw):
  """The reference, plus a host round trip of its output (jax.export refuses it)."""
  out = seam.BACKENDS["dense"](query, key, value, **kw)
  host = jax.pure_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(out.shape, out.dtype),
                           jax.lax.stop_gradient(out))
  return out + 0 * host


def test_an_unlowerable_step_fails_naming_the_config(monkeypatch, capsys):
  monkeypatch.setitem(seam.BACKENDS, "host_callback", _host_callback)
  monkeypatch.setitem(lowering.CASES, "callback", lowering.Case(
      "callback", "finetune.py", overrides={"model.attention_backend": "host_callback"}))
  assert lowering.main(["--configs", "callback", "--platforms", "cuda"]) == 1
  out, err = capsys.readouterr()
  for step in ("train", "eval"):
    assert any(l.startswith("FAILED") and " callback " in l and f" {step} " in l
               for l in err.splitlines()), err
  assert "lowered" not in out
  assert "setup:" not in err and "different from the lowering platform cuda" in err


def test_expected_failures_are_named_and_kept_true(monkeypatch):
  x = jnp.ones((4,), jnp.float32)
  callback = jax.jit(lambda x: jax.pure_callback(lambda a: a, x, x))
  assert lowering._lower("case", "eval", "cuda", callback, (x,), False).status == "FAILED"  # pylint: disable=protected-access
  # Named as an expectation, the same failure is reported and passes ...
  monkeypatch.setitem(lowering.EXPECTED, ("case", "eval", "cuda"), lowering.Expected(
      "different from the lowering platform", "a host callback runs on the host"))
  r = lowering._lower("case", "eval", "cuda", callback, (x,), False)  # pylint: disable=protected-access
  assert r.status == "expected" and "cannot lower on this host" in r.detail
  # ... another reason is not the expected one ...
  monkeypatch.setitem(lowering.EXPECTED, ("case", "eval", "cuda"), lowering.Expected("x", "other"))
  r = lowering._lower("case", "eval", "cuda", callback, (x,), False)  # pylint: disable=protected-access
  assert r.status == "FAILED"
  # ... and an expectation that no longer holds is itself a failure.
  r = lowering._lower("case", "eval", "cuda", jax.jit(jnp.sin), (x,), False)  # pylint: disable=protected-access
  assert r.status == "FAILED" and "lowered, but EXPECTED" in r.detail


def test_skip_pallas_skips_only_pallas_steps_that_do_not_lower():
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel

  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  x = jnp.ones((16,), jnp.float32)
  kernel = jax.jit(lambda x: pl.pallas_call(
      copy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x))
  # A plain Pallas kernel does not lower for tpu off a TPU host.
  r = lowering._lower("case", "eval", "tpu", kernel, (x,), False)  # pylint: disable=protected-access
  assert r.status == "FAILED"
  r = lowering._lower("case", "eval", "tpu", kernel, (x,), True)  # pylint: disable=protected-access
  assert r.status == "skipped" and "Pallas" in r.detail
  # A step without one that lowers is lowered, --skip-pallas or not.
  assert lowering._lower("case", "eval", "tpu", jax.jit(jnp.sin), (x,), True).status == \
      "lowered"  # pylint: disable=protected-access

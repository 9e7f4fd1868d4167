"""The compiled CPU block-sparse kernel: equal to the dense reference and to the pure-JAX
executor at realistic tile shapes, used only where it applies, and safe to build and
load (a private cache whose libraries are loaded only when their SHA-256 matches)."""

import hashlib
import logging
import os
import shutil
import stat
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _require
from sparse_attn import attention
from sparse_attn import blocksparse
from sparse_attn.attention.kernels import cpu as cpu_kernel
from sparse_attn.masks import patterns


@pytest.fixture
def kernel(monkeypatch):
  monkeypatch.delenv("SPARSE_ATTN_CPU_KERNEL", raising=False)
  _require.cpu_kernel()   # Skips; fails under CI=true.


def _inputs(b, length, h, d, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((b, length, h, d)), dtype) for _ in range(4))


@pytest.mark.parametrize("length, block, depth, per", [
    (300, 64, 64, None),       # 64-row tiles: 6-row micro-kernels plus a 4-row remainder.
    (256, 32, 40, "head"),     # Head dim not a multiple of 16: the column tail.
    (200, 32, 16, "example"),  # A layout per example, gathered (off-band) tiles.
])
def test_kernel_matches_dense_and_xla(kernel, length, block, depth, per):
  bsz, h = 2, 3
  rng = np.random.default_rng(1)
  band = patterns.window(length, 20)
  if per == "head":
    mask = np.stack([band, rng.random((length, length)) < 0.05, band.T & (rng.random(
        (length, length)) < 0.5)])
  elif per == "example":
    mask = (rng.random((bsz, 1, length, length)) < 0.04) | band
  else:
    mask = band
  q, k, v, w = _inputs(bsz, length, h, depth)
  kv = jnp.asarray(np.arange(length)[None] < np.array([[length], [length - 45]]))
  obj = blocksparse.BlockSparseMask.from_mask(mask, block)

  def run(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)

  dense = run(lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask=jnp.asarray(mask), key_valid=kv))
  for impl in ("kernel", "xla"):
    out, grads = run(lambda q, k, v, impl=impl: blocksparse.attend(
        obj.plan, q, k, v, key_valid=kv, impl=impl))
    np.testing.assert_allclose(out, dense[0], atol=3e-6)
    for a, b in zip(grads, dense[1]):
      np.testing.assert_allclose(a, b, atol=2e-5)


def test_auto_uses_the_kernel_on_cpu_only_where_it_applies(kernel, monkeypatch):
  q, k, v, _ = _inputs(1, 128, 2, 16)
  obj = blocksparse.BlockSparseMask.from_mask(patterns.window(128, 10), 32)
  hlo = lambda fn, *a: jax.jit(fn).lower(*a).as_text()
  call = lambda **kw: (lambda q, k, v: blocksparse.attend(obj.plan, q, k, v, **kw))
  assert "sparse_attn_blocksparse_fwd" in hlo(call(), q, k, v)
  assert "sparse_attn_blocksparse_fwd" not in hlo(call(impl="xla"), q, k, v)
  # bfloat16 runs the kernel, converted to float32 and back.
  bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
  assert "sparse_attn_blocksparse_fwd" in hlo(call(), *bf)
  assert blocksparse.attend(obj.plan, *bf, impl="kernel").dtype == jnp.bfloat16
  # A dtype it does not take (float64) falls back, and the reason names it.
  f64 = jax.ShapeDtypeStruct(q.shape, np.float64)
  assert "not float64" in cpu_kernel.unsupported(f64, f64, f64)
  with pytest.raises(ValueError, match="impl must be"):
    blocksparse.attend(obj.plan, q, k, v, impl="fast")
  # Several CPU devices (a sharded CPU mesh): the partitionable executor is used.
  monkeypatch.setattr(cpu_kernel.jax, "devices", lambda *_: [None, None])
  assert "several CPU devices" in cpu_kernel.unsupported(q, k, v)
  monkeypatch.undo()
  # A GPU / TPU default backend never builds or runs the CPU kernel.
  monkeypatch.setattr(cpu_kernel.jax, "default_backend", lambda: "gpu")
  assert "CPU only" in cpu_kernel.unsupported(q, k, v)
  with pytest.raises(ValueError, match="CPU only"):
    blocksparse.attend(obj.plan, q, k, v, impl="kernel")
  monkeypatch.undo()
  monkeypatch.setenv("SPARSE_ATTN_CPU_KERNEL", "0")
  assert "sparse_attn_blocksparse_fwd" not in hlo(call(), q, k, v)


def test_kernel_dropout_matches_its_gradient_and_its_mean(kernel):
  """Dropout in the kernel: the same rng gives the same draw in forward and backward
  (the VJP agrees with a central difference), another rng another draw, and the mean
  over draws is the output without dropout."""
  q, k, v, _ = _inputs(1, 64, 2, 16, seed=4)
  obj = blocksparse.BlockSparseMask.from_mask(patterns.window(64, 9), 16)
  rng = jax.random.key(0)
  f = jax.jit(lambda q, k, v, r: blocksparse.attend(obj.plan, q, k, v, dropout_rng=r,
                                                     dropout_rate=0.3, impl="kernel"))
  assert "sparse_attn_blocksparse_bwd" in jax.jit(jax.grad(
      lambda q: jnp.sum(f(q, k, v, rng)))).lower(q).as_text()
  loss = lambda q, k, v: jnp.sum(f(q, k, v, rng) ** 2)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  dirs = _inputs(1, 64, 2, 16, seed=9)[:3]
  eps = 1e-2
  plus = loss(*(x + eps * d for x, d in zip((q, k, v), dirs)))
  minus = loss(*(x - eps * d for x, d in zip((q, k, v), dirs)))
  directional = sum(jnp.vdot(g, d) for g, d in zip(grads, dirs))
  np.testing.assert_allclose((plus - minus) / (2 * eps), directional, rtol=2e-2)
  clean = blocksparse.attend(obj.plan, q, k, v, impl="kernel")
  np.testing.assert_array_equal(f(q, k, v, rng), f(q, k, v, rng))
  assert not np.allclose(f(q, k, v, rng), f(q, k, v, jax.random.key(1)))
  assert not np.allclose(f(q, k, v, rng), clean)
  many = jnp.mean(jnp.stack([f(q, k, v, r) for r in jax.random.split(rng, 300)]), 0)
  np.testing.assert_allclose(many, clean, atol=0.1)
  # The kept fraction is 1 - rate: with equal scores (q = 0) and v = 1, each output is
  # (kept weights of the row / its keys) / (1 - rate).
  ones = jnp.ones_like(v)
  kept = f(jnp.zeros_like(q), k, ones, rng) * 0.7
  assert abs(float(jnp.mean(kept)) - 0.7) < 0.02
  with pytest.raises(ValueError, match="dropout_rate"):
    blocksparse.attend(obj.plan, q, k, v, dropout_rng=rng, dropout_rate=1.0, impl="kernel")


def test_kernel_under_vmap(kernel):
  q, k, v, _ = _inputs(3, 96, 2, 16)
  obj = blocksparse.BlockSparseMask.from_mask(patterns.window(96, 7), 16)
  one = lambda q, k, v: blocksparse.attend(obj.plan, q[None], k[None], v[None])[0]
  np.testing.assert_allclose(jax.vmap(one)(q, k, v),
                             blocksparse.attend(obj.plan, q, k, v, impl="xla"), atol=2e-6)


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
  monkeypatch.setattr(cpu_kernel, "_state", {})
  monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "/bin/false")
  with caplog.at_level(logging.WARNING):
    ok, why = cpu_kernel.load()
  assert not ok and "did not build" in why and "unavailable" in caplog.text
  # Nothing half-built is left for a later process to load.
  assert not list((tmp_path / "cpu_kernel").glob("*"))
  q, k, v, _ = _inputs(1, 64, 1, 16)
  obj = blocksparse.BlockSparseMask.from_mask(patterns.window(64, 5), 16)
  with pytest.raises(ValueError, match="did not build"):
    blocksparse.attend(obj.plan, q, k, v, impl="kernel")
  np.testing.assert_allclose(blocksparse.attend(obj.plan, q, k, v), attention.
                             dot_product_attention(q, k, v, mask=obj.element_mask()),
                             atol=2e-6)
  monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
  monkeypatch.setattr(cpu_kernel, "_state", {})
  assert "no C++ compiler" in cpu_kernel.load()[1]


def test_the_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
  cxx = _require.compiler()
  monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
  umask = os.umask(0o002)  # Ubuntu's default: group-writable files unless the code says.
  try:
    lib = cpu_kernel._build(cxx)
  finally:
    os.umask(umask)
  assert lib.exists() and lib.parent == tmp_path / "cpu_kernel"
  # This user's alone, and the build's SHA-256 recorded next to it (sha256sum format).
  assert stat.S_IMODE(lib.parent.stat().st_mode) == 0o700
  assert not lib.stat().st_mode & 0o022
  record = lib.with_name(lib.name + ".sha256")
  assert record.read_text() == f"{cpu_kernel.sha256_of(lib)}  {lib.name}\n"
  mtime = lib.stat().st_mtime_ns
  assert cpu_kernel._build(cxx) == lib and lib.stat().st_mtime_ns == mtime  # Reused.
  monkeypatch.setattr(cpu_kernel, "_cpu_id", lambda: "another CPU")
  assert cpu_kernel._build(cxx) != lib                                      # Rebuilt.


def _outcome(fn):
  """'fail', 'skip' or None: what calling `fn` does to the calling test."""
  try:
    fn()
  except pytest.fail.Exception as e:
    return "fail", str(e)
  except pytest.skip.Exception as e:
    return "skip", str(e)
  return None, ""


def test_a_missing_kernel_fails_under_ci_and_skips_elsewhere(monkeypatch, request):
  monkeypatch.setattr(cpu_kernel, "load", lambda: (False, "no C++ compiler was found"))
  monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
  monkeypatch.setenv("CI", "true")
  kind, msg = _outcome(_require.cpu_kernel)
  assert kind == "fail" and "CPU kernel unavailable: no C++ compiler" in msg
  assert _outcome(_require.compiler)[0] == "fail"
  # The fixture the kernel tests use.
  assert _outcome(lambda: request.getfixturevalue("kernel"))[0] == "fail"
  monkeypatch.setenv("CI", "false")
  kind, msg = _outcome(_require.cpu_kernel)
  assert kind == "skip" and "CPU kernel unavailable" in msg
  monkeypatch.delenv("CI")
  assert _outcome(_require.compiler)[0] == "skip"


# ---- the cache: private, and a library is loaded only if it matches its record --------

@pytest.fixture
def cache(monkeypatch, tmp_path):
  """A kernel cache in tmp_path holding a copy of this session's verified build.

  Returns:
    namespace(cxx, lib, record, compiles: libraries `_compile` built, loaded: SHA-256 of
    each file `load()` handed to the dynamic loader, which the spy does not load).
  """
  cxx = _require.compiler()
  built = cpu_kernel._build(cxx)   # The session's cache: built once per session.
  monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
  out = tmp_path / "cpu_kernel"
  out.mkdir(mode=0o700)
  for src in (built, built.with_name(built.name + ".sha256")):
    shutil.copy2(src, out / src.name)
  ns = types.SimpleNamespace(cxx=cxx, lib=out / built.name,
                             record=out / (built.name + ".sha256"), compiles=[], loaded=[])
  compile_ = cpu_kernel._compile

  def counted(*args):
    ns.compiles.append(args[3])
    return compile_(*args)

  def spy(path):
    ns.loaded.append(cpu_kernel.sha256_of(path))
    raise OSError("(test spy: not loaded)")   # This process keeps its registered kernel.

  monkeypatch.setattr(cpu_kernel, "_compile", counted)
  monkeypatch.setattr(cpu_kernel.ctypes.cdll, "LoadLibrary", spy)
  monkeypatch.setattr(cpu_kernel, "_state", {})
  return ns


def test_a_verified_cached_build_is_loaded_as_is(cache):
  assert cpu_kernel.load()[0] is False   # The spy refused it, after the checks.
  assert cache.loaded == [cpu_kernel.sha256_of(cache.lib)] and not cache.compiles


@pytest.mark.parametrize("damage", ["flip_a_byte", "no_record", "other_digest",
                                    "group_writable_library"])
def test_a_library_failing_verification_is_rebuilt_not_loaded(cache, damage, caplog):
  """(~5 s each: a real rebuild.)"""
  if damage == "flip_a_byte":
    data = bytearray(cache.lib.read_bytes())
    data[len(data) // 2] ^= 0x01
    cache.lib.write_bytes(data)
  elif damage == "no_record":
    cache.record.unlink()
  elif damage == "other_digest":
    cache.record.write_text(f"{'0' * 64}  {cache.lib.name}\n")
  else:
    os.chmod(cache.lib, 0o777)
  before = cpu_kernel.sha256_of(cache.lib)
  with caplog.at_level(logging.WARNING):
    cpu_kernel.load()
  assert cache.compiles == [cache.lib], caplog.text                # Rebuilt...
  rebuilt = cpu_kernel.sha256_of(cache.lib)
  assert cache.loaded == [rebuilt]                                   # ...and only it loaded,
  assert cache.record.read_text().split() == [rebuilt, cache.lib.name]   # recorded.
  if damage == "flip_a_byte":
    assert rebuilt != before
  assert "rebuilt, not loaded" in caplog.text
  assert {"flip_a_byte": "does not match", "no_record": "no SHA-256 record",
          "other_digest": "does not match",
          "group_writable_library": "only this user can write"}[damage] in caplog.text


def test_a_cache_others_could_write_is_emptied_and_rebuilt(cache, caplog):
  """A planted library with a matching record passes a digest check: what protects the
  cache is that nobody else can write it, so a directory that others could is cleared."""
  planted = b"\x7fELF planted"
  cache.lib.write_bytes(planted)
  cache.record.write_text(f"{hashlib.sha256(planted).hexdigest()}  {cache.lib.name}\n")
  (cache.lib.parent / "stray.so").write_bytes(planted)
  os.chmod(cache.lib.parent, 0o777)
  with caplog.at_level(logging.WARNING):
    cpu_kernel.load()
  assert stat.S_IMODE(cache.lib.parent.stat().st_mode) == 0o700
  assert "writable by group or others" in caplog.text
  assert cache.compiles == [cache.lib] and cache.lib.read_bytes() != planted
  assert cache.loaded == [cpu_kernel.sha256_of(cache.lib)]
  assert not (cache.lib.parent / "stray.so").exists()


def test_a_cache_of_another_user_is_refused(cache, monkeypatch):
  monkeypatch.setattr(cpu_kernel, "_uid", lambda: os.geteuid() + 1)
  with pytest.raises(RuntimeError, match="belongs to uid"):
    cpu_kernel._build(cache.cxx)
  ok, why = cpu_kernel.load()
  assert not ok and "belongs to uid" in why
  assert not cache.loaded and not cache.compiles
  assert cache.lib.exists()   # Not ours to delete.

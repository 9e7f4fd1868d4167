"""The test suite's own hygiene (conftest.py): caches in a temporary directory, never the
user's, and no test's process-wide changes reaching the tests after it."""

import os
import pathlib
import subprocess
import sys

import jax

from sparse_attn import assets
from sparse_attn.attention.kernels import cpu as cpu_kernel
from sparse_attn import hostmem
from sparse_attn import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOME_CACHE = pathlib.Path(os.path.expanduser("~")) / ".cache" / "sparse_attn"


def test_caches_are_the_sessions_temporary_directory(private_caches):
  cache = assets.cache_dir()
  assert cache == private_caches and os.environ["SPARSE_ATTN_CACHE"] == str(cache)
  assert not cache.resolve().is_relative_to(HOME_CACHE.resolve())
  # What lives under it: the kernel builds, and the compilation cache of "auto".
  cxx = cpu_kernel._compiler()  # pylint: disable=protected-access
  if cxx is not None:
    assert cpu_kernel._build(cxx).parent == cache / "cpu_kernel"  # pylint: disable=protected-access
  before = jax.config.jax_compilation_cache_dir
  try:
    train.enable_compilation_cache("auto")
    assert jax.config.jax_compilation_cache_dir == str(cache / "xla")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
  configured = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  assert configured is None or pathlib.Path(configured).is_relative_to(cache)
  # Subprocesses inherit it.
  out = subprocess.run([sys.executable, "-c",
                        "from sparse_attn import assets; print(assets.cache_dir())"],
                       capture_output=True, text=True, check=True, cwd=ROOT)
  assert out.stdout.strip() == str(cache)


def test_wheels_of_the_users_cache_are_linked_not_copied(private_caches):
  for link in (private_caches / "wheels").iterdir():
    if link.is_symlink():
      assert not link.resolve().is_relative_to(private_caches.resolve())


_LEAKY = '''
import ctypes
import os
import jax
from sparse_attn import hostmem


def _maps_big_blocks():
  """Whether glibc still serves a 64 MB malloc with mmap (as it does until
  hostmem's M_MMAP_MAX=0); None where mallinfo2 is missing (not glibc >= 2.33)."""
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "mallinfo2"):
    return None
  class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        .split())]
  libc.mallinfo2.restype = Info
  libc.malloc.restype = ctypes.c_void_p
  before = libc.mallinfo2().hblks
  block = libc.malloc(64 << 20)
  mapped = libc.mallinfo2().hblks > before
  libc.free(ctypes.c_void_p(block))
  return mapped

def test_a_leaks(tmp_path):
  os.environ["SPARSE_ATTN_LEAK_PROBE"] = "1"
  del os.environ["SPARSE_ATTN_PROBE_PRESET"]
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
  jax.jit(lambda x: x + 1)(1.0)   # Opens JAX's persistent cache in that directory.
  os.chdir(tmp_path)
  assert hostmem.reuse_freed_memory("reuse")   # Recorded, not applied.

def test_b_sees_none_of_it():
  assert "SPARSE_ATTN_LEAK_PROBE" not in os.environ
  assert os.environ["SPARSE_ATTN_PROBE_PRESET"] == "kept"
  assert not jax.config.jax_enable_x64
  assert jax.config.jax_compilation_cache_dir is None
  from jax._src import compilation_cache
  assert compilation_cache._cache is None
  assert not hostmem._applied
  assert _maps_big_blocks() in (True, None)   # The allocator itself: untouched.
  assert os.getcwd() == os.environ["PROBE_CWD"]
'''


def test_process_wide_changes_are_restored_between_tests(pytester, monkeypatch):
  """An inner session with the repository's conftest: a test that leaks environment,
  jax.config, working directory and allocator changes, then one that sees none."""
  pytester.makeconftest((ROOT / "conftest.py").read_text())
  pytester.makepyfile(test_leaky=_LEAKY)
  monkeypatch.setenv("SPARSE_ATTN_PROBE_PRESET", "kept")
  monkeypatch.setenv("PROBE_CWD", str(pytester.path))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W",
                                         "always::UserWarning")
  result.assert_outcomes(passed=2, warnings=1)
  result.stdout.fnmatch_lines(["*ProcessStateLeak*test_a_leaks changed*"])
  out = result.stdout.str()
  for name in ("$SPARSE_ATTN_LEAK_PROBE", "$SPARSE_ATTN_PROBE_PRESET",
               "jax.config.jax_enable_x64", "jax.config.jax_compilation_cache_dir",
               "the working directory"):
    assert name in out, name
  # This process's allocator was never touched either.
  assert hostmem._applied is False  # pylint: disable=protected-access

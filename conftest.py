"""Pytest root configuration: keeps test runs on the CPU and quiet, out of the user's
caches, and each test's changes to process-wide state away from the tests after it.

* `private_caches` (session, autouse): the asset cache ($SPARSE_ATTN_CACHE, with the
  CPU kernel's builds and `train.compilation_cache="auto"` under it) and a JAX
  compilation cache the user configured are moved to a temporary directory. Wheels
  already in the user's cache are linked in (read only: assets are checksum-verified on
  use), so the offline model and data sets are not downloaded again. Subprocesses that
  tests start inherit the variables. To keep a test cache across sessions, set both
  $SPARSE_ATTN_CACHE and $SPARSE_ATTN_TEST_CACHE to the same (non-home) directory.
* `_restore_process_state` (every test): environment variables, the working directory
  and `jax.config` values a test changed without restoring them are put back (with a
  `ProcessStateLeak` warning naming them), and glibc allocator settings
  (`hostmem.reuse_freed_memory`) are recorded instead of applied: they cannot be
  undone, and tests/test_hostmem.py measures them in subprocesses.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ctypes  # pylint: disable=wrong-import-position
import pathlib  # pylint: disable=wrong-import-position
import warnings  # pylint: disable=wrong-import-position

import pytest  # pylint: disable=wrong-import-position

pytest_plugins = ("pytester",)  # tests/test_suite_hygiene.py runs inner sessions.

# Set to the temporary cache by the session that made it: a pytest started by a test
# (which inherits the environment) shares it instead of seeding its own.
OWN_CACHE_VAR = "SPARSE_ATTN_TEST_CACHE"
# Variables pytest itself changes between the phases of a test.
_PYTEST_VARS = ("PYTEST_CURRENT_TEST",)
# Set by a library on its first import (once per process, whichever test imports it
# first): kept, since the library relies on it later. jax.experimental.mosaic.gpu;
# torch's flex_attention (its inductor cache).
_IMPORT_VARS = ("MOSAIC_GPU_CUDA_ROOT", "TORCHINDUCTOR_CACHE_DIR")


class ProcessStateLeak(UserWarning):
  """A test left process-wide state changed; the fixture restored it."""


def _tree(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of the files under `root` (links not followed)."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      try:
        st = os.lstat(path)
      except OSError:
        continue
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
  return out


def _seed_wheels(real: pathlib.Path, wheels: pathlib.Path) -> None:
  """Links the package files of the user's cache into `wheels` (read, never written:
  `assets.fetch` only reads a wheel, or unlinks our link if it is corrupted)."""
  if not real.is_dir() or real.resolve() == wheels.resolve():
    return
  for src in real.iterdir():
    if src.name.endswith((".whl", ".tar.gz")) and src.is_file():
      try:
        (wheels / src.name).symlink_to(src.resolve())
      except FileExistsError:  # Another xdist worker linked it first.
        pass


def _reset_stale_jax_cache(jax) -> None:
  """JAX opens its persistent cache once per process: after the directory setting
  changed, drop the open one so that the next compilation uses the current setting."""
  try:
    from jax._src import compilation_cache as cc  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  if not getattr(cc, "_cache_initialized", False):
    return
  want = jax.config.jax_compilation_cache_dir
  cache = getattr(cc, "_cache", None)
  have = getattr(cache, "_path", None)
  if not want or have is None or pathlib.Path(str(have)) != pathlib.Path(want):
    cc.reset_cache()


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory):
  """The session's asset cache: a temporary directory (see the module docstring).

  Yields:
    Its path (also $SPARSE_ATTN_CACHE for the session).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from sparse_attn import assets  # pylint: disable=import-outside-toplevel
  inherited = os.environ.get(OWN_CACHE_VAR)
  if inherited and os.environ.get("SPARSE_ATTN_CACHE") == inherited:
    yield pathlib.Path(inherited)
    return
  real = assets.cache_dir()
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # Shared by the workers: the kernel is built once.
  cache = base / "sparse_attn_cache"
  (cache / "wheels").mkdir(parents=True, exist_ok=True)
  _seed_wheels(real / "wheels", cache / "wheels")
  before = _tree(real) if real.is_dir() else {}
  names = ("SPARSE_ATTN_CACHE", OWN_CACHE_VAR, "JAX_COMPILATION_CACHE_DIR")
  saved_env = {k: os.environ.get(k) for k in names}
  saved_dir = jax.config.jax_compilation_cache_dir
  os.environ["SPARSE_ATTN_CACHE"] = os.environ[OWN_CACHE_VAR] = str(cache)
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache / "xla")
  if saved_dir:  # The user's JAX cache (their environment or config): not written either.
    jax.config.update("jax_compilation_cache_dir", str(cache / "xla"))
    _reset_stale_jax_cache(jax)
  try:
    yield cache
  finally:
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    if saved_dir:
      jax.config.update("jax_compilation_cache_dir", saved_dir)
      _reset_stale_jax_cache(jax)
    if real.is_dir():
      changed = sorted(k for k, v in _tree(real).items() if before.get(k) != v)
      if changed:
        warnings.warn(ProcessStateLeak(
            f"The user's asset cache {real} was written during the test session "
            f"(another process, or a test that bypassed $SPARSE_ATTN_CACHE): {changed[:10]}"))


class _RecordingLibc:
  """Stands in for the C library inside `hostmem`: records mallopt calls, applies none."""

  def __init__(self):
    self.calls = []

  def mallopt(self, param, value):
    self.calls.append((param, value))
    return 1


class _CtypesWithoutMallopt:
  """`ctypes` as `hostmem` sees it during a test: `CDLL(None)` (this process's C
  library) is a `_RecordingLibc`; everything else is the real module."""

  def __init__(self, libc):
    self._libc = libc

  def CDLL(self, name, *args, **kwargs):  # pylint: disable=invalid-name
    return self._libc if name is None else ctypes.CDLL(name, *args, **kwargs)

  def __getattr__(self, name):
    return getattr(ctypes, name)


@pytest.fixture(autouse=True)
def _restore_process_state(request):
  """Puts back what a test changed process-wide (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  env = dict(os.environ)
  cwd = os.getcwd()
  config = dict(jax.config.values)
  patch = pytest.MonkeyPatch()  # Our own: a test's monkeypatch.undo() must not undo it.
  try:
    from sparse_attn import hostmem  # pylint: disable=import-outside-toplevel
  except ImportError:
    hostmem = None
  if hostmem is not None:
    patch.setattr(hostmem, "ctypes", _CtypesWithoutMallopt(_RecordingLibc()))
    patch.setattr(hostmem, "_applied", hostmem._applied)  # pylint: disable=protected-access
  try:
    yield
  finally:
    patch.undo()
    leaked = []
    for k in set(env) | set(os.environ):
      if (k in _PYTEST_VARS or env.get(k) == os.environ.get(k)
          or (k in _IMPORT_VARS and k not in env)):
        continue
      leaked.append(f"${k}")
      if k in env:
        os.environ[k] = env[k]
      else:
        del os.environ[k]
    if os.getcwd() != cwd:
      leaked.append("the working directory")
      os.chdir(cwd)
    for k, v in jax.config.values.items():
      if k in config and config[k] != v:
        leaked.append(f"jax.config.{k}")
        try:
          jax.config.update(k, config[k])
        except Exception as e:  # pylint: disable=broad-except
          leaked.append(f"(could not restore {k}: {e})")
    _reset_stale_jax_cache(jax)
    if leaked:
      warnings.warn(ProcessStateLeak(
          f"{request.node.nodeid} changed {', '.join(sorted(leaked))} without restoring "
          "it; restored by conftest._restore_process_state (use monkeypatch, a context "
          "manager or a subprocess)."))

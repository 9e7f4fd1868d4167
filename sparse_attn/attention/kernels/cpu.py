"""A compiled block-sparse attention kernel for XLA:CPU (a `jax.ffi` custom call).

XLA:CPU runs each batched tile product of the pure-JAX executor (`kernels.blocksparse`) on
one core and rarely overlaps them, so on a multi-core host that executor leaves cores
idle. This kernel (`blocksparse_cpu.cc`) computes the same forward and FlashAttention-
style backward over the layout's tile list on XLA's intra-op thread pool (forward work
items: (example, head, query block); backward: (example, head), so that each item alone
writes its dK / dV rows), with a register-blocked float32 GEMM and a vectorised exp.

It is built on first use with the host's C++ compiler (`$CXX`, else `c++` / `g++`) for
the host CPU (`-march=native`) into `<cache>/cpu_kernel/`, keyed by the source, the
compiler, the flags, jaxlib's version and the CPU; the build is written to a temporary
file and renamed, so a crashed build never leaves a broken library. A library is code
this process runs, so the cache is treated as such: the directory is this user's alone
(created with mode 0o700; one owned by another user is refused, one that group or others
could write is emptied), each build's SHA-256 is recorded next to it
(`<library>.sha256`, `sha256sum` format, written atomically), and a cached library is
loaded only if it still matches its record; otherwise (changed, truncated, or no record,
e.g. from an older version) it is deleted and rebuilt, with a warning. Without a compiler
(or with `SPARSE_ATTN_CPU_KERNEL=0`) `unsupported()` says why and the pure-JAX executor
runs instead; `kernels.blocksparse.attend(..., impl='kernel')` then raises with the reason.

Scope: float32 (bfloat16 and float16 inputs are converted to float32, exactly, and the
output and gradients back to the input dtype, so mixed-precision models keep the kernel),
one CPU device in the process (the custom call is not partitioned, so under a multi-device
mesh the pure-JAX executor is used), CPU as the target platform
(`attention.target.platform()`: the default backend unless traced under `target_platform`;
under `impl='auto'` the call also sits in `lax.platform_dependent`, so a computation
lowered for GPU / TPU still gets the pure-JAX executor). First derivatives
only: for second derivatives (e.g. Hessian-vector products) use `impl='xla'`. The
choice is made when a function is traced; changing `SPARSE_ATTN_CPU_KERNEL` later does
not affect functions already compiled.

Shape legend: B batch, Q / K query / key length, H heads, D head dim, b block size,
NQ / NK query / key blocks, C longest tile list of a query block.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import stat
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.attention import target
from sparse_attn.masks import layout as layout_lib
from sparse_attn.pkgindex import sha256_of

SOURCE = pathlib.Path(__file__).with_name("blocksparse_cpu.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_FWD, _BWD = "sparse_attn_blocksparse_fwd", "sparse_attn_blocksparse_bwd"
_RECORD = ".sha256"   # Suffix of a library's SHA-256 record: <library>.sha256.

# Input dtypes the kernel runs: float32 itself; half precision converted to float32.
DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))

_lock = threading.Lock()
_state: dict[str, object] = {}
_logged: set[str] = set()   # Messages `log_once` has written in this process.


def log_once(message: str) -> None:
  """Logs `message` (INFO) the first time this process sees it: executors are traced
  once per shape and layer, and a reason repeated per call would bury the log."""
  with _lock:
    if message in _logged:
      return
    _logged.add(message)
  logging.info("sparse_attn: %s", message)


def takes(dtype) -> bool:
  """Whether the kernel runs inputs of `dtype` (float32; half precision converted)."""
  return np.dtype(dtype) in DTYPES


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_id() -> str:
  """The CPU model and feature flags (what -march=native compiles for)."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")  # x86, Arm
    return platform.machine() + "\n" + "\n".join(l for l in lines if l.startswith(keys))
  except OSError:
    return platform.processor() or platform.machine()


def _uid() -> int:
  """This process's effective user id (a function, so that tests can pose as another)."""
  return os.geteuid()


def _private_dir(path: pathlib.Path) -> pathlib.Path:
  """Creates `path` for this user alone (mode 0o700), or checks that an existing one is.

  Whoever can write the directory can plant a library (and a matching record) that this
  process would run, so no one but this user may.

  Raises:
    RuntimeError: `path` is not a directory, or it belongs to another user (whose files
      cannot be trusted, nor removed).
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  with contextlib.suppress(FileExistsError):
    path.mkdir(mode=0o700)
  st = os.stat(path)
  if not stat.S_ISDIR(st.st_mode):
    raise RuntimeError(f"the kernel cache {path} is not a directory")
  if st.st_uid != _uid():
    raise RuntimeError(
        f"the kernel cache {path} belongs to uid {st.st_uid}, not to this user (uid "
        f"{_uid()}): libraries in it are not loaded. Point $SPARSE_ATTN_CACHE at a "
        "directory of your own")
  if stat.S_IMODE(st.st_mode) != 0o700:
    os.chmod(path, 0o700)   # First: from here on nobody else can add files.
    if st.st_mode & 0o022:
      # Others could have written any file in it, a record as easily as a library.
      logging.warning("sparse_attn: the kernel cache %s was writable by group or others "
                      "(mode %o): its files are not trusted and are removed; the kernel is "
                      "rebuilt.", path, stat.S_IMODE(st.st_mode))
      for entry in path.iterdir():
        if entry.is_symlink() or entry.is_file():
          entry.unlink(missing_ok=True)
  return path


@contextlib.contextmanager
def _locked(directory: pathlib.Path):
  """Holds an exclusive lock on `directory`, so that processes sharing the cache (test
  workers, data-parallel launches) check and build one at a time instead of racing a
  record against another build's library."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # Not POSIX: renames stay atomic; a race costs a rebuild at worst.
    yield
    return
  fd = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)   # Releases the lock.


def _verify(lib: pathlib.Path, record: pathlib.Path) -> str:
  """Why the cached `lib` may not be loaded ('' if it may).

  It may if it and its record are regular files of this user's that only this user can
  write, and the library's SHA-256 is the recorded one.
  """
  for path in (lib, record):
    try:
      st = os.lstat(path)
    except FileNotFoundError:
      return "has no SHA-256 record" if path == record else "is missing"
    if (not stat.S_ISREG(st.st_mode) or st.st_uid != _uid() or st.st_mode & 0o022):
      return f"has {path.name} not a regular file that only this user can write"
  try:
    expected = record.read_text().split()[0].lower()
  except (OSError, UnicodeDecodeError, IndexError):
    expected = ""
  if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
    return "has an unreadable SHA-256 record"
  actual = sha256_of(lib)
  if actual != expected:
    return (f"does not match its SHA-256 record (recorded {expected[:16]}..., found "
            f"{actual[:16]}...): it changed after it was built")
  return ""


def _compile(cxx: str, source: str, out_dir: pathlib.Path, lib: pathlib.Path,
             record: pathlib.Path) -> None:
  """Compiles `source` to `lib` and records its SHA-256 in `record`, each written to a
  temporary file and renamed (a crash leaves at worst a library without a record, which
  the next load rebuilds)."""
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  src = tmp[:-3] + ".cc"   # The hashed text, even if the package file changes meanwhile.
  rec = tmp[:-3] + _RECORD
  pathlib.Path(src).write_text(source)
  try:
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", src, "-o", tmp]
    try:
      res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"`{' '.join(cmd)}` took over 600 s") from e
    if res.returncode:
      raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{res.stderr[-2000:]}")
    # The linker's mode follows the umask (0o775 under 0o002): only this user may write.
    os.chmod(tmp, 0o700)
    with open(os.open(rec, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
      f.write(f"{sha256_of(tmp)}  {lib.name}\n")
    os.replace(tmp, lib)
    os.replace(rec, record)
  finally:
    for path in (tmp, src, rec):
      if os.path.exists(path):
        os.remove(path)


def _build(cxx: str) -> pathlib.Path:
  """Compiles the kernel (or finds the cached, verified build) and returns its path.

  Raises:
    RuntimeError: the build failed, or the cache directory belongs to another user.
  """
  from sparse_attn import assets  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                           check=False).stdout.splitlines()[:1]
  source = SOURCE.read_text()
  key = hashlib.sha256("\0".join(
      [source, cxx, *version, *FLAGS, jaxlib.__version__, _cpu_id()]).encode())
  out_dir = _private_dir(assets.cache_dir() / "cpu_kernel")
  lib = out_dir / f"blocksparse_cpu_{key.hexdigest()[:16]}.so"
  record = lib.with_name(lib.name + _RECORD)
  with _locked(out_dir):
    if os.path.lexists(lib) or os.path.lexists(record):
      why = _verify(lib, record)
      if not why:
        return lib
      logging.warning("sparse_attn: the cached CPU kernel %s %s; it is deleted and "
                      "rebuilt, not loaded.", lib, why)
      for path in (record, lib):
        path.unlink(missing_ok=True)
    _compile(cxx, source, out_dir, lib, record)
  return lib


def load() -> tuple[bool, str]:
  """Builds and registers the kernel once per process.

  Returns:
    (ok, reason): whether the kernel can be used, and why not.
  """
  with _lock:
    if "ok" in _state:
      return _state["ok"], _state["reason"]
    ok, reason = False, ""
    if (cxx := _compiler()) is None:
      reason = "no C++ compiler was found (set $CXX, or install g++)"
    else:
      try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
        jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.SparseAttnBlockSparseFwd),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.SparseAttnBlockSparseBwd),
                                    platform="cpu")
        ok = True
      except (OSError, RuntimeError, AttributeError) as e:
        reason = f"it did not build or load: {e}"
        logging.warning("sparse_attn: the CPU block-sparse kernel is unavailable: %s. "
                        "Using the pure-JAX executor.", reason)
    _state.update(ok=ok, reason=reason)
    return ok, reason


def unsupported(query: jax.Array, key: jax.Array, value: jax.Array) -> str:
  """Why the kernel cannot run this call ('' if it can)."""
  if os.environ.get("SPARSE_ATTN_CPU_KERNEL", "1").lower() in ("0", "false", "no", "off"):
    return "it is disabled by SPARSE_ATTN_CPU_KERNEL"
  if target.platform() != "cpu":
    return f"it runs on CPU only, and the target platform is {target.platform()!r}"
  if (bad := [x.dtype for x in (query, key, value) if not takes(x.dtype)]):
    return (f"it takes float32 (bfloat16 / float16 converted to float32), not "
            f"{np.dtype(bad[0]).name}")
  if len(jax.devices("cpu")) > 1:
    return "it is not partitioned, and the process has several CPU devices"
  ok, reason = load()
  return "" if ok else reason


@functools.lru_cache(maxsize=64)
def tables(lay: layout_lib.BlockLayout) -> tuple[np.ndarray, ...]:
  """The layout as the kernel's tile lists.

  Returns:
    num int32 [Bm, Hm, NQ]; cols, pidx int32 [Bm, Hm, NQ, C] (listed key blocks and
    their partial-tile index, -1 for full tiles); tiles uint8 [max(P, 1), b, b].
  """
  num, idx = lay.kv_lists("nonempty")
  c = max(int(num.max(initial=0)), 1)
  cols = np.ascontiguousarray(idx[..., :c], np.int32)
  pidx = np.take_along_axis(lay.partial_index, cols, axis=-1).astype(np.int32)
  b = lay.block_size
  tiles = (lay.partial_blocks if len(lay.partial_blocks)
           else np.zeros((1, b, b), bool)).astype(np.uint8)
  return num.astype(np.int32), cols, pidx, np.ascontiguousarray(tiles)


def _call(name, shapes, rate, *args):
  return jax.ffi.ffi_call(name, shapes, vmap_method="sequential")(*args,
                                                                  rate=np.float32(rate))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(rate, q, k, v, kvalid, num, cols, pidx, tiles, seed):
  return _core_fwd(rate, q, k, v, kvalid, num, cols, pidx, tiles, seed)[0]


def _core_fwd(rate, q, k, v, kvalid, num, cols, pidx, tiles, seed):
  bsz, h, lq, _ = q.shape
  o, lse = _call(_FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                        jax.ShapeDtypeStruct((bsz, h, lq), jnp.float32)), rate,
                 q, jnp.swapaxes(k, -1, -2), v, num, cols, pidx, tiles, kvalid, seed)
  vt = jnp.swapaxes(v, -1, -2)   # The backward reads V only as V^T.
  return o, (q, k, vt, kvalid, num, cols, pidx, tiles, seed, o, lse)


def _core_bwd(rate, res, do):
  q, k, vt, kvalid, num, cols, pidx, tiles, seed, o, lse = res
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  dq, dk, dv = _call(_BWD, (f32(q.shape), f32(k.shape), f32(k.shape)), rate, q, k,
                     jnp.swapaxes(k, -1, -2), vt, o, lse, do.astype(jnp.float32), num,
                     cols, pidx, tiles, kvalid, seed)
  return dq, dk, dv, None, None, None, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def attend(lay: layout_lib.BlockLayout, query: jax.Array, key: jax.Array,
           value: jax.Array, key_valid: jax.Array | None = None,
           dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0) -> jax.Array:
  """Block-sparse attention with the compiled kernel (call `load()` first).

  Args:
    lay: the static layout (Q, K must match the inputs).
    query: [B, Q, H, D]; key, value: [B, K, H, D]; float32, or bfloat16 / float16
      (converted to float32 for the kernel; the gradients come back in the input dtype).
    key_valid: [B, K] bool, False for padding keys.
    dropout_rng, dropout_rate: attention-weight dropout (the same distribution as the
      other executors, drawn from a hash of a seed taken from `dropout_rng`).

  Returns:
    [B, Q, H, D] in the dtype of `query`, equal to the dense reference under the layout's
    mask.
  """
  out_dtype = query.dtype
  if out_dtype != jnp.float32:
    log_once(f"the compiled CPU kernel computes in float32: {np.dtype(out_dtype).name} "
             "attention inputs are converted to float32 for it, and its output back.")
    query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
  b = lay.block_size
  bsz, q_len, _, depth = query.shape
  k_len = key.shape[1]
  lq, lk = lay.num_q_blocks * b, lay.num_k_blocks * b
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  heads_major = lambda x: jnp.transpose(x, (0, 2, 1, 3))
  q = heads_major(pad(query * jnp.float32(1.0 / np.sqrt(depth)), lq))
  k, v = heads_major(pad(key, lk)), heads_major(pad(value, lk))
  valid = jnp.arange(lk) < k_len
  if key_valid is None:
    kvalid = jnp.broadcast_to(valid, (bsz, lk))
  else:
    kvalid = jnp.pad(key_valid.astype(jnp.bool_), ((0, 0), (0, lk - k_len))) & valid
  num, cols, pidx, tiles = (jnp.asarray(t) for t in tables(lay))
  rate = float(dropout_rate) if dropout_rng is not None else 0.0
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}.")
  seed = (jax.random.bits(dropout_rng, (2,), jnp.uint32) if rate > 0.0
          else jnp.zeros((2,), jnp.uint32))
  o = _core(rate, q, k, v, kvalid.astype(jnp.uint8), num, cols, pidx, tiles, seed)
  return jnp.transpose(o, (0, 2, 1, 3))[:, :q_len].astype(out_dtype)

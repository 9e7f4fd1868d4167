"""An exclusive lock on a workdir, so that two training runs never write one directory.

The lock is an OS file lock (`fcntl.flock`) on `<workdir>/.lock`: the kernel releases it
when the holder exits or dies (kill -9 included), so a stale lock never blocks a rerun.
The file records the holder's PID, host and command line for the error message.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys

from sparse_attn.errors import UserError

try:
  import fcntl
except ImportError:  # Not POSIX: no lock (the run still works).
  fcntl = None


class WorkdirLockedError(UserError):
  """Another process holds the workdir's lock."""


class WorkdirLock:
  """Context manager holding `<workdir>/.lock` exclusively.

  Raises (on enter):
    WorkdirLockedError: another live process holds it; the message names its PID.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir).absolute() / ".lock"
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        holder = _read(fd)
        os.close(fd)
        raise WorkdirLockedError(
            f"{self.path.parent} is in use by another run (PID {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}: {holder.get('argv', '?')}). Wait for it to finish "
            "or stop it, or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "argv": " ".join(sys.argv)}).encode())
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing releases the flock; the file stays (no unlink race).
      self._fd = None


def _read(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or "{}")
  except (OSError, ValueError):
    return {}

"""Entry-point plumbing: user errors as one message and exit code 2, tracebacks on demand.

`cli.run(main)` replaces `absl.app.run(main)` in `train.py` and `eval.py`. An error the
user can fix prints as one line (``error: ...``) and exits 2; `--traceback` (or
``SPARSE_ATTN_TRACEBACK=1``) shows the full stack. Unexpected exceptions keep their
traceback and exit 1.

User errors are: `errors.UserError` (and the library errors derived from it), and a
`ValueError` / `KeyError` / `FileNotFoundError` raised by this library's own code (a
deliberate check with a message, not a failure inside JAX). An error while reading the
config (the config file's `get_config`, or a bad ``--config.<key>=value`` override, which
is reported with the valid keys near it) is one message too.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import sys
import traceback
from typing import Callable

from absl import app, flags

from sparse_attn.errors import UserError

flags.DEFINE_boolean("traceback", False, "Show the full Python traceback of user errors.")

_PACKAGE = str(pathlib.Path(__file__).parent)
_OWN_TYPES = (ValueError, KeyError, FileNotFoundError)


def is_user_error(exc: BaseException) -> bool:
  """Whether `exc` is a deliberate check of this library (printed without a traceback)."""
  if isinstance(exc, UserError):
    return True
  if not isinstance(exc, _OWN_TYPES) or exc.__traceback__ is None:
    return False
  frame = traceback.extract_tb(exc.__traceback__)[-1]  # Where it was raised.
  return str(pathlib.Path(frame.filename).absolute()).startswith(_PACKAGE)


def _message(exc: BaseException) -> str:
  text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
  return text.strip() or type(exc).__name__


def _want_traceback(argv: list[str]) -> bool:
  env = os.environ.get("SPARSE_ATTN_TRACEBACK", "").lower() not in ("", "0", "false")
  return env or "--traceback" in argv or "--traceback=true" in argv


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _override_problem(argv: list[str]) -> str | None:
  """Names the `--config.a.b=v` override whose key does not exist, with close keys."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec_arg is None and "--config" in argv[:-1]:
    spec_arg = argv[argv.index("--config") + 1]
  if not spec_arg:
    return None
  path, _, arg = spec_arg.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_sparse_attn_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001 - the config file itself failed.
    return f"--config {spec_arg}: {type(e).__name__}: {_message(e)}"
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in key.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(walked) or "the top level"
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        return (f"{a}: the config has no key {part!r} in {where}.{hint} "
                f"Valid keys there: {sorted(keys)}.")
      node, walked = node[part], walked + [part]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config errors reported as one message."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}\nRun with --helpfull for the flags.")
  except Exception as e:  # noqa: BLE001 - ml_collections raises several kinds here.
    if _want_traceback(argv):
      raise
    problem = _override_problem(argv[1:])
    _fail(problem or f"could not read the config: {type(e).__name__}: {_message(e)}")
  raise AssertionError("unreachable")


def run(main: Callable[[list[str]], object]) -> None:
  """`absl.app.run(main)` with user errors printed as one message (exit code 2)."""
  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and the rest.
      if flags.FLAGS.traceback or _want_traceback(sys.argv) or not is_user_error(e):
        raise
      _fail(_message(e) + "\n(--traceback shows where it was raised.)")
  app.run(guarded, flags_parser=_parse_flags)

"""The library's user-facing error type: bad config, data, checkpoints or assets.

Entry points (`train.py`, `eval.py`, `scripts/`) print a `UserError` as one message and
exit 2; anything else keeps its traceback (see `sparse_attn.cli`). A `UserError` names the
problem and the way out.
"""


class UserError(ValueError):
  """An error the user can fix: the message says what is wrong and what to do."""

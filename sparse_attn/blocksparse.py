"""Moved to `sparse_attn.attention.kernels.blocksparse` (plan, executor, mask); this module
re-exports the old names for one release."""

from sparse_attn.attention.kernels.blocksparse import (  # noqa: F401
    BlockSparseMask, Plan, attend, make_plan, row_has_key)

__all__ = ["BlockSparseMask", "Plan", "attend", "make_plan", "row_has_key"]

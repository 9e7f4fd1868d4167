"""Moved to `sparse_attn.attention.kernels.cpu`; this module re-exports the old public
names for one release."""

from sparse_attn.attention.kernels.cpu import (  # noqa: F401
    FLAGS, SOURCE, attend, load, tables, unsupported)

__all__ = ["FLAGS", "SOURCE", "attend", "load", "tables", "unsupported"]

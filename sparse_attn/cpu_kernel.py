"""Moved to `sparse_attn.attention.kernels.cpu`; this module re-exports the old public
names for one release."""

from sparse_attn.attention.kernels.cpu import SOURCE, attend, load, unsupported  # noqa: F401

__all__ = ["SOURCE", "attend", "load", "unsupported"]

"""Block-sparse attention: a static plan of a layout's tiles, its executor, its mask leaf."""

from sparse_attn.attention.kernels.blocksparse.executor import attend
from sparse_attn.attention.kernels.blocksparse.mask import BlockSparseMask, row_has_key
from sparse_attn.attention.kernels.blocksparse.plan import Plan, make_plan

__all__ = ["BlockSparseMask", "Plan", "attend", "make_plan", "row_has_key"]

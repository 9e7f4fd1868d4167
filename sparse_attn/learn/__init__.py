"""Learned attention structure: the methods (DAM, learned windows, layer pruning) and their
registry. The interface and the registry live in `learn.base`, the parts the methods share
(relaxations, schedules, config checks) in `learn.common`; importing this package registers
the built-in methods.
"""

from sparse_attn.learn.base import Array
from sparse_attn.learn.base import build
from sparse_attn.learn.base import default_config
from sparse_attn.learn.base import Frozen
from sparse_attn.learn.base import get
from sparse_attn.learn.base import Method
from sparse_attn.learn.base import METHODS
from sparse_attn.learn.base import names
from sparse_attn.learn.base import register
from sparse_attn.learn.base import Sample
from sparse_attn.learn.base import Structure
# The built-in methods (an explicit list, no discovery): each registers itself on import.
from sparse_attn.learn import dam
from sparse_attn.learn import prune
from sparse_attn.learn import window

__all__ = ["Array", "build", "dam", "default_config", "Frozen", "get", "Method", "METHODS",
           "names", "prune", "register", "Sample", "Structure", "window"]

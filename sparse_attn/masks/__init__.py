"""Attention masks: fixed patterns, per-example data masks, per-layer schedules, stats.

All builders are pure numpy functions returning bool arrays, True = may attend.
"""

from sparse_attn.masks.data import apply_special_rule
from sparse_attn.masks.data import dependency_mask
from sparse_attn.masks.data import lexical_similarity_mask
from sparse_attn.masks.data import lift_word_mask
from sparse_attn.masks.data import Parse
from sparse_attn.masks.data import same_word_mask
from sparse_attn.masks.data import spacy_parse
from sparse_attn.masks.data import syntax_masks
from sparse_attn.masks.data import word_ids_from_offsets
from sparse_attn.masks.patterns import bigbird
from sparse_attn.masks.patterns import build
from sparse_attn.masks.patterns import fixed
from sparse_attn.masks.patterns import full
from sparse_attn.masks.patterns import global_tokens
from sparse_attn.masks.patterns import intersect
from sparse_attn.masks.patterns import logsparse
from sparse_attn.masks.patterns import longformer
from sparse_attn.masks.patterns import PATTERNS
from sparse_attn.masks.patterns import random
from sparse_attn.masks.patterns import remove_diagonal
from sparse_attn.masks.patterns import SPARSEBERT_PARAMS
from sparse_attn.masks.patterns import SPARSEBERT_PRESETS
from sparse_attn.masks.patterns import SPARSEBERT_README_SPARSITY
from sparse_attn.masks.patterns import star
from sparse_attn.masks.patterns import strided
from sparse_attn.masks.patterns import union
from sparse_attn.masks.patterns import window
from sparse_attn.masks.schedule import check_leaf
from sparse_attn.masks.schedule import is_leaf
from sparse_attn.masks.schedule import later_layers
from sparse_attn.masks.schedule import per_head
from sparse_attn.masks.schedule import per_layer
from sparse_attn.masks.schedule import validate
from sparse_attn.masks.stats import block_density
from sparse_attn.masks.stats import density
from sparse_attn.masks.stats import is_connected
from sparse_attn.masks.stats import layers_to_connect
from sparse_attn.masks.stats import per_layer_density
from sparse_attn.masks.stats import sparsity

"""sparse_attn: BERT with sparse self-attention in JAX/Flax: fixed, learned and pruned."""

__version__ = "0.1.0"

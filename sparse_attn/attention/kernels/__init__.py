"""Attention kernels below the seam: block-sparse (pure JAX and compiled CPU), Splash, cuDNN.

Kernels import only each other and `sparse_attn.masks`: never the seam, the policy or the
model (docs/architecture.md).
"""

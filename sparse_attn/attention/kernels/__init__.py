"""Attention kernels below the seam: block-sparse (pure JAX, CPU, Pallas GPU), Splash, cuDNN.

Kernels import each other, `sparse_attn.masks` and the asset cache (where the CPU kernel
is built): never the seam, the policy or the model (docs/architecture.md).
"""

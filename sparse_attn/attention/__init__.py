"""Attention: the seam every layer calls, the dense reference, the policy, the kernels.

Layout and dependency rule (docs/architecture.md): `model -> seam -> kernels -> masks`;
`policy -> seam, kernels`; kernels never import the seam, the policy or the model (the
platform they choose for comes from `target`, which imports nothing of ours).

  seam.py     `dot_product_attention`, the one executor table `BACKENDS`, 'auto'
  target.py   `platform()` the choices are made for; `target_platform` (trace for another)
  dense.py    the reference and the mask semantics every executor reproduces
  policy.py   `choose` / `calibrated_choice` / `prepare` / `prepare_masks`
  kernels/    blocksparse/ (plan, executor, mask), cpu (compiled CPU kernel), splash, cudnn
"""

from sparse_attn.attention.dense import check_mask_shape, dense_attention, split_mask
from sparse_attn.attention.kernels.blocksparse import BlockSparseMask, attend, make_plan
from sparse_attn.attention.policy import (
    BLOCK_SIZES, COST_MODELS, Choice, CostModel, calibrated_choice, choose, prepare,
    prepare_masks, prepare_with_choice)
from sparse_attn.attention.seam import (
    BACKENDS, dot_product_attention, platform, register_backend, resolve, target_platform)

__all__ = [
    "BACKENDS", "BLOCK_SIZES", "BlockSparseMask", "COST_MODELS", "Choice", "CostModel",
    "attend", "calibrated_choice", "check_mask_shape", "choose", "dense_attention",
    "dot_product_attention", "make_plan", "platform", "prepare", "prepare_masks",
    "prepare_with_choice",
    "register_backend", "resolve", "split_mask", "target_platform",
]

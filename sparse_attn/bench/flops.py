"""Analytic forward FLOPs of the BERT encoder, with the attention term scaled by density."""

from __future__ import annotations


def model_flops(cfg, batch: int, length: int, rho: float = 1.0) -> float:
  """Forward FLOPs of the encoder (+ pooler) on [batch, length] tokens.

  Per layer with h heads of size d_head (hd = h * d_head), hidden d, FFN size f: weight
  matmuls 2 * B * L * (3 * d * hd + hd * d) (QKV + output; none for a layer with no heads)
  plus rho * 4 * B * h * L^2 * d_head (QK^T and PV) plus 2 * B * L * 2 * d * f (FFN); the
  pooler adds 2 * B * d^2. rho = 1 is "dense-equivalent", rho = rho_block "density-scaled".
  A backward pass counts as 2 x forward (callers multiply a train step by 3).
  """
  d, f = cfg.hidden_size, cfg.intermediate_size
  total = 0.0
  for i in range(cfg.num_hidden_layers):
    h = cfg.layer_heads(i)
    hd = h * cfg.head_dim
    if h:
      total += 2 * batch * length * (3 * d * hd + hd * d)        # QKV + output
      total += rho * 4 * batch * h * length ** 2 * cfg.head_dim   # QK^T, PV
    total += 2 * batch * length * 2 * d * f                       # FFN
  return total + 2 * batch * d * d

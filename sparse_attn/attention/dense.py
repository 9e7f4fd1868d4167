"""The dense reference attention: the semantics every other executor must reproduce.

Shape legend: B batch, Q query length, K key length, H heads, D head dim.

Mask semantics (the leaf rules of the mask pytree contract in `sparse_attn.masks.tree`):
  * `mask=None`: dense attention.
  * bool mask, True = may attend.
  * float mask M in [0, 1] (a relaxed mask whose gradient flows): the paper's masked
    softmax, A_ij = M_ij exp(S_ij) / sum_k M_ik exp(S_ik). For M in {0, 1} it equals the
    bool mask exactly; M_ij receives a gradient even where M_ij = 0 (the straight-through
    "what if this entry were kept" signal that learned masks need).
  * `key_valid` [B, K] bool: padding; never attended, exactly zero weight and gradient.

Fully masked query rows (no key may be attended) output exactly zero, with zero gradient,
never NaN; the residual connection around attention then carries the token through.

Masked scores use a finite value (`jnp.finfo(float32).min`) and the softmax runs in float32
whatever the input dtype (float64 for float64 inputs, so that gradients can be checked
against finite differences).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.masks.tree import as_4d

Array = jax.Array


class Dropout(NamedTuple):
  """Attention-weight dropout of one call (training): its PRNG key, rate and pattern.

  `broadcast` shares one keep pattern across batch and heads ([1, 1, Q, K]); executors
  that never build [B, H, Q, K] weights draw their own pattern from `rng` and `rate`.
  """
  rng: Array
  rate: float
  broadcast: bool = True

  def weights_fn(self, b: int, h: int, q: int, k: int) -> Callable[[Array], Array]:
    """The dense reference's dropout on weights [B, H, Q, K] (kept ones scaled 1 / keep)."""
    keep_prob = 1.0 - self.rate
    shape = (1, 1, q, k) if self.broadcast else (b, h, q, k)

    def drop(w):
      keep = jax.random.bernoulli(self.rng, keep_prob, shape)
      return jnp.where(keep, w / keep_prob, 0.0)
    return drop


def check_mask_shape(mask_shape: tuple[int, ...], b: int, h: int, q: int, k: int) -> None:
  """Raises ValueError unless a mask of `mask_shape` broadcasts to [B, H, Q, K].

  Accepted leaf shapes: [Q, K], [H, Q, K], [B|1, H|1, Q, K].
  """
  target = (b, h, q, k)
  ok = 2 <= len(mask_shape) <= 4 and all(
      m in (1, t) for m, t in zip(mask_shape[::-1], target[::-1]))
  if len(mask_shape) == 3 and mask_shape[0] not in (1, h):
    ok = False
  if not ok:
    raise ValueError(
        f"Attention mask of shape {tuple(mask_shape)} cannot broadcast to "
        f"[B, H, Q, K] = {target}. Use [Q, K], [H, Q, K] or [B|1, H|1, Q, K] "
        "(a per-example mask without heads is [B, 1, Q, K]).")


def check_mask_dtype(mask: Array) -> None:
  """Raises ValueError unless a mask leaf is bool or floating."""
  if mask.dtype != jnp.bool_ and not jnp.issubdtype(mask.dtype, jnp.floating):
    raise ValueError(f"Attention mask dtype {mask.dtype} is neither bool (True = may "
                     "attend) nor floating (a relaxed mask in [0, 1]).")


def split_mask(mask: Array | None, key_valid: Array | None
               ) -> tuple[Array | None, Array | None]:
  """Splits a (checked) mask leaf and the padding into what the reference consumes.

  Args:
    mask: None, or a bool / float leaf broadcastable to [B, H, Q, K].
    key_valid: [B, K] bool (False = padding) or None.

  Returns:
    (keep, scale): `keep` bool [B|1, H|1, Q|1, K] (bool mask AND padding) or None;
    `scale` float [B|1, H|1, Q, K] (a relaxed mask, at least float32) or None.
  """
  keep, scale = None, None
  if mask is not None:
    check_mask_dtype(mask)
    mask = as_4d(mask)
    if mask.dtype == jnp.bool_:
      keep = mask
    else:
      scale = mask.astype(jnp.promote_types(mask.dtype, jnp.float32))
  if key_valid is not None:
    kv = key_valid.astype(jnp.bool_)[:, None, None, :]
    keep = kv if keep is None else jnp.logical_and(keep, kv)
  return keep, scale


def dense_attention(q_BxQxHxD: Array, k_BxKxHxD: Array, v_BxKxHxD: Array, *,
                    keep: Array | None, scale: Array | None, bias: Array | None,
                    dropout_fn: Callable[[Array], Array] | None = None,
                    precision: Any = None) -> Array:
  """XLA reference: materialises the [B, H, Q, K] scores; differentiable; runs anywhere.

  Args:
    q_BxQxHxD, k_BxKxHxD, v_BxKxHxD: queries, keys, values.
    keep: bool broadcastable to [B, H, Q, K] or None.
    scale: float mask in [0, 1] broadcastable to [B, H, Q, K] or None.
    bias: additive float bias broadcastable to [B, H, Q, K] or None.
    dropout_fn: applied to the attention weights (training) or None.

  Returns:
    [B, Q, H, D] attention output, in the dtype of `v`.
  """
  depth = q_BxQxHxD.shape[-1]
  acc = jnp.promote_types(q_BxQxHxD.dtype, jnp.float32)   # float64 stays float64.
  # Head-major operands make both einsums plain batched matmuls (no hidden transposes
  # of the [B, H, Q, K] tensors on CPU).
  q_BxHxQxD = jnp.transpose(q_BxQxHxD, (0, 2, 1, 3)) * jnp.asarray(
      1.0 / np.sqrt(depth), q_BxQxHxD.dtype)
  k_BxHxKxD = jnp.transpose(k_BxKxHxD, (0, 2, 1, 3))
  v_BxHxKxD = jnp.transpose(v_BxKxHxD, (0, 2, 1, 3))
  s_BxHxQxK = jnp.einsum("bhqd,bhkd->bhqk", q_BxHxQxD, k_BxHxKxD, precision=precision,
                         preferred_element_type=acc)
  if bias is not None:
    s_BxHxQxK = s_BxHxQxK + bias.astype(acc)
  neg = jnp.finfo(jnp.float32).min
  if keep is not None:
    s_BxHxQxK = jnp.where(keep, s_BxHxQxK, neg)
  # Subtracting a per-row shift m is numerically exact; its gradient cancels.
  m_BxHxQx1 = jnp.max(s_BxHxQxK, axis=-1, keepdims=True)
  if scale is None:
    # Masked entries give exp(min - max) = 0 exactly, unless the whole row is masked.
    p_BxHxQxK = jnp.exp(s_BxHxQxK - jax.lax.stop_gradient(m_BxHxQx1))
  else:
    # Shift by the largest *weighted* term max(s + log M) so the row sum is >= 1 (no
    # underflow, which would make the division's gradient NaN); rows whose M is all zero
    # fall back to the plain max. Exponents are capped (30 where M > 0: exact for
    # M >= 1e-13; 10 where M = 0, which only bounds the "what if kept" gradient).
    logm = jnp.where(scale > 0, jnp.log(jnp.where(scale > 0, scale, 1.0)), -jnp.inf)
    mw_BxHxQx1 = jnp.max(s_BxHxQxK + logm, axis=-1, keepdims=True)
    shift_BxHxQx1 = jax.lax.stop_gradient(
        jnp.where(jnp.isfinite(mw_BxHxQx1), mw_BxHxQx1, m_BxHxQx1))
    t_BxHxQxK = jnp.minimum(s_BxHxQxK - shift_BxHxQx1, jnp.where(scale > 0, 30.0, 10.0))
    p_BxHxQxK = jnp.exp(t_BxHxQxK) * scale
  z_BxHxQx1 = jnp.sum(p_BxHxQxK, axis=-1, keepdims=True)
  if dropout_fn is not None:  # Dropout is linear in the weights: apply before 1 / z.
    p_BxHxQxK = dropout_fn(p_BxHxQxK)
  # Normalising the [B, H, Q, D] output instead of the [B, H, Q, K] weights saves a pass.
  o_BxHxQxD = jnp.einsum("bhqk,bhkd->bhqd", p_BxHxQxK.astype(v_BxKxHxD.dtype), v_BxHxKxD,
                         precision=precision, preferred_element_type=acc)
  o_BxHxQxD = o_BxHxQxD / jnp.where(z_BxHxQx1 > 0, z_BxHxQx1, 1.0)
  if keep is not None:
    # A fully masked row has every score at the same finite minimum (max = min): its
    # output is exactly 0, and so is its gradient.
    o_BxHxQxD = jnp.where(m_BxHxQx1 > 0.5 * neg, o_BxHxQxD, 0.0)
  return jnp.transpose(o_BxHxQxD, (0, 2, 1, 3)).astype(v_BxKxHxD.dtype)

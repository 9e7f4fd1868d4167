"""The attention seam: one masked dot-product attention with switchable backends.

Every attention computation in the library goes through `dot_product_attention`, whose
signature matches `flax.linen.dot_product_attention` (so it can be passed as a linen
`attention_fn`) plus keyword-only extras: `key_valid` (padding) and `backend`.

Shape legend: B batch, Q query length, K key length, H heads, D head dim.

Mask semantics (the mask pytree contract, ARCHITECTURE.md):
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

import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# A backend computes attention given the normalised inputs below; later backends
# (block-sparse, Splash on TPU, cuDNN on GPU) register here and must match 'dense'.
BACKENDS: dict[str, Callable[..., Array]] = {}
# Backends living in other modules, imported on first use.
_LAZY_BACKENDS = {"blocksparse": "sparse_attn.blocksparse", "auto": "sparse_attn.accel",
                  "splash": "sparse_attn.accel", "cudnn": "sparse_attn.accel"}


def register_backend(name: str):
  """Decorator registering an attention backend under `name`."""
  def wrap(fn):
    BACKENDS[name] = fn
    return fn
  return wrap


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


def _combine_keep(mask: Array | None, key_valid: Array | None, b: int, h: int,
                  q: int, k: int) -> tuple[Array | None, Array | None]:
  """Splits a mask into a bool `keep` [..,Q,K] and a float `scale` [..,Q,K] (or None)."""
  keep, scale = None, None
  if mask is not None:
    check_mask_shape(mask.shape, b, h, q, k)
    if mask.ndim < 4:
      mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.dtype == jnp.bool_:
      keep = mask
    elif jnp.issubdtype(mask.dtype, jnp.floating):
      scale = mask.astype(jnp.promote_types(mask.dtype, jnp.float32))
    else:
      raise ValueError(f"Attention mask dtype {mask.dtype} is neither bool (True = may "
                       "attend) nor floating (a relaxed mask in [0, 1]).")
  if key_valid is not None:
    if key_valid.shape != (b, k):
      raise ValueError(f"key_valid has shape {key_valid.shape}; expected [B, K] = {(b, k)}.")
    kv = key_valid.astype(jnp.bool_)[:, None, None, :]
    keep = kv if keep is None else jnp.logical_and(keep, kv)
  return keep, scale


@register_backend("dense")
def dense_attention(q_BxQxHxD: Array, k_BxKxHxD: Array, v_BxKxHxD: Array, *,
                    keep: Array | None, scale: Array | None, bias: Array | None,
                    dropout_fn: Callable[[Array], Array] | None,
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


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = True,
    einsum_dot_general: Any = None,
    qk_attn_weights_einsum: Any = None,
    attn_weights_value_einsum: Any = None,
    *,
    key_valid: Array | None = None,
    backend: str = "dense",
) -> Array:
  """Masked multi-head dot-product attention (signature of flax's).

  Args:
    query: [B, Q, H, D] queries.
    key: [B, K, H, D] keys.
    value: [B, K, H, D] values.
    bias: optional additive bias broadcastable to [B, H, Q, K].
    mask: optional structural mask broadcastable to [B, H, Q, K]: bool (True = may
      attend) or float in [0, 1] (relaxed; see the module docstring). Shapes [Q, K],
      [H, Q, K] or [B|1, H|1, Q, K]. Block-sparse mask objects are accepted by the
      backends that execute them.
    broadcast_dropout: share the dropout pattern across the batch and heads.
    dropout_rng: PRNG key for attention dropout.
    dropout_rate: attention-weight dropout rate.
    deterministic: disables dropout.
    dtype: output dtype (defaults to the dtype of `query`).
    precision: matmul precision.
    module, force_fp32_for_softmax, einsum_dot_general, qk_attn_weights_einsum,
      attn_weights_value_einsum: accepted for signature compatibility; the softmax
      always runs in float32 and the einsums are the backend's own.
    key_valid: [B, K] bool, False for padding keys.
    backend: a key of `BACKENDS` ('dense' is the reference).

  Returns:
    [B, Q, H, D] attention output.
  """
  del module, force_fp32_for_softmax, einsum_dot_general
  del qk_attn_weights_einsum, attn_weights_value_einsum
  if query.ndim != 4 or key.shape != value.shape or query.shape[-1] != key.shape[-1]:
    raise ValueError(f"Expected query [B,Q,H,D], key/value [B,K,H,D]; got {query.shape}, "
                     f"{key.shape}, {value.shape}.")
  if backend not in BACKENDS and backend in _LAZY_BACKENDS:
    importlib.import_module(_LAZY_BACKENDS[backend])  # Registers itself on import.
  if backend not in BACKENDS:
    raise ValueError(f"Unknown attention backend {backend!r}; known: {sorted(BACKENDS)}.")
  b, q, h, _ = query.shape
  k = key.shape[1]
  dropout_fn = None
  if dropout_rate > 0.0 and not deterministic:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 in training mode needs a dropout_rng.")
    keep_prob = 1.0 - dropout_rate
    shape = (1, 1, q, k) if broadcast_dropout else (b, h, q, k)

    def dropout_fn(w):
      keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
      return jnp.where(keep, w / keep_prob, 0.0)

  if hasattr(mask, "execute"):  # A block-sparse mask object: its backend runs it.
    # Executors that never build [B, H, Q, K] weights draw their own dropout from the rng.
    out = mask.execute(query, key, value, key_valid=key_valid, bias=bias,
                       dropout_fn=dropout_fn, precision=precision, backend=backend,
                       dropout_rng=dropout_rng if dropout_fn is not None else None,
                       dropout_rate=dropout_rate if dropout_fn is not None else 0.0)
  else:
    keep, scale = _combine_keep(mask, key_valid, b, h, q, k)
    out = BACKENDS[backend](query, key, value, keep=keep, scale=scale, bias=bias,
                            dropout_fn=dropout_fn, precision=precision)
  return out.astype(dtype or query.dtype)

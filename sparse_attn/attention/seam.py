"""The attention seam: one masked dot-product attention and the one table of executors.

Every attention computation in the library goes through `dot_product_attention`, whose
signature matches `flax.linen.dot_product_attention` (so it can be passed as a linen
`attention_fn`) plus keyword-only extras: `key_valid` (padding) and `backend`. A call runs
in four steps (docs/architecture.md draws them):

1. validation: query / key / value shapes, the backend's name, the dropout rng, the mask
   leaf (a bool or float array broadcastable to [B, H, Q, K], or a `BlockSparseMask` built
   for Q x K) and `key_valid` [B, K];
2. dropout: a `dense.Dropout` (rng, rate) when training with `dropout_rate > 0`;
3. `resolve`: 'auto' becomes a named executor (a `BlockSparseMask` runs on the executor
   the policy chose for it, `preferred`; arrays run on cuDNN for unmasked half-precision
   calls without dropout on GPU, padded or not, on the dense reference otherwise);
   "on GPU" means `platform()`: the running backend, or the platform named by
   `with target_platform(...)` (`target.py`) while a function is traced for another
   platform (`sparse_attn.lowering` exports the steps that way);
4. `BACKENDS[name](query, key, value, mask=, key_valid=, bias=, dropout=, precision=)`.

The executors (each must equal 'dense' on the same mask; tests/test_backend_contract.py
checks every registered one):
  * 'dense': the reference (`dense.py`); a `BlockSparseMask` runs as its element mask.
  * 'blocksparse': `kernels.blocksparse` (the compiled CPU kernel on CPU and the Pallas
    GPU kernel, `kernels.gpu`, on CUDA where they apply; the pure-JAX executor else).
  * 'splash': TPU Splash attention; dropout and per-example layouts run 'blocksparse'.
  * 'cudnn': GPU cuDNN flash attention for no mask, a full layout or one local window;
    key padding runs on cuDNN as sequence lengths when it is right padding (checked on
    the device per call, the reference otherwise); anything else runs 'blocksparse'.
The block-sparse executors run `BlockSparseMask` objects: a layer without a mask (or with
one that only restricts keys, [..., 1, K]) runs the reference, and a structural array mask
is refused with the way out (`prepare` it, outside jit).

Shape legend: B batch, Q query length, K key length, H heads, D head dim.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparse_attn.attention import dense
from sparse_attn.attention.kernels import cudnn, splash
from sparse_attn.attention.kernels.blocksparse import executor as blocksparse_executor
from sparse_attn.attention.kernels.blocksparse.mask import BlockSparseMask
from sparse_attn.attention.kernels.blocksparse.plan import check_layout
from sparse_attn.attention.target import platform, target_platform  # Re-exported.

Array = jax.Array
# An executor: (query [B,Q,H,D], key, value [B,K,H,D], *, mask: None | Array |
# BlockSparseMask, key_valid: [B,K] | None, bias: Array | None, dropout: dense.Dropout |
# None, precision) -> [B, Q, H, D].
Executor = Callable[..., Array]

BACKENDS: dict[str, Executor] = {}
AUTO = "auto"   # Not an executor: `resolve` turns it into one per call.


def register_backend(name: str) -> Callable[[Executor], Executor]:
  """Decorator registering an attention executor under `name` (see the module docstring
  for its signature); `dot_product_attention(..., backend=name)` then runs it."""
  if name == AUTO:
    raise ValueError("'auto' is resolved per call and cannot be registered.")

  def wrap(fn):
    BACKENDS[name] = fn
    return fn
  return wrap


def _cudnn_unmasked(query: Array, mask, key_valid, bias, dropout) -> bool:
  """An unmasked call cuDNN runs (key padding allowed: `cudnn.attend_padded`)."""
  del key_valid
  return (mask is None and bias is None and dropout is None
          and platform() == "gpu" and cudnn.supported(query.dtype, query.shape[-1]))


def resolve(backend: str, mask: Any, query: Array, *, key_valid: Array | None = None,
            bias: Array | None = None, dropout: dense.Dropout | None = None) -> str:
  """The executor a call runs: `backend` itself, or what 'auto' means for this call.

  Args:
    backend: 'auto' or a key of `BACKENDS`.
    mask: the call's mask (None, an array, or a `BlockSparseMask`).
    query: [B, Q, H, D] (its dtype and head size decide cuDNN eligibility).
    key_valid, bias, dropout: the call's padding, bias and dropout.
  """
  if backend != AUTO:
    return backend
  if isinstance(mask, BlockSparseMask):
    return mask.preferred
  if _cudnn_unmasked(query, mask, key_valid, bias, dropout):
    return "cudnn"
  return "dense"


@register_backend("dense")
def _dense(query, key, value, *, mask, key_valid, bias, dropout, precision):
  if isinstance(mask, BlockSparseMask):
    mask = mask.element_mask()
  keep, scale = dense.split_mask(mask, key_valid)
  b, q, h, _ = query.shape
  drop = None if dropout is None else dropout.weights_fn(b, h, q, key.shape[1])
  return dense.dense_attention(query, key, value, keep=keep, scale=scale, bias=bias,
                               dropout_fn=drop, precision=precision)


def _without_object(name, query, key, value, *, mask, key_valid, bias, dropout, precision):
  """A block-sparse executor called without a mask object: a dense layer (no mask, or
  one that only restricts keys, [..., 1, K]) runs the reference; a structural array is
  refused, since its layout must be built on the host."""
  if mask is not None and (mask.dtype != jnp.bool_ or mask.shape[-2] != 1):
    raise ValueError(
        f"backend={name!r} executes block-sparse mask objects: wrap the bool mask with "
        "`attention.BlockSparseMask.from_mask(mask, block_size)` (or `attention.prepare`) "
        "outside jit; array (and float) masks run on backend='dense'.")
  return _dense(query, key, value, mask=mask, key_valid=key_valid, bias=bias,
                dropout=dropout, precision=precision)


def _refuse_bias(name: str, bias: Array | None) -> None:
  if bias is not None:
    raise ValueError(f"The {name!r} attention executor takes no additive bias; use "
                     "backend='dense' for biased attention.")


@register_backend("blocksparse")
def _blocksparse(query, key, value, *, mask, key_valid, bias, dropout, precision):
  if not isinstance(mask, BlockSparseMask):
    return _without_object("blocksparse", query, key, value, mask=mask,
                           key_valid=key_valid, bias=bias, dropout=dropout,
                           precision=precision)
  _refuse_bias("blocksparse", bias)
  rng, rate = (None, 0.0) if dropout is None else (dropout.rng, dropout.rate)
  return blocksparse_executor.attend(mask.plan, query, key, value, gmasks=mask.gmasks,
                                     key_valid=key_valid, dropout_rng=rng,
                                     dropout_rate=rate)


@register_backend("splash")
def _splash(query, key, value, *, mask, key_valid, bias, dropout, precision):
  if not isinstance(mask, BlockSparseMask):
    return _without_object("splash", query, key, value, mask=mask, key_valid=key_valid,
                           bias=bias, dropout=dropout, precision=precision)
  _refuse_bias("splash", bias)
  if splash.applies(mask, 0.0 if dropout is None else dropout.rate):
    return splash.attend(mask, query, key, value, key_valid=key_valid)
  return _blocksparse(query, key, value, mask=mask, key_valid=key_valid, bias=None,
                      dropout=dropout, precision=precision)


@register_backend("cudnn")
def _cudnn(query, key, value, *, mask, key_valid, bias, dropout, precision):
  if _cudnn_unmasked(query, mask, key_valid, bias, dropout):
    if key_valid is None:
      return cudnn.attend_unmasked(query, key, value)
    return cudnn.attend_padded(query, key, value, key_valid, lambda: _dense(
        query, key, value, mask=None, key_valid=key_valid, bias=None, dropout=None,
        precision=precision))
  if not isinstance(mask, BlockSparseMask):
    return _without_object("cudnn", query, key, value, mask=mask, key_valid=key_valid,
                           bias=bias, dropout=dropout, precision=precision)
  _refuse_bias("cudnn", bias)
  if dropout is None and platform() == "gpu":
    out = cudnn.attend(mask, query, key, value, key_valid=key_valid)
    if out is not None:
      return out
  return _blocksparse(query, key, value, mask=mask, key_valid=key_valid, bias=None,
                      dropout=dropout, precision=precision)


def _check_qkv(query: Array, key: Array, value: Array) -> None:
  if query.ndim != 4 or key.shape != value.shape or query.shape[-1] != key.shape[-1]:
    raise ValueError(f"Expected query [B,Q,H,D], key/value [B,K,H,D]; got {query.shape}, "
                     f"{key.shape}, {value.shape}.")


def _check_mask(query: Array, key: Array, mask: Any, key_valid: Array | None) -> None:
  b, q, h, _ = query.shape
  k = key.shape[1]
  if isinstance(mask, BlockSparseMask):
    check_layout(mask.layout, b, q, k, h)
  elif mask is not None:
    dense.check_mask_shape(mask.shape, b, h, q, k)
    dense.check_mask_dtype(mask)
  if key_valid is not None and key_valid.shape != (b, k):
    raise ValueError(f"key_valid has shape {key_valid.shape}; expected [B, K] = {(b, k)}.")


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | BlockSparseMask | None = None,
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
    bias: optional additive bias broadcastable to [B, H, Q, K] (dense executor only).
    mask: optional structural mask broadcastable to [B, H, Q, K]: bool (True = may
      attend) or float in [0, 1] (relaxed; see `dense`), of shape [Q, K], [H, Q, K] or
      [B|1, H|1, Q, K]; or a `BlockSparseMask`, which every executor accepts.
    broadcast_dropout: share the dropout pattern across the batch and heads.
    dropout_rng: PRNG key for attention dropout.
    dropout_rate: attention-weight dropout rate.
    deterministic: disables dropout.
    dtype: output dtype (defaults to the dtype of `query`).
    precision: matmul precision.
    module, force_fp32_for_softmax, einsum_dot_general, qk_attn_weights_einsum,
      attn_weights_value_einsum: accepted for signature compatibility; the softmax
      always runs in float32 and the einsums are the executor's own.
    key_valid: [B, K] bool, False for padding keys.
    backend: 'auto' or a key of `BACKENDS` ('dense' is the reference).

  Returns:
    [B, Q, H, D] attention output.
  """
  del module, force_fp32_for_softmax, einsum_dot_general
  del qk_attn_weights_einsum, attn_weights_value_einsum
  _check_qkv(query, key, value)
  if backend != AUTO and backend not in BACKENDS:
    raise ValueError(f"Unknown attention backend {backend!r}; known: "
                     f"{sorted([AUTO, *BACKENDS])}.")
  dropout = None
  if dropout_rate > 0.0 and not deterministic:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 in training mode needs a dropout_rng.")
    dropout = dense.Dropout(dropout_rng, float(dropout_rate), broadcast_dropout)
  _check_mask(query, key, mask, key_valid)
  name = resolve(backend, mask, query, key_valid=key_valid, bias=bias, dropout=dropout)
  if name not in BACKENDS:   # Only a mask object's `preferred` can name an unknown one.
    raise ValueError(f"Unknown executor {name!r} for a block-sparse mask (its `preferred`); "
                     f"use one of {sorted(BACKENDS)}.")
  out = BACKENDS[name](query, key, value, mask=mask, key_valid=key_valid, bias=bias,
                       dropout=dropout, precision=precision)
  return out.astype(dtype or query.dtype)

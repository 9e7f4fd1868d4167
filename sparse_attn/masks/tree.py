"""The mask pytree contract, in one place: `normalize`, `as_4d` and the one `density`.

A run's structural masks travel as a pytree, one entry per encoder layer:

- `None` means dense attention for that layer (a whole pytree of `None` = a dense model).
- A leaf is a **bool** array (True = may attend) or a **float** array in [0, 1] (a relaxed,
  learned mask; gradients flow through it). Leaves broadcast to [B, H, Q, K]; the common
  shapes are [Q, K], [H, Q, K] and [B|1, H|1, Q, K]. `schedule.check_leaf` checks one.
- A leaf may instead be a block-sparse mask object (`sparse_attn.attention.BlockSparseMask`,
  a registered pytree with a static block layout and partial-tile element masks), which
  the block-sparse executors run without touching empty tiles; the dense reference gives
  the same numbers for it.
- The padding mask is combined inside the model; structural masks never hold padding.
- A query row with no key kept gives a zero output and a zero gradient, never NaN.
- Layers whose attention sublayer is pruned are absent from the computation.

Containers: a tuple/list with one entry per layer, a dict {"layer_i": leaf} (absent layers
are dense), or one leaf shared by every layer; `normalize` turns each into the tuple.

Densities come in two accountings, both from `density`: over the *valid* (non-padding)
(query, key) pairs of each example (with `valid_BxL`; what training logs and evaluation
reports as `attention_density`), and over the whole n x n matrix (without it; SparseBERT's
accounting, what exported metadata calls `element_density`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def normalize(masks: Any, num_layers: int) -> tuple[Any, ...]:
  """Turns a mask pytree into a tuple with one entry (None or a leaf) per layer.

  Args:
    masks: None; one leaf (shared by all layers); a tuple/list of length `num_layers`;
      or a dict {"layer_i": leaf} (missing layers are dense).
    num_layers: number of encoder layers.

  Returns:
    A tuple of length `num_layers`.
  """
  if masks is None:
    return (None,) * num_layers
  if isinstance(masks, Mapping):
    valid = {f"layer_{i}" for i in range(num_layers)}
    unknown = sorted(set(masks) - valid)
    if unknown:
      raise ValueError(f"Mask pytree has keys {unknown} that name no layer; this model has "
                       f"layers layer_0 .. layer_{num_layers - 1}.")
    return tuple(masks.get(f"layer_{i}") for i in range(num_layers))
  if isinstance(masks, (tuple, list)):
    if len(masks) != num_layers:
      raise ValueError(f"Mask pytree has {len(masks)} per-layer entries but the model has "
                       f"{num_layers} layers; give one entry (None = dense) per layer, or "
                       "a single array shared by all layers.")
    return tuple(masks)
  return (masks,) * num_layers


def as_4d(m: Any) -> Any:
  """A leaf of 2 to 4 dims ([Q, K], [H, Q, K], [B, H, Q, K]) as [B|1, H|1, Q, K].

  Works on numpy and JAX arrays alike (a reshape, no copy); a 4-D leaf is returned as is.
  """
  if m.ndim >= 4:
    return m
  return m.reshape((1,) * (4 - m.ndim) + tuple(m.shape))  # The one pad-to-4-D reshape.


def density(mask: Any, valid_BxL: Any = None) -> Any:
  """Per example, the fraction of (query, key) pairs a mask leaf keeps, averaged over heads.

  Args:
    mask: a leaf broadcastable to [B, H, L, L] (bool, or float in [0, 1]: a relaxed mask
      counts its values, i.e. its expected density), numpy or JAX.
    valid_BxL: [B, L] bool, True for real tokens: the density over each example's valid
      pairs. None: over the whole L x L matrix (every pair counts).

  Returns:
    [B] float (B = 1 without `valid_BxL` unless the mask is per example): for each example,
    sum over heads and valid pairs of the mask / (heads x valid pairs); 0 for an example
    without a valid token. numpy in, numpy (float64) out; JAX in, JAX (float32) out.
  """
  xp = np if isinstance(mask, np.ndarray) and not _is_jax(valid_BxL) else _jnp()
  m = as_4d(xp.asarray(mask))
  m = m.astype(xp.float64 if xp is np else xp.float32)
  heads, n = m.shape[1], m.shape[-1]
  if valid_BxL is None:
    return xp.sum(m, axis=(1, 2, 3)) / (heads * n * n)
  valid = xp.asarray(valid_BxL).astype(bool)
  pairs_Bx1xLxL = (valid[:, None, :, None] & valid[:, None, None, :]).astype(m.dtype)
  kept_B = xp.sum(m * pairs_Bx1xLxL, axis=(1, 2, 3))
  return kept_B / (heads * xp.maximum(xp.sum(pairs_Bx1xLxL, axis=(1, 2, 3)), 1))


def _is_jax(x: Any) -> bool:
  return x is not None and not isinstance(x, np.ndarray) and hasattr(x, "shape")


def _jnp():
  import jax.numpy as jnp  # Only when a JAX value is involved: masks/ stays numpy-first.
  return jnp


def combine(fixed: Any, learned: Any, mode: str = "and") -> tuple | None:
  """Per layer, a fixed mask combined with a learned one.

  Args:
    fixed, learned: per-layer mask tuples (None entries = no mask) or None.
    mode: "and" (the learned mask within the fixed one, e.g. no diagonal) or "or" (the
      fixed links always kept in addition, e.g. global [CLS] links). Float learned masks
      are multiplied ("and") or maxed ("or") with the fixed {0, 1} mask.

  Returns:
    A per-layer tuple, or None.
  """
  if mode not in ("and", "or"):
    raise ValueError(f"masks.combine must be 'and' or 'or', got {mode!r}.")
  if fixed is None:
    return learned
  if learned is None:
    return fixed
  jnp = _jnp()
  out = []
  for f, l in zip(fixed, learned):
    if l is None:  # Layers without a learned mask keep the fixed one (or stay dense).
      out.append(f)
    elif f is None:
      out.append(l)
    elif jnp.issubdtype(jnp.asarray(l).dtype, jnp.floating):
      f = jnp.asarray(f, l.dtype)
      out.append(l * f if mode == "and" else jnp.maximum(l, f))
    else:
      out.append(jnp.logical_and(f, l) if mode == "and" else jnp.logical_or(f, l))
  return tuple(out)


def slice_to(masks: Any, length: int) -> tuple | None:
  """Cuts every [..., n, n] leaf of a per-layer tuple to [..., length, length] (length <= n).

  Position-indexed masks (windows, DAM's Toeplitz masks, exported masks) are exact under
  this cut: a batch of length L uses the top-left L x L block of the run's n x n mask.
  """
  if masks is None:
    return None
  def cut(m):
    if m is None or m.shape[-1] == length:   # Already at length (or a prepared object).
      return m
    if m.shape[-1] < length:
      raise ValueError(f"A mask of length {m.shape[-1]} cannot serve a batch of length "
                       f"{length}; build masks at data.max_len.")
    return m[..., :length, :length]
  return tuple(cut(m) for m in masks)


def add_sinks(masks: Any, input_ids_BxL: Any, sink_ids: tuple[int, ...]) -> tuple | None:
  """Keeps, in every masked layer, the links from each query to its example's sink tokens.

  Sink tokens (e.g. [SEP]) are Longformer's token-defined global attention, keys only:
  every query may attend to every such token of its example, whatever the mask (BERT heads
  park attention on [SEP] when they have nothing to do, Clark et al. 2019).

  Args:
    masks: per-layer tuple of leaves [..., L, L] (bool or float; None = dense) or None.
    input_ids_BxL: the batch's token ids.
    sink_ids: token ids every query may attend to (() = no change).

  Returns:
    The tuple with masked leaves [B, H|1, L, L]: bool masks OR-ed with the sink columns,
    float masks set to 1 there (so those entries pass no gradient to the mask); dense
    layers stay None.
  """
  if masks is None or not sink_ids:
    return masks
  jnp = _jnp()
  sink_Bx1x1xL = jnp.isin(input_ids_BxL, jnp.asarray(sink_ids))[:, None, None, :]

  def add(m):
    if m is None:
      return None
    m = as_4d(jnp.asarray(m))
    if m.dtype == jnp.bool_:
      return m | sink_Bx1x1xL
    return jnp.where(sink_Bx1x1xL, jnp.ones((), m.dtype), m)  # No gradient at sinks.
  return tuple(add(m) for m in masks)


def resolve_sinks(tokens: Any, tokenizer: Any) -> tuple[int, ...]:
  """Token ids of sink tokens (strings such as "[SEP]") in a tokenizer's vocabulary.

  Args:
    tokens: token strings (`masks.sink_tokens`), or None / () for none.
    tokenizer: anything with `token_to_id(str) -> int | None`.
  """
  ids = []
  for t in tokens or ():
    i = tokenizer.token_to_id(t)
    if i is None:
      raise ValueError(f"masks.sink_tokens: {t!r} is not a token of the vocabulary; use "
                       "exact tokens such as '[SEP]', '[CLS]' or '.'.")
    ids.append(int(i))
  return tuple(ids)


def add_example_masks(masks: Any, example_BxLxL: Any, layers: tuple[int, ...],
                      num_layers: int) -> tuple | None:
  """Applies per-example masks (`sparse_attn.example_masks`) on `layers`.

  Args:
    masks: per-layer tuple of leaves [..., L, L] (None = dense) or None.
    example_BxLxL: the batch's `example_mask`, bool.
    layers: the layers it applies to; a masked one keeps what both masks keep.
    num_layers: the model's layer count.

  Returns:
    The per-layer tuple with [B, H|1, L, L] leaves on `layers`.
  """
  if not layers:
    return masks
  jnp = _jnp()
  ex = jnp.asarray(example_BxLxL, bool)[:, None]
  masks = masks if masks is not None else (None,) * num_layers
  out = []
  for i, m in enumerate(masks):
    if i not in layers:
      out.append(m)
    elif m is None:
      out.append(ex)
    else:
      m = as_4d(jnp.asarray(m))
      out.append(m & ex if m.dtype == jnp.bool_ else jnp.where(ex, m, jnp.zeros((), m.dtype)))
  return tuple(out)

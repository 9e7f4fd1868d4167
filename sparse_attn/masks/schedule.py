"""The per-layer mask pytree: which mask each encoder layer uses, and its validation.

Contract (the model's `masks=` input): `None` = dense attention for that layer; a leaf is a
bool array (True = may attend) or a float array in [0, 1] (a relaxed mask), broadcastable
to [B, H, Q, K] with one of the shapes [Q, K], [H, Q, K] or [B|1, H|1, Q, K]. A per-layer
mask set is a tuple of length L whose entries are None or a leaf. Padding is not part of
these masks; the model combines it.

Shape legend: L layers, B batch, H heads, Q query length, K key length, N = Q = K.
Leaves may be numpy or JAX arrays; `validate` reads only their shape and dtype (so it runs
under `jax.jit`), and checks float values only for concrete numpy arrays.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

MaskTree = Any  # None | leaf | Sequence[None | leaf] | Mapping[str, None | leaf]


def _check_num_layers(num_layers: int) -> int:
  if int(num_layers) != num_layers or num_layers <= 0:
    raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}.")
  return int(num_layers)


def per_layer(mask: Any, num_layers: int,
              layers: Sequence[int] | None = None) -> tuple[Any, ...]:
  """Puts `mask` on the chosen layers and dense attention (None) everywhere else.

  Args:
    mask: one leaf (e.g. mask_NxN or mask_HxNxN), used unchanged on each chosen layer.
    num_layers: L, the number of encoder layers.
    layers: indices in [0, L) that get the mask; None means every layer.

  Returns:
    A tuple of length L with `mask` or None per layer.
  """
  num_layers = _check_num_layers(num_layers)
  chosen = range(num_layers) if layers is None else list(layers)
  bad = [i for i in chosen if int(i) != i or not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"Layer indices {bad} are outside [0, {num_layers}); "
                     f"pass indices of the {num_layers} encoder layers.")
  chosen = set(int(i) for i in chosen)
  return tuple(mask if i in chosen else None for i in range(num_layers))


def later_layers(mask: Any, num_layers: int, start: int) -> tuple[Any, ...]:
  """Breaking BERT's "later layers": `mask` on layers start..L-1, dense below.

  Args:
    mask: one leaf.
    num_layers: L.
    start: first masked layer, 0 <= start <= L (start = L leaves every layer dense).

  Returns:
    A tuple of length L: None for layers < start, `mask` from `start` on.
  """
  num_layers = _check_num_layers(num_layers)
  if int(start) != start or not 0 <= start <= num_layers:
    raise ValueError(f"start must be an integer in [0, {num_layers}], got {start!r}.")
  return per_layer(mask, num_layers, range(int(start), num_layers))


def per_head(masks: Sequence[np.ndarray]) -> np.ndarray:
  """Stacks one mask per head into a per-head leaf.

  Args:
    masks: a non-empty list of H arrays mask_QxK, all of the same shape and dtype.

  Returns:
    mask_HxQxK.
  """
  arrays = [np.asarray(m) for m in masks]
  if not arrays:
    raise ValueError("per_head needs a non-empty list of [Q, K] masks, one per head.")
  shapes = {a.shape for a in arrays}
  dtypes = {a.dtype for a in arrays}
  if len(shapes) != 1 or arrays[0].ndim != 2:
    raise ValueError(f"per_head needs [Q, K] masks of one shape; got shapes "
                     f"{sorted(shapes)}.")
  if len(dtypes) != 1:
    raise ValueError(f"per_head needs masks of one dtype; got {sorted(map(str, dtypes))}.")
  return np.stack(arrays, axis=0)


def is_leaf(x: Any) -> bool:
  """Whether x is a mask leaf rather than a container: it has .shape and .dtype."""
  # Arrays (numpy, JAX, tracers) and array-like mask objects expose shape and dtype.
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_float_dtype(dtype: Any) -> bool:
  dtype = np.dtype(dtype)
  # bfloat16 / float8 (ml_dtypes) are not numpy 'f' kinds but are valid relaxed masks.
  return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def check_leaf(leaf: Any, where: str = "mask", num_heads: int | None = None,
               seq_len: int | None = None) -> None:
  """Raises ValueError if `leaf` is not a valid mask leaf (see the module contract).

  Args:
    leaf: an array with [Q, K], [H, Q, K] or [B, H, Q, K] shape.
    where: a name for the leaf in error messages, e.g. "layer 3".
    num_heads: if given, the head dimension must be 1 or num_heads.
    seq_len: if given, the trailing dimensions must be (seq_len, seq_len); otherwise
      they must at least be equal (self-attention).
  """
  if not is_leaf(leaf):
    raise ValueError(f"{where}: expected None or an array with .shape and .dtype, got "
                     f"{type(leaf).__name__}. Convert lists with np.asarray(..., bool).")
  shape = tuple(leaf.shape)
  if not 2 <= len(shape) <= 4:
    raise ValueError(f"{where}: a mask has 2 to 4 dims ([Q,K], [H,Q,K] or [B,H,Q,K]), "
                     f"got shape {shape}.")
  if seq_len is not None and shape[-2:] != (seq_len, seq_len):
    raise ValueError(f"{where}: trailing dims {shape[-2:]} do not match the sequence "
                     f"length {seq_len}; build the mask at n={seq_len}.")
  if shape[-1] != shape[-2]:
    raise ValueError(f"{where}: self-attention masks are square [..., N, N], got {shape}.")
  if num_heads is not None and len(shape) >= 3 and shape[-3] not in (1, num_heads):
    raise ValueError(f"{where}: head dim is {shape[-3]} but the model has {num_heads} "
                     "heads; use 1 (shared by heads) or one mask per head.")
  dtype = np.dtype(leaf.dtype)
  if dtype != bool and not _is_float_dtype(dtype):
    raise ValueError(f"{where}: dtype {dtype} is neither bool (hard mask) nor float "
                     "(relaxed mask in [0, 1]); use mask.astype(bool).")
  if _is_float_dtype(dtype) and isinstance(leaf, np.ndarray):
    values = leaf.astype(np.float32)
    if not np.all((values >= 0) & (values <= 1)):  # Also catches NaN.
      raise ValueError(f"{where}: float mask values must lie in [0, 1]; found min "
                       f"{values.min()}, max {values.max()} (nan = NaN present).")


def validate(masks: MaskTree, num_layers: int, num_heads: int | None = None,
             seq_len: int | None = None) -> tuple[Any, ...]:
  """Normalises a mask pytree to one entry per layer and checks every leaf.

  Args:
    masks: None (all dense); one leaf (shared by every layer); a tuple/list of length
      L of None-or-leaf; or a dict {"layer_<i>": None-or-leaf} (missing layers dense).
    num_layers: L.
    num_heads: if given, head dims must be 1 or num_heads.
    seq_len: if given, trailing dims must be (seq_len, seq_len).

  Returns:
    A tuple of length L whose entries are None or the (unchanged) leaves.
  """
  num_layers = _check_num_layers(num_layers)
  if masks is None:
    entries: list[Any] = [None] * num_layers
  elif is_leaf(masks):
    entries = [masks] * num_layers
  elif isinstance(masks, Mapping):
    valid_keys = [f"layer_{i}" for i in range(num_layers)]
    unknown = sorted(str(k) for k in masks if k not in valid_keys)
    if unknown:
      raise ValueError(f"Unknown mask keys {unknown}; valid keys are layer_0 .. "
                       f"layer_{num_layers - 1}.")
    entries = [masks.get(k) for k in valid_keys]
  elif isinstance(masks, (tuple, list)):
    if len(masks) != num_layers:
      raise ValueError(f"Got masks for {len(masks)} layers but the model has "
                       f"{num_layers}; give one entry (None = dense) per layer, or a "
                       "single array shared by all layers.")
    entries = list(masks)
  else:
    raise ValueError(f"masks must be None, an array, a tuple/list or a dict, got "
                     f"{type(masks).__name__}.")
  for i, leaf in enumerate(entries):
    if leaf is not None:
      check_leaf(leaf, f"mask of layer {i}", num_heads, seq_len)
  return tuple(entries)

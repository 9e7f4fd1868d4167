"""Mask statistics: element and block density, and multi-layer connectivity.

Shape legend: B batch, H heads, N sequence length (queries = keys), L layers, "..." any
leading dimensions. Masks follow the pytree contract of `schedule`: a leaf is bool or
float in [0, 1] with shape [N, N], [H, N, N] or [B|1, H|1, N, N]; None means dense.

Connectivity follows SparseBERT's diagonal theorem (after Yun et al. 2020): a stack of
attention layers is "connected" when, composing the layers' attention graphs, every output
token depends on every input token. The residual path carries each token's own state
through every layer, so one layer maps dependencies D to D OR (M @ D); with the residual
path, clearing the diagonal of M never changes connectivity, which is why the theorem
allows removing it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparse_attn.masks import schedule
from sparse_attn.masks import tree


def _as_bxhxnxn(mask: Any) -> np.ndarray:
  """Returns the leaf as a float64 array of shape [B|1, H|1, N, N]."""
  schedule.check_leaf(mask)
  m = np.asarray(mask, dtype=np.float64)
  return tree.as_4d(m)


def density(mask: Any, valid: np.ndarray | None = None) -> float:
  """Fraction of valid (query, key) pairs that the mask keeps.

  For each example b, density_b = sum of mask over valid pairs (and heads) / (H * number
  of valid pairs), where a pair (i, j) is valid when valid[b, i] and valid[b, j]. The result
  is the plain mean of density_b over examples with at least one valid token (each example
  counts once, whatever its length). A float mask contributes its values (the expected
  density of a relaxed mask). Without `valid`, every pair is valid, which gives SparseBERT's
  convention 1 - sparsity = mean(mask) over H x N x N.

  Args:
    mask: a leaf, [N, N], [H, N, N] or [B|1, H|1, N, N]; bool or float in [0, 1]; or None
      (dense, density 1).
    valid: optional valid_BxN bool (True = real token, False = padding).

  Returns:
    The density, a Python float in [0, 1].
  """
  if mask is None:
    return 1.0
  m_BxHxNxN = _as_bxhxnxn(mask)
  n = m_BxHxNxN.shape[-1]
  if valid is None:
    valid_BxN = np.ones((m_BxHxNxN.shape[0], n), dtype=bool)
  else:
    valid_BxN = np.asarray(valid)
    if valid_BxN.ndim != 2 or valid_BxN.shape[1] != n or valid_BxN.dtype != bool:
      raise ValueError(f"valid must be a bool [B, {n}] array, got {valid_BxN.dtype} "
                       f"{valid_BxN.shape}.")
    if m_BxHxNxN.shape[0] not in (1, valid_BxN.shape[0]):
      raise ValueError(f"mask batch dim {m_BxHxNxN.shape[0]} does not match valid's "
                       f"{valid_BxN.shape[0]}.")
  has_tokens = valid_BxN.any(axis=-1)
  if not has_tokens.any():
    raise ValueError("density: no example has a valid token (valid is all False).")
  m_BxHxNxN = np.broadcast_to(m_BxHxNxN, (valid_BxN.shape[0],) + m_BxHxNxN.shape[1:])
  return float(np.mean(tree.density(m_BxHxNxN, valid_BxN)[has_tokens]))


def sparsity(mask: Any, valid: np.ndarray | None = None) -> float:
  """1 - density(mask, valid): the fraction of valid pairs the mask removes."""
  return 1.0 - density(mask, valid)


def block_density(mask: Any, block: int) -> float:
  """Fraction of (query block, key block) tiles holding at least one kept entry.

  N need not be a multiple of `block`: the mask is padded with False (masked) to the next
  multiple, so a partial edge tile counts as one tile. A float mask keeps entries > 0.

  Args:
    mask: mask_...xNxN, bool or float.
    block: tile side length (>= 1).

  Returns:
    Occupied tiles / all tiles, over all leading dimensions; a Python float.
  """
  m = np.asarray(mask)
  if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
    raise ValueError(f"block_density needs a square mask [..., N, N], got {m.shape}.")
  if int(block) != block or block < 1:
    raise ValueError(f"block must be a positive integer, got {block!r}.")
  n = m.shape[-1]
  nb = -(-n // block)
  padded = np.zeros(m.shape[:-2] + (nb * block, nb * block), dtype=bool)
  padded[..., :n, :n] = m > 0
  tiles = padded.reshape(m.shape[:-2] + (nb, block, nb, block)).any(axis=(-3, -1))
  return float(tiles.mean())


def pair_weights(lengths: np.ndarray, n: int) -> np.ndarray:
  """[n, n] where a dataset's valid (query, key) pairs sit, each example weighing the same.

  W[i, j] = mean over examples e of 1[i, j < len_e] / len_e^2, so W sums to 1 and
  sum(W * mask) is the mask's density over each example's valid pairs, averaged over the
  examples: the `attention_density` that evaluation reports.

  Args:
    lengths: [E] tokens per example (longer ones count as n).
    n: mask size.
  """
  lens = np.minimum(np.asarray(lengths, np.int64).ravel(), n)
  if lens.size == 0 or lens.min() < 1:
    raise ValueError("pair_weights needs at least one example, each with >= 1 token.")
  per_len = np.bincount(lens, minlength=n + 1) / (lens.size * np.arange(n + 1.0) ** 2
                                                  + (np.arange(n + 1) == 0))
  longer = np.cumsum(per_len[::-1])[::-1][1:]  # [n]: sum over lengths > k of count / m^2.
  idx = np.arange(n)
  return longer[np.maximum(idx[:, None], idx[None, :])]


def per_layer_density(masks: Any, num_layers: int,
                      valid: np.ndarray | None = None) -> np.ndarray:
  """Density of each layer's mask (None = dense counts as 1).

  Args:
    masks: a mask pytree accepted by `schedule.validate`.
    num_layers: L.
    valid: optional valid_BxN bool, as in `density`.

  Returns:
    density_L, float64.
  """
  layers = schedule.validate(masks, num_layers)
  return np.array([density(m, valid) for m in layers], dtype=np.float64)


def _layer_graph(mask: Any, n: int | None) -> np.ndarray | None:
  """Attention graph of one layer as a bool [N, N]: union over heads (heads are mixed
  by the output projection). None (dense) stays None."""
  if mask is None:
    return None
  m = np.asarray(mask)
  schedule.check_leaf(m, seq_len=n)
  if m.ndim == 4 and m.shape[0] != 1:
    raise ValueError(f"is_connected works on one example; got a batch of {m.shape[0]}. "
                     "Call it per example (mask[b]).")
  return (m > 0).reshape((-1,) + m.shape[-2:]).any(axis=0)


def _compose(reach: np.ndarray, graph: np.ndarray | None) -> np.ndarray:
  """One layer with a residual path: D -> D OR (M @ D)."""
  if graph is None:
    return np.ones_like(reach)
  step = (graph.astype(np.float32) @ reach.astype(np.float32)) > 0
  return reach | step


def is_connected(masks_per_layer: Any, s: int | None = None) -> bool:
  """Whether every token depends on every token after the given attention layers.

  Args:
    masks_per_layer: a sequence of per-layer masks (None = dense), each [N, N], [H, N, N]
      or [1, H, N, N]; a single array counts as a one-layer sequence.
    s: number of layers to compose. None uses each given layer once; otherwise layer l
      uses masks_per_layer[l % p] (cycling over the p patterns, as in Yun et al.).

  Returns:
    True if the composed dependency matrix D_NxN is all True.
  """
  layers = [masks_per_layer] if schedule.is_leaf(masks_per_layer) else list(masks_per_layer)
  if not layers:
    raise ValueError("is_connected needs at least one layer mask.")
  sizes = {np.shape(m)[-1] for m in layers if m is not None}
  if len(sizes) > 1:
    raise ValueError(f"Layer masks have different sequence lengths {sorted(sizes)}.")
  if not sizes:
    return True  # Dense layers only.
  n = sizes.pop()
  graphs = [_layer_graph(m, n) for m in layers]
  s = len(graphs) if s is None else s
  if int(s) != s or s < 1:
    raise ValueError(f"s must be a positive number of layers, got {s!r}.")
  reach_NxN = np.eye(n, dtype=bool)
  for layer in range(int(s)):
    reach_NxN = _compose(reach_NxN, graphs[layer % len(graphs)])
  return bool(reach_NxN.all())


def layers_to_connect(mask: Any) -> int | None:
  """Smallest s such that s layers all using `mask` connect every token to every token.

  Equals the diameter of the directed attention graph (every path of length <= s exists
  thanks to the residual path). Adding or removing the diagonal does not change it.

  Args:
    mask: one layer's mask, [N, N], [H, N, N] or [1, H, N, N] (heads are united), or None.

  Returns:
    s >= 1, or None if some token never reaches some other token.
  """
  if mask is None:
    return 1
  graph = _layer_graph(mask, None)
  reach_NxN = np.eye(graph.shape[0], dtype=bool)
  for s in range(1, graph.shape[0] + 1):
    new = _compose(reach_NxN, graph)
    if new.all():
      return s
    if (new == reach_NxN).all():
      return None  # Fixed point short of all-True: some pair is never connected.
    reach_NxN = new
  return None

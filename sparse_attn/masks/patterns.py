"""Fixed sparse-attention patterns: boolean masks built by pure numpy functions.

Every builder returns a bool array, True = query i may attend to key j. Shape legend:
N sequence length (queries and keys alike), H heads, "..." any leading dimensions.
Builders return mask_NxN, or mask_HxNxN when asked for per-head randomness.

The SparseBERT presets at the end reproduce the sparsity ratios of the SparseBERT README
table at N = 128. They are numeric fits, not the authors' stated definitions (which are not
public); see each preset's docstring.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np


def _check_n(n: int) -> int:
  if int(n) != n or n <= 0:
    raise ValueError(f"Sequence length must be a positive integer, got n={n!r}.")
  return int(n)


def _check_count(name: str, value: int, low: int = 0, high: int | None = None) -> int:
  """Checks an integer parameter lies in [low, high]; names the parameter otherwise."""
  if int(value) != value or value < low or (high is not None and value > high):
    bound = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")
  return int(value)


def _offsets(n: int) -> np.ndarray:
  """Returns d_NxN with d[i, j] = i - j (query minus key position)."""
  pos = np.arange(n)
  return pos[:, None] - pos[None, :]


def full(n: int) -> np.ndarray:
  """Dense attention: every query attends to every key. Returns mask_NxN (all True)."""
  return np.ones((_check_n(n), _check_n(n)), dtype=bool)


def window(n: int, k: int | None = None, *, left: int | None = None,
           right: int | None = None) -> np.ndarray:
  """Band (neighbour) mask: query i attends to keys j with -left <= j - i <= right.

  Args:
    n: sequence length N.
    k: symmetric half-width, |i - j| <= k (k = 0 keeps only the diagonal).
    left: keys before the query (i - j <= left); defaults to k.
    right: keys after the query (j - i <= right); defaults to k.

  Returns:
    mask_NxN, bool.
  """
  n = _check_n(n)
  left = k if left is None else left
  right = k if right is None else right
  if left is None or right is None:
    raise ValueError("window needs a half-width k, or both left= and right=.")
  left = _check_count("window left half-width", left)
  right = _check_count("window right half-width", right)
  return _band(n, left, right)


def _band(n: int, left: int, right: int) -> np.ndarray:
  d = _offsets(n)
  return (d <= left) & (-d <= right)


def strided(n: int, stride: int, local: int) -> np.ndarray:
  """Sparse Transformer 'strided' pattern, bidirectional: |i-j| < local or stride | (i-j).

  Args:
    n: sequence length N.
    stride: stride of the long-range component (>= 1).
    local: width of the local band, |i - j| < local (0 disables it; the diagonal stays,
      since (i - i) is a multiple of every stride).

  Returns:
    mask_NxN, bool.
  """
  n = _check_n(n)
  stride = _check_count("stride", stride, 1)
  local = _check_count("local", local)
  d = _offsets(n)
  return (np.abs(d) < local) | (d % stride == 0)


def fixed(n: int, block: int, summary: int = 1) -> np.ndarray:
  """Sparse Transformer 'fixed' pattern, bidirectional: same block, or a summary column.

  Query i attends to key j if i // block == j // block, or if j is one of the last
  `summary` positions of its block (j mod block >= block - summary).

  Args:
    n: sequence length N.
    block: block length (>= 1).
    summary: summary positions per block, 1 <= summary <= block.

  Returns:
    mask_NxN, bool.
  """
  n = _check_n(n)
  block = _check_count("block", block, 1)
  summary = _check_count("summary", summary, 1, block)
  pos = np.arange(n)
  same_block = (pos[:, None] // block) == (pos[None, :] // block)
  summary_col = (pos % block) >= block - summary
  return same_block | summary_col[None, :]


def logsparse(n: int) -> np.ndarray:
  """LogSparse pattern (Li et al. 2019), bidirectional: self, plus keys i ± 2^k, k >= 0.

  Returns:
    mask_NxN, bool.
  """
  n = _check_n(n)
  dist = np.abs(_offsets(n))
  # A positive distance is a power of two iff it has exactly one bit set.
  return (dist == 0) | ((dist & (dist - 1)) == 0)


def block_band(n: int, block: int, widths: int | np.ndarray) -> np.ndarray:
  """A band of whole b x b tiles: query block I attends key blocks J with |I - J| <= K,
  K = ceil(w / b) for an element half-width w (so the band covers |i - j| <= w and is
  rounded up to the tiles it touches along the diagonal).

  Args:
    n: sequence length N.
    block: the tile side b.
    widths: element half-width(s) w >= 0, an int or an int array [...].

  Returns:
    bool mask_...xNxN.
  """
  _check_n(n)
  _check_count("block", block, 1)
  w = np.asarray(widths)
  k = -(-w // block)                                   # ceil(w / b), per head.
  blocks = np.arange(n) // block
  return np.abs(blocks[:, None] - blocks[None, :]) <= k[..., None, None]


def global_tokens(n: int, g: int | Sequence[int]) -> np.ndarray:
  """Global tokens: they attend to every key and every query attends to them.

  Args:
    n: sequence length N.
    g: the number of global tokens (the first g positions), or an explicit list of
      positions (e.g. [0] for [CLS]).

  Returns:
    mask_NxN, bool: True on the rows and columns of the global positions.
  """
  n = _check_n(n)
  if np.ndim(g) == 0:
    idx = np.arange(_check_count("number of global tokens g", g, 0, n))
  else:
    idx = np.asarray(g, dtype=int).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise ValueError(f"Global token positions must lie in [0, {n}), got {idx.tolist()}.")
  mask_NxN = np.zeros((n, n), dtype=bool)
  mask_NxN[idx, :] = True
  mask_NxN[:, idx] = True
  return mask_NxN


def random(n: int, r: int, seed: int, num_heads: int | None = None) -> np.ndarray:
  """r uniformly random keys per query row (without replacement), reproducible by seed.

  The draw is np.random.default_rng(seed).random(...) followed by a stable argsort, so a
  seed gives the same mask on every platform. The query itself may be among the r keys.

  Args:
    n: sequence length N.
    r: random keys per query, 0 <= r <= N.
    seed: integer seed.
    num_heads: if given, an independent draw per head.

  Returns:
    mask_NxN, or mask_HxNxN if num_heads is given; bool, exactly r True per row.
  """
  n = _check_n(n)
  r = _check_count("random keys per row r", r, 0, n)
  h = 1 if num_heads is None else _check_count("num_heads", num_heads, 1)
  scores_HxNxN = np.random.default_rng(seed).random((h, n, n))
  keys_HxNxR = np.argsort(scores_HxNxN, axis=-1, kind="stable")[..., :r]
  mask_HxNxN = np.zeros((h, n, n), dtype=bool)
  np.put_along_axis(mask_HxNxN, keys_HxNxR, True, axis=-1)
  return mask_HxNxN[0] if num_heads is None else mask_HxNxN


_window, _global = window, global_tokens


def longformer(n: int, window: int | None = None, global_tokens: int | Sequence[int] = 1, *,
               left: int | None = None, right: int | None = None) -> np.ndarray:
  """Longformer: sliding window plus global tokens.

  Args:
    n: sequence length N.
    window: symmetric half-width of the sliding window (or give left= and right=).
    global_tokens: number of leading global tokens, or their positions.
    left, right: asymmetric half-widths (see `window`).

  Returns:
    mask_NxN, bool.
  """
  # Parameters shadow the module's `window` / `global_tokens`, hence the _window alias.
  return _window(n, window, left=left, right=right) | _global(n, global_tokens)


def bigbird(n: int, window: int, global_tokens: int | Sequence[int], random_keys: int,
            seed: int, num_heads: int | None = None) -> np.ndarray:
  """BigBird (token level): window |i-j| <= window, global tokens, random keys per row.

  Args:
    n: sequence length N.
    window: symmetric half-width of the sliding window.
    global_tokens: number of leading global tokens, or their positions.
    random_keys: random keys per query row (see `random`).
    seed: seed of the random part.
    num_heads: if given, the random part is drawn independently per head.

  Returns:
    mask_NxN, or mask_HxNxN if num_heads is given; bool.
  """
  band = _window(n, window) | _global(n, global_tokens)
  return band | random(n, random_keys, seed, num_heads)


def star(n: int, global_tokens: int | Sequence[int] = 1) -> np.ndarray:
  """Star-Transformer: neighbours |i-j| <= 1 plus global (relay) tokens. Returns mask_NxN."""
  return window(n, 1) | _global(n, global_tokens)


def _check_bool_masks(masks: Sequence[np.ndarray], op: str) -> list[np.ndarray]:
  if not masks:
    raise ValueError(f"{op} needs at least one mask.")
  arrays = [np.asarray(m) for m in masks]
  for i, m in enumerate(arrays):
    if m.dtype != bool:
      raise ValueError(f"{op}: mask {i} has dtype {m.dtype}; pass bool masks "
                       "(e.g. m > 0.5 for a relaxed float mask).")
  return arrays


def union(*masks: np.ndarray) -> np.ndarray:
  """Elementwise OR of bool masks; shapes broadcast (e.g. [N,N] with [H,N,N])."""
  return np.logical_or.reduce(np.broadcast_arrays(*_check_bool_masks(masks, "union")))


def intersect(*masks: np.ndarray) -> np.ndarray:
  """Elementwise AND of bool masks; shapes broadcast (e.g. [N,N] with [H,N,N])."""
  return np.logical_and.reduce(np.broadcast_arrays(*_check_bool_masks(masks, "intersect")))


def remove_diagonal(mask: np.ndarray) -> np.ndarray:
  """Forbids every query from attending to itself (SparseBERT: M' = M AND NOT I).

  Args:
    mask: mask_...xNxN, bool or float (a float mask gets 0 on the diagonal).

  Returns:
    A new array of the same shape and dtype with the diagonal cleared.
  """
  mask = np.asarray(mask)
  if mask.ndim < 2 or mask.shape[-1] != mask.shape[-2]:
    raise ValueError(f"remove_diagonal needs a square mask [..., N, N], got {mask.shape}.")
  out = mask.copy()
  diag = np.arange(mask.shape[-1])
  out[..., diag, diag] = False if mask.dtype == bool else 0
  return out


# SparseBERT baselines at N = 128. Sparsity = 1 - mean(mask) over the 128 x 128 matrix,
# diagonal counted (the README convention). Fitted by a search over each family's
# parameters; the README numbers are in SPARSEBERT_README_SPARSITY.
SPARSEBERT_PARAMS: dict[str, tuple[str, dict]] = {
    "strided": ("strided", dict(stride=4, local=4)),
    "fixed": ("fixed", dict(block=32, summary=1)),
    "longformer": ("longformer", dict(left=3, right=9, global_tokens=1)),
    "logsparse": ("logsparse", dict()),
    "bigbird": ("bigbird", dict(window=1, global_tokens=2, random_keys=2, seed=22)),
    "star": ("star", dict(global_tokens=1)),
}
SPARSEBERT_README_SPARSITY: dict[str, float] = {
    "strided": 70.4, "fixed": 72.7, "longformer": 88.7, "logsparse": 89.8,
    "bigbird": 93.2, "star": 96.1}


def _preset(name: str, n: int, overrides: dict) -> np.ndarray:
  pattern, params = SPARSEBERT_PARAMS[name]
  return build(pattern, n, **{**params, **overrides})


def sparsebert_strided(n: int = 128, **overrides) -> np.ndarray:
  """SparseBERT 'Strided' baseline: strided(stride=4, local=4). Numeric fit, not the
  authors' stated definition: 70.39 % sparsity at N = 128 (README 70.4). Returns mask_NxN."""
  return _preset("strided", n, overrides)


def sparsebert_fixed(n: int = 128, **overrides) -> np.ndarray:
  """SparseBERT 'Fixed' baseline: fixed(block=32, summary=1). Numeric fit, not the authors'
  stated definition: 72.66 % sparsity at N = 128 (README 72.7). Returns mask_NxN."""
  return _preset("fixed", n, overrides)


def sparsebert_longformer(n: int = 128, **overrides) -> np.ndarray:
  """SparseBERT 'Longformer' baseline: window 3 keys left / 9 right, global token 0.

  Numeric fit, not the authors' stated definition: 88.68 % sparsity at N = 128 (README
  88.7). The symmetric alternative longformer(window=6, global_tokens=1) gives 88.62 %.
  Returns mask_NxN.
  """
  return _preset("longformer", n, overrides)


def sparsebert_logsparse(n: int = 128, **overrides) -> np.ndarray:
  """SparseBERT 'LogSparse' baseline: self plus i ± 2^k. Numeric fit, not the authors'
  stated definition: 89.83 % sparsity at N = 128 (README 89.8). Returns mask_NxN."""
  return _preset("logsparse", n, overrides)


def sparsebert_bigbird(n: int = 128, **overrides) -> np.ndarray:
  """SparseBERT 'BigBird' baseline: window ±1, 2 global tokens, 2 random keys, seed 22.

  Numeric fit, not the authors' stated definition: 93.18 % sparsity at N = 128 (README
  93.2). The random part depends on the seed (seeds 0-49 give 93.09-93.18 %).
  Returns mask_NxN.
  """
  return _preset("bigbird", n, overrides)


def sparsebert_star(n: int = 128, **overrides) -> np.ndarray:
  """SparseBERT 'Star' baseline: window ±1 plus global token 0. Numeric fit, not the
  authors' stated definition: 96.13 % sparsity at N = 128 (README 96.1). Returns mask_NxN."""
  return _preset("star", n, overrides)


SPARSEBERT_PRESETS: dict[str, Callable[..., np.ndarray]] = {
    "strided": sparsebert_strided, "fixed": sparsebert_fixed,
    "longformer": sparsebert_longformer, "logsparse": sparsebert_logsparse,
    "bigbird": sparsebert_bigbird, "star": sparsebert_star}

# The registry behind `build`: configs name a pattern by one of these strings.
PATTERNS: dict[str, Callable[..., np.ndarray]] = {
    "full": full, "window": window, "strided": strided, "fixed": fixed,
    "logsparse": logsparse, "longformer": longformer, "bigbird": bigbird, "star": star,
    "random": random, "global": global_tokens,
    "sparsebert_strided": sparsebert_strided, "sparsebert_fixed": sparsebert_fixed,
    "sparsebert_longformer": sparsebert_longformer,
    "sparsebert_logsparse": sparsebert_logsparse,
    "sparsebert_bigbird": sparsebert_bigbird, "sparsebert_star": sparsebert_star}


def build(name: str, n: int, **kwargs) -> np.ndarray:
  """Builds the pattern registered as `name` at sequence length n.

  Args:
    name: a key of PATTERNS, e.g. "window", "bigbird" or "sparsebert_star".
    n: sequence length N.
    **kwargs: the builder's own parameters, e.g. build("window", 128, k=3).

  Returns:
    The builder's mask (mask_NxN, or mask_HxNxN for per-head random parts).
  """
  if name not in PATTERNS:
    raise ValueError(f"Unknown mask pattern {name!r}; valid names: {sorted(PATTERNS)}.")
  fn = PATTERNS[name]
  try:
    inspect.signature(fn).bind(n, **kwargs)
  except TypeError as e:
    raise ValueError(f"Bad parameters for pattern {name!r}: {e}. "
                     f"Its signature is {name}{inspect.signature(fn)}.") from None
  return fn(n, **kwargs)

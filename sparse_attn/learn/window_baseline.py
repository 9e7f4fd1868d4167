"""The fixed BigBird baseline of a learned window: window + global + random keys at a density.

`bigbird_matched` picks the `patterns.bigbird` mask whose density (over the n x n matrix or
a dataset's valid pairs) best matches a target, e.g. the density a learned-window run
reached, so that the two are compared at the same sparsity. Mask semantics: True = may
attend; N is the sequence length.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sparse_attn.masks import patterns


class BigBirdMatch(NamedTuple):
  """A BigBird mask matched to a target density (`mask`, `density` first)."""
  mask: np.ndarray     # bool mask_NxN.
  density: float       # Achieved density at n.
  window: int          # Half-width of its band.
  random_keys: int     # Random keys per row.


def bigbird_matched(n: int, target_density: float, global_tokens: int = 0, seed: int = 0, *,
                    window: int | None = None, random_keys: int | None = None,
                    pairs_NxN: np.ndarray | None = None) -> BigBirdMatch:
  """The BigBird mask (window + global + random) whose density at n best matches a target.

  The mask is `patterns.bigbird(n, w, global_tokens, r, seed)`. Unless fixed by the caller,
  the half-width w is the largest whose band + global links do not exceed the target
  (neighbour links first: removing them hurts most, Breaking BERT), and the random-key count
  r in [0, n] then brings the density closest to the target (ties: fewer keys). With `window`
  fixed only r is searched; with `random_keys` fixed only w is searched (ties: larger w).
  A target below the sparsest reachable mask returns that mask.

  Args:
    n: sequence length N.
    target_density: in [0, 1].
    global_tokens: g leading global tokens.
    seed: seed of the random keys.
    window: fix the half-width (in [0, n - 1]) instead of choosing it.
    random_keys: fix the random keys per row (in [0, n]) instead of choosing them.
    pairs_NxN: weights of the positions (e.g. `masks.stats.pair_weights` of a dataset's
      lengths, to match the density over its valid pairs); None = the n x n matrix.

  Returns:
    BigBirdMatch(mask = bool mask_NxN, density, window, random_keys); `mask, density, *_ =`
    unpacks the first two.
  """
  if not 0.0 <= target_density <= 1.0:
    raise ValueError(f"target_density must lie in [0, 1]; got {target_density}.")
  if window is not None and not 0 <= window <= n - 1:
    raise ValueError(f"window must lie in [0, {n - 1}] at n={n}; got {window}.")
  if random_keys is not None and not 0 <= random_keys <= n:
    raise ValueError(f"random_keys must lie in [0, {n}]; got {random_keys}.")
  pairs_NxN = np.ones((n, n)) if pairs_NxN is None else np.asarray(pairs_NxN, np.float64)
  total = pairs_NxN.sum()
  count_WxR = bigbird_counts(n, global_tokens, seed, pairs_NxN)
  err_WxR = np.abs(count_WxR / total - target_density)
  if window is None and random_keys is None:
    fits = np.nonzero(count_WxR[:, 0] <= target_density * total * (1 + 1e-9))[0]
    window = int(fits.max()) if fits.size else 0
  if window is not None:
    w = int(window)
    r = int(random_keys) if random_keys is not None else int(np.argmin(err_WxR[w]))
  else:
    r = int(random_keys)
    col = err_WxR[:, r]
    w = int(np.nonzero(col <= col.min() + 1e-12)[0].max())
  mask_NxN = patterns.bigbird(n, w, global_tokens, r, seed)
  return BigBirdMatch(mask_NxN, float((mask_NxN * pairs_NxN).sum() / total), w, r)


def bigbird_counts(n: int, global_tokens: int, seed: int,
                    pairs_NxN: np.ndarray | None = None) -> np.ndarray:
  """count[w, r] = kept pairs of patterns.bigbird(n, w, global_tokens, r, seed). [N, N+1].

  With `pairs_NxN`, the kept pairs' summed weight instead of their number."""
  pairs_NxN = np.ones((n, n)) if pairs_NxN is None else np.asarray(pairs_NxN, np.float64)
  glob_NxN = patterns.global_tokens(n, global_tokens)
  # Rank of each key in its row's random order: the keys of `patterns.random(n, r, seed)`
  # are those with rank < r (the same draw and stable argsort).
  order_NxN = np.argsort(np.random.default_rng(seed).random((1, n, n))[0], axis=-1,
                         kind="stable")
  rank_NxN = np.empty_like(order_NxN)
  np.put_along_axis(rank_NxN, order_NxN, np.broadcast_to(np.arange(n), (n, n)), axis=-1)
  free = ~glob_NxN
  # hist[d, rho] = non-global pairs at offset d whose random rank is rho.
  hist_NxN = np.zeros((n, n))
  offsets_NxN = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))  # |i - j|.
  np.add.at(hist_NxN, (offsets_NxN[free], rank_NxN[free]), pairs_NxN[free])
  band_W = np.cumsum(hist_NxN.sum(1))                      # Non-global pairs with d <= w.
  beyond_WxN = np.zeros((n, n))                            # Rows w: pairs with d > w.
  beyond_WxN[:-1] = hist_NxN[::-1].cumsum(0)[::-1][1:]
  outside_WxR = np.concatenate(                            # d > w and rank < r.
      [np.zeros((n, 1)), beyond_WxN.cumsum(1)], 1)
  return pairs_NxN[glob_NxN].sum() + band_W[:, None] + outside_WxR

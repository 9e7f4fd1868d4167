"""Tests for sparse_attn.masks.stats: densities against loops, connectivity against BFS."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from sparse_attn.masks import patterns
from sparse_attn.masks import stats


def loop_density(mask_BxHxNxN: np.ndarray, valid_BxN: np.ndarray) -> float:
  """Reference: per-example kept/valid over pairs and heads, then the mean of examples."""
  per_example = []
  for b in range(mask_BxHxNxN.shape[0]):
    kept = total = 0.0
    for h in range(mask_BxHxNxN.shape[1]):
      for i in range(mask_BxHxNxN.shape[2]):
        for j in range(mask_BxHxNxN.shape[3]):
          if valid_BxN[b, i] and valid_BxN[b, j]:
            kept += float(mask_BxHxNxN[b, h, i, j])
            total += 1
    if total:
      per_example.append(kept / total)
  return float(np.mean(per_example))


def bfs_diameter(mask_NxN: np.ndarray) -> int | None:
  """Reference: longest shortest path in the graph i -> j (i attends to j), or None."""
  n = mask_NxN.shape[0]
  longest = 0
  for src in range(n):
    dist = {src: 0}
    queue = collections.deque([src])
    while queue:
      u = queue.popleft()
      for v in range(n):
        if mask_NxN[u, v] and v not in dist:
          dist[v] = dist[u] + 1
          queue.append(v)
    if len(dist) < n:
      return None
    longest = max(longest, max(dist.values()))
  return max(longest, 1)


def test_density_without_valid_is_mean():
  m = patterns.window(10, 2)
  assert stats.density(m) == pytest.approx(m.mean())
  assert stats.sparsity(m) == pytest.approx(1 - m.mean())
  assert stats.density(None) == 1.0
  assert stats.sparsity(patterns.sparsebert_star()) == pytest.approx(0.9613, abs=1e-4)


@pytest.mark.parametrize("shape", [(6, 6), (3, 6, 6), (1, 3, 6, 6), (2, 3, 6, 6), (2, 1, 6, 6)])
def test_density_with_padding_matches_loop(shape):
  rng = np.random.default_rng(0)
  mask = rng.random(shape) < 0.4
  valid_BxN = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
  full = np.broadcast_to(mask.reshape((1,) * (4 - mask.ndim) + mask.shape),
                         (2,) + mask.shape[-3:] if mask.ndim >= 3 else (2, 1, 6, 6))
  assert stats.density(mask, valid_BxN) == pytest.approx(loop_density(full, valid_BxN))
  soft = rng.random(shape).astype(np.float32)
  full_soft = np.broadcast_to(soft.reshape((1,) * (4 - soft.ndim) + soft.shape), full.shape)
  assert stats.density(soft, valid_BxN) == pytest.approx(loop_density(full_soft, valid_BxN))


def test_density_each_example_counts_once_and_empty_examples_skipped():
  mask = np.eye(4, dtype=bool)
  valid_BxN = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
  # Example 0: 1 of 1 valid pair kept; example 1: 4 of 16; example 2 has no tokens.
  assert stats.density(mask, valid_BxN) == pytest.approx((1.0 + 0.25) / 2)


@pytest.mark.parametrize("mask,valid,match", [
    (np.ones((4, 4), bool), np.ones((2, 5), bool), r"bool \[B, 4\]"),
    (np.ones((4, 4), bool), np.ones((2, 4), np.int32), "bool"),
    (np.ones((3, 1, 4, 4), bool), np.ones((2, 4), bool), "batch dim 3"),
    (np.ones((4, 4), bool), np.zeros((2, 4), bool), "no example"),
    (np.full((4, 4), 2.0), None, r"\[0, 1\]"),
    (np.ones((4, 5), bool), None, "square"),
])
def test_density_errors(mask, valid, match):
  with pytest.raises(ValueError, match=match):
    stats.density(mask, valid)


@pytest.mark.parametrize("n,block", [(8, 4), (10, 4), (7, 3), (5, 8), (128, 16)])
def test_block_density_matches_loop(n, block):
  mask = patterns.sparsebert_bigbird(n) if n >= 3 else patterns.full(n)
  nb = -(-n // block)
  hits = 0
  for qb in range(nb):
    for kb in range(nb):
      tile = mask[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
      hits += bool(tile.any())
  assert stats.block_density(mask, block) == pytest.approx(hits / nb ** 2)


def test_block_density_batched_and_errors():
  m = np.stack([patterns.window(8, 0), patterns.full(8)])  # 2 of 4 tiles, then 4 of 4.
  assert stats.block_density(m, 4) == pytest.approx(6 / 8)
  assert stats.block_density(np.eye(4, dtype=np.float32) * 0.5, 2) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="block"):
    stats.block_density(m, 0)
  with pytest.raises(ValueError, match="square"):
    stats.block_density(np.ones((3, 4), bool), 2)


def test_per_layer_density():
  w = patterns.window(8, 0)
  out = stats.per_layer_density((None, w, w, None), 4)
  np.testing.assert_allclose(out, [1.0, 1 / 8, 1 / 8, 1.0])
  np.testing.assert_allclose(stats.per_layer_density(w, 2), [1 / 8, 1 / 8])
  with pytest.raises(ValueError, match="2 layers but the model has 3"):
    stats.per_layer_density((w, w), 3)


@pytest.mark.parametrize("n", [2, 5, 12])
def test_window_without_diagonal_needs_n_minus_1_layers(n):
  m = patterns.remove_diagonal(patterns.window(n, 1))
  assert stats.layers_to_connect(m) == n - 1
  assert stats.is_connected([m] * (n - 1))
  assert stats.is_connected(m, s=n - 1)
  if n > 2:
    assert not stats.is_connected([m] * (n - 2))
    assert not stats.is_connected(m, s=n - 2)


@pytest.mark.parametrize("n,k", [(9, 2), (16, 3)])
def test_window_k_needs_ceil_layers(n, k):
  assert stats.layers_to_connect(patterns.window(n, k)) == -(-(n - 1) // k)


def test_small_cases():
  assert stats.layers_to_connect(patterns.full(6)) == 1
  assert stats.layers_to_connect(None) == 1
  assert stats.layers_to_connect(patterns.star(10)) == 2
  assert stats.layers_to_connect(np.eye(5, dtype=bool)) is None
  assert stats.layers_to_connect(patterns.fixed(16, 4, 1)) == 2
  # Without the residual path dense attention minus the diagonal would lose each token's
  # own state; with it, one layer suffices.
  assert stats.is_connected(patterns.remove_diagonal(patterns.full(6)))
  assert stats.is_connected([None, None])


def test_layer_order_matters():
  n = 6
  to_zero = np.zeros((n, n), bool)
  to_zero[:, 0] = True   # Every token reads token 0.
  from_all = np.zeros((n, n), bool)
  from_all[0, :] = True  # Token 0 reads every token.
  assert stats.is_connected([from_all, to_zero])
  assert not stats.is_connected([to_zero, from_all])
  heads = np.stack([from_all, to_zero])  # Heads are united within a layer.
  assert stats.is_connected([heads, heads])


@pytest.mark.parametrize("name", sorted(patterns.SPARSEBERT_PRESETS))
def test_presets_connectivity_unchanged_without_diagonal(name):
  m = patterns.SPARSEBERT_PRESETS[name]()
  s = stats.layers_to_connect(m)
  assert s is not None and s == bfs_diameter(m)
  assert stats.layers_to_connect(patterns.remove_diagonal(m)) == s
  assert stats.is_connected([patterns.remove_diagonal(m)] * s)
  if s > 1:
    assert not stats.is_connected([patterns.remove_diagonal(m)] * (s - 1))


@pytest.mark.parametrize("seed", range(5))
def test_layers_to_connect_matches_bfs_on_random_graphs(seed):
  m = patterns.random(12, 2, seed=seed)
  assert stats.layers_to_connect(m) == bfs_diameter(m | np.eye(12, dtype=bool))


def test_connectivity_errors():
  with pytest.raises(ValueError, match="at least one"):
    stats.is_connected([])
  with pytest.raises(ValueError, match="different sequence lengths"):
    stats.is_connected([np.ones((3, 3), bool), np.ones((4, 4), bool)])
  with pytest.raises(ValueError, match="per example"):
    stats.is_connected(np.ones((2, 1, 4, 4), bool))
  with pytest.raises(ValueError, match="positive number"):
    stats.is_connected([np.ones((3, 3), bool)], s=0)


def test_pair_weights_average_each_examples_valid_pairs():
  n, lengths = 6, np.array([2, 4, 4, 9])  # 9 > n counts as n.
  expect = np.zeros((n, n))
  for m in np.minimum(lengths, n):
    expect[:m, :m] += 1 / (m * m * len(lengths))
  w = stats.pair_weights(lengths, n)
  np.testing.assert_allclose(w, expect)
  mask = np.random.default_rng(0).random((n, n)) < 0.4
  valid = np.arange(n)[None, :] < np.minimum(lengths, n)[:, None]
  np.testing.assert_allclose((w * mask).sum(), stats.density(mask, valid))
  with pytest.raises(ValueError, match="at least one example"):
    stats.pair_weights(np.array([], np.int64), n)

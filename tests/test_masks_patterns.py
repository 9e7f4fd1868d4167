"""Tests for sparse_attn.masks.patterns: every builder against a plain-Python loop."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_attn.masks import patterns


def loop_mask(n: int, keep) -> np.ndarray:
  """Reference: mask_NxN with mask[i, j] = keep(i, j), built one entry at a time."""
  out = np.zeros((n, n), dtype=bool)
  for i in range(n):
    for j in range(n):
      out[i, j] = bool(keep(i, j))
  return out


def sparsity_pct(mask: np.ndarray) -> float:
  return 100.0 * (1.0 - mask.mean())


SIZES = [1, 2, 7, 16, 33]


@pytest.mark.parametrize("n", SIZES)
def test_full(n):
  np.testing.assert_array_equal(patterns.full(n), loop_mask(n, lambda i, j: True))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [0, 1, 3, 40])
def test_window_symmetric(n, k):
  got = patterns.window(n, k)
  assert got.dtype == bool and got.shape == (n, n)
  np.testing.assert_array_equal(got, loop_mask(n, lambda i, j: abs(i - j) <= k))


@pytest.mark.parametrize("left,right", [(0, 2), (3, 0), (2, 5)])
def test_window_asymmetric(left, right):
  ref = loop_mask(12, lambda i, j: 0 <= i - j <= left or 0 <= j - i <= right)
  np.testing.assert_array_equal(patterns.window(12, left=left, right=right), ref)


def test_window_left_means_earlier_keys():
  m = patterns.window(12, left=0, right=2)
  assert m[5, 7] and not m[5, 8] and not m[5, 4]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride,local", [(1, 0), (4, 4), (3, 2), (5, 0)])
def test_strided(n, stride, local):
  ref = loop_mask(n, lambda i, j: abs(i - j) < local or (i - j) % stride == 0)
  np.testing.assert_array_equal(patterns.strided(n, stride, local), ref)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block,summary", [(1, 1), (4, 1), (5, 2), (8, 8)])
def test_fixed(n, block, summary):
  ref = loop_mask(n, lambda i, j: i // block == j // block or j % block >= block - summary)
  np.testing.assert_array_equal(patterns.fixed(n, block, summary), ref)


@pytest.mark.parametrize("n", SIZES + [128])
def test_logsparse(n):
  powers = {2 ** k for k in range(12)}
  ref = loop_mask(n, lambda i, j: i == j or abs(i - j) in powers)
  np.testing.assert_array_equal(patterns.logsparse(n), ref)


@pytest.mark.parametrize("g", [0, 1, 3, [0], [2, 5], []])
def test_global_tokens(g):
  idx = set(range(g)) if isinstance(g, int) else set(g)
  ref = loop_mask(9, lambda i, j: i in idx or j in idx)
  np.testing.assert_array_equal(patterns.global_tokens(9, g), ref)


def test_longformer_star_bigbird_are_unions():
  n = 20
  ref = loop_mask(n, lambda i, j: abs(i - j) <= 2 or i < 2 or j < 2)
  np.testing.assert_array_equal(patterns.longformer(n, 2, 2), ref)
  ref = loop_mask(n, lambda i, j: -1 <= j - i <= 4 or i == 0 or j == 0)
  np.testing.assert_array_equal(patterns.longformer(n, left=1, right=4), ref)
  ref = loop_mask(n, lambda i, j: abs(i - j) <= 1 or i in (0, 7) or j in (0, 7))
  np.testing.assert_array_equal(patterns.star(n, [0, 7]), ref)
  rand = patterns.random(n, 3, seed=5)
  ref = loop_mask(n, lambda i, j: abs(i - j) <= 1 or i < 1 or j < 1 or rand[i, j])
  np.testing.assert_array_equal(patterns.bigbird(n, 1, 1, 3, seed=5), ref)


def test_random_counts_seed_and_heads():
  n, r = 17, 4
  m = patterns.random(n, r, seed=0)
  assert m.shape == (n, n) and m.dtype == bool
  np.testing.assert_array_equal(m.sum(-1), np.full(n, r))
  np.testing.assert_array_equal(m, patterns.random(n, r, seed=0))
  assert not np.array_equal(m, patterns.random(n, r, seed=1))
  # Reference draw: the r smallest uniform scores of each row, one row at a time.
  scores = np.random.default_rng(0).random((1, n, n))[0]
  ref = np.zeros((n, n), dtype=bool)
  for i in range(n):
    for j in sorted(range(n), key=lambda j: scores[i, j])[:r]:
      ref[i, j] = True
  np.testing.assert_array_equal(m, ref)
  heads = patterns.random(n, r, seed=0, num_heads=3)
  assert heads.shape == (3, n, n)
  np.testing.assert_array_equal(heads[0], m)  # Head 0 is the shared draw.
  assert not np.array_equal(heads[0], heads[1])
  assert patterns.random(n, 0, seed=0).sum() == 0
  assert patterns.random(n, n, seed=0).all()
  assert patterns.bigbird(n, 1, 1, 2, seed=3, num_heads=4).shape == (4, n, n)


def test_union_intersect_broadcast():
  a = patterns.window(6, 1)
  b_HxNxN = np.stack([patterns.global_tokens(6, 1), patterns.full(6)])
  u, x = patterns.union(a, b_HxNxN), patterns.intersect(a, b_HxNxN)
  assert u.shape == x.shape == (2, 6, 6)
  for h in range(2):
    np.testing.assert_array_equal(u[h], loop_mask(6, lambda i, j: a[i, j] or b_HxNxN[h, i, j]))
    np.testing.assert_array_equal(x[h], loop_mask(6, lambda i, j: a[i, j] and b_HxNxN[h, i, j]))
  np.testing.assert_array_equal(patterns.union(a), a)


def test_remove_diagonal_any_shape_and_dtype():
  m = np.ones((2, 3, 5, 5), dtype=bool)
  out = patterns.remove_diagonal(m)
  assert out.shape == m.shape and m.all()  # Input untouched.
  ref = loop_mask(5, lambda i, j: i != j)
  for b in range(2):
    for h in range(3):
      np.testing.assert_array_equal(out[b, h], ref)
  f = patterns.remove_diagonal(np.full((4, 4), 0.5, np.float32))
  assert f.dtype == np.float32 and np.all(np.diag(f) == 0) and f[0, 1] == 0.5


@pytest.mark.parametrize("name", sorted(patterns.SPARSEBERT_PRESETS))
def test_sparsebert_presets_match_readme(name):
  mask = patterns.SPARSEBERT_PRESETS[name]()
  assert mask.shape == (128, 128) and mask.dtype == bool
  got = sparsity_pct(mask)
  assert abs(got - patterns.SPARSEBERT_README_SPARSITY[name]) <= 0.1, (name, got)
  assert "numeric fit" in patterns.SPARSEBERT_PRESETS[name].__doc__.lower()
  np.testing.assert_array_equal(patterns.build(f"sparsebert_{name}", 128), mask)


def test_preset_parameters_reproduce_presets():
  for name, (pattern, params) in patterns.SPARSEBERT_PARAMS.items():
    np.testing.assert_array_equal(patterns.build(pattern, 128, **params),
                                  patterns.SPARSEBERT_PRESETS[name]())
  # The presets scale to other lengths and accept overrides.
  assert patterns.sparsebert_star(64).shape == (64, 64)
  np.testing.assert_array_equal(patterns.sparsebert_star(16, global_tokens=0),
                                patterns.window(16, 1))


def test_build_registry():
  np.testing.assert_array_equal(patterns.build("window", 10, k=2), patterns.window(10, 2))
  np.testing.assert_array_equal(patterns.build("global", 10, g=[3]),
                                patterns.global_tokens(10, [3]))
  with pytest.raises(ValueError, match="valid names.*bigbird"):
    patterns.build("banded", 10)
  with pytest.raises(ValueError, match="Bad parameters for pattern 'window'"):
    patterns.build("window", 10, width=2)


@pytest.mark.parametrize("call,match", [
    (lambda: patterns.full(0), "positive integer"),
    (lambda: patterns.window(8, -1), "half-width"),
    (lambda: patterns.window(8), "needs a half-width"),
    (lambda: patterns.strided(8, 0, 2), "stride"),
    (lambda: patterns.fixed(8, 4, 5), "summary"),
    (lambda: patterns.global_tokens(8, 9), "global tokens"),
    (lambda: patterns.global_tokens(8, [8]), r"\[0, 8\)"),
    (lambda: patterns.random(8, 9, seed=0), "random keys"),
    (lambda: patterns.logsparse(-3), "positive integer"),
    (lambda: patterns.remove_diagonal(np.ones((3, 4), bool)), "square"),
    (lambda: patterns.union(), "at least one"),
    (lambda: patterns.union(np.ones((3, 3), np.float32)), "bool"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()

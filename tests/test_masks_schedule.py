"""Tests for sparse_attn.masks.schedule: per-layer mask pytrees and their validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn.masks import patterns
from sparse_attn.masks import schedule

N, L, H = 8, 4, 2


def test_per_layer_all_and_some():
  m = patterns.window(N, 1)
  assert schedule.per_layer(m, L) == (m, m, m, m)
  out = schedule.per_layer(m, L, layers=[0, 2])
  ref = tuple(m if i in (0, 2) else None for i in range(L))
  assert len(out) == L and all(a is b for a, b in zip(out, ref))
  assert schedule.per_layer(m, L, layers=[]) == (None,) * L


@pytest.mark.parametrize("start", [0, 1, 3, 4])
def test_later_layers(start):
  m = patterns.window(N, 1)
  out = schedule.later_layers(m, L, start)
  for i in range(L):
    if i < start:
      assert out[i] is None
    else:
      assert out[i] is m


def test_per_head_stacks():
  masks = [patterns.window(N, k) for k in range(3)]
  out = schedule.per_head(masks)
  assert out.shape == (3, N, N)
  for h in range(3):
    np.testing.assert_array_equal(out[h], masks[h])


@pytest.mark.parametrize("call,match", [
    (lambda: schedule.per_layer(np.ones((N, N), bool), 0), "num_layers"),
    (lambda: schedule.per_layer(np.ones((N, N), bool), L, [4]), "outside"),
    (lambda: schedule.later_layers(np.ones((N, N), bool), L, 5), "start"),
    (lambda: schedule.per_head([]), "non-empty"),
    (lambda: schedule.per_head([np.ones((N, N)), np.ones((N + 1, N + 1))]), "one shape"),
    (lambda: schedule.per_head([np.ones((N, N), bool), np.ones((N, N))]), "one dtype"),
])
def test_helpers_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_validate_normalises_every_form():
  m = patterns.window(N, 1)
  assert schedule.validate(None, L) == (None,) * L
  assert all(x is m for x in schedule.validate(m, L))
  as_list = [None, m, None, m]
  assert schedule.validate(as_list, L) == tuple(as_list)
  out = schedule.validate({"layer_1": m, "layer_3": m}, L)
  assert out[0] is None and out[1] is m and out[2] is None and out[3] is m


@pytest.mark.parametrize("shape", [(N, N), (H, N, N), (1, N, N), (1, H, N, N),
                                   (3, 1, N, N), (3, H, N, N)])
def test_validate_accepts_leaf_shapes(shape):
  leaf = np.ones(shape, bool)
  assert schedule.validate(leaf, L, num_heads=H, seq_len=N)[0] is leaf


def test_validate_accepts_float_bfloat16_and_jax():
  schedule.validate(np.full((N, N), 0.3, np.float32), L, seq_len=N)
  schedule.validate(jnp.full((H, N, N), 0.5, jnp.bfloat16), L, num_heads=H)
  schedule.validate(jnp.ones((N, N), bool), L, seq_len=N)


def test_validate_under_jit_uses_shapes_only():
  @jax.jit
  def f(m):
    out = schedule.validate((m, None, m, None), L, num_heads=H, seq_len=N)
    return sum(x.sum() for x in out if x is not None)
  assert float(f(jnp.full((N, N), 2.0))) == 2 * 2.0 * N * N  # Values unchecked in a trace.

  @jax.jit
  def g(m):
    return schedule.validate(m, L, seq_len=N + 1)[0]
  with pytest.raises(ValueError, match="sequence length"):
    g(jnp.ones((N, N), bool))


@pytest.mark.parametrize("masks,kwargs,match", [
    ((np.ones((N, N), bool),) * 3, {}, "3 layers but the model has 4"),
    ({"layer_4": np.ones((N, N), bool)}, {}, "Unknown mask keys"),
    ({"decoder": None}, {}, "Unknown mask keys"),
    (np.ones((1, 1, H, N, N), bool), {}, "2 to 4 dims"),
    (np.ones((N,), bool), {}, "2 to 4 dims"),
    (np.ones((N, N), bool), {"seq_len": N + 1}, "sequence length"),
    (np.ones((N, N + 1), bool), {}, "square"),
    (np.ones((3, N, N), bool), {"num_heads": H}, "head dim is 3"),
    (np.ones((1, 3, N, N), bool), {"num_heads": H}, "head dim is 3"),
    (np.ones((N, N), np.int32), {}, "neither bool"),
    (np.full((N, N), 1.5, np.float32), {}, r"\[0, 1\]"),
    (np.full((N, N), np.nan, np.float32), {}, r"\[0, 1\]"),
    ([None, None, [[True]], None], {}, "expected None or an array"),
    ("window", {}, "must be None, an array"),
])
def test_validate_errors(masks, kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedule.validate(masks, L, **kwargs)

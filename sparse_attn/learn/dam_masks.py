"""DAM's index maps: which logit each attention position uses, expansion, densities, top-k.

A DAM mask instance has P logits per head: one per position (DAM_u, logits_UxU flattened)
or per diagonal offset (DAM_s, a Toeplitz mask M[h, i, j] = m[h, |i - j|]), optionally on
b x b blocks. `toeplitz_index` / `unstructured_index` give the [N, N] map into those P
logits, `expand` gathers per-logit values into the H x N x N mask, `logit_weights` counts
the entries each logit controls, and `expected_density` / `binarize` measure and freeze
masks per logit (no N x N tensor needed).

Shape legend: H heads (1 when not per head), N sequence length n, P logits per head,
U = n (or n_blocks) positions along one side.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ---------------------------------------------------------------- index maps / expansion

def _block_ids(n: int, block_size: int) -> np.ndarray:
  """Block index of each position (the last block may be partial)."""
  return np.arange(n) // block_size if block_size else np.arange(n)


def num_units(n: int, block_size: int = 0) -> int:
  """Positions (block_size 0) or blocks ceil(n / b) along one side."""
  return -(-n // block_size) if block_size else n


def toeplitz_index(n: int, asymmetric: bool = False, block_size: int = 0) -> np.ndarray:
  """DAM_s index map: which offset logit each (i, j) uses.

  Args:
    n: sequence length.
    asymmetric: signed offsets (i - j + U - 1, P = 2U - 1) instead of |i - j| (P = U).
    block_size: 0, or b: offsets between block indices i // b and j // b.

  Returns:
    index_NxN int32 in [0, P), U = num_units(n, block_size).
  """
  u = num_units(n, block_size)
  b = _block_ids(n, block_size)
  diff = b[:, None] - b[None, :]
  return (diff + u - 1 if asymmetric else np.abs(diff)).astype(np.int32)


def unstructured_index(n: int, symmetric: bool = False, block_size: int = 0) -> np.ndarray:
  """DAM_u index map into logits_UxU flattened (row-major).

  Symmetric tying reads alpha[min(i, j), max(i, j)], i.e. the code's
  triu(alpha) + triu(alpha, 1)^T; the lower triangle of the logits is then unused.

  Returns:
    index_NxN int32 in [0, U * U).
  """
  u = num_units(n, block_size)
  b = _block_ids(n, block_size)
  r, c = np.meshgrid(b, b, indexing="ij")
  if symmetric:
    r, c = np.minimum(r, c), np.maximum(r, c)
  return (r * u + c).astype(np.int32)


def expand(values_HxP: Array, index_NxN: np.ndarray) -> Array:
  """Gathers per-logit values into a mask: out[h, i, j] = values[h, index[i, j]].

  Returns:
    [H, N, N], same dtype as `values_HxP` (differentiable; the gradient sums over the
    positions sharing a logit).
  """
  return jnp.take(values_HxP, jnp.asarray(index_NxN), axis=1)


def expand_toeplitz(m_HxP: Array, n: int, asymmetric: bool = False,
                    block_size: int = 0) -> Array:
  """DAM_s: M[h, i, j] = m[h, |i - j|] (or m[h, i - j + n - 1]); on blocks with b > 0."""
  return expand(m_HxP, toeplitz_index(n, asymmetric, block_size))


def expand_unstructured(a_HxUxU: Array, n: int, symmetric: bool = False,
                        block_size: int = 0) -> Array:
  """DAM_u: M[h, i, j] = a[h, i, j] (blocks: a[h, i // b, j // b]; optionally tied)."""
  a_HxUxU = jnp.asarray(a_HxUxU)
  u = num_units(n, block_size)
  if a_HxUxU.shape[-2:] != (u, u):
    raise ValueError(f"DAM_u logits must be [H, {u}, {u}] for n={n}, block_size="
                     f"{block_size}; got {a_HxUxU.shape}.")
  return expand(a_HxUxU.reshape(a_HxUxU.shape[0], u * u),
                unstructured_index(n, symmetric, block_size))


def logit_weights(index_NxN: np.ndarray, num_logits: int,
                  eligible_NxN: np.ndarray | None = None) -> np.ndarray:
  """Number of (eligible) mask entries each logit controls, w_P (float32).

  For |i - j| offsets at element level this is c_0 = n, c_d = 2 (n - d).
  """
  e = np.ones(index_NxN.shape) if eligible_NxN is None else eligible_NxN
  return np.bincount(index_NxN.ravel(), weights=np.asarray(e, np.float64).ravel(),
                     minlength=num_logits).astype(np.float32)


# ---------------------------------------------------------------- densities / binarising

def expected_density(logits_HxP: Array, weights_P: Array | None = None,
                     total: float | None = None) -> Array:
  """Expected element density sum_p w_p sigmoid(alpha_p) / total (P(keep) of hard samples).

  Args:
    logits_HxP: logits.
    weights_P: entries per logit (None = 1 each).
    total: number of mask entries (default H * sum(w)).
  """
  p = jax.nn.sigmoid(jnp.asarray(logits_HxP, jnp.float32))
  w = jnp.ones(p.shape[-1]) if weights_P is None else jnp.asarray(weights_P)
  total = p.shape[0] * jnp.sum(w) if total is None else total
  return jnp.sum(p * w) / total


@functools.partial(jax.jit, static_argnames=("rule",))
def binarize(logits_HxP: Array, rule: str = "threshold",
             target_density: float | None = None, weights_P: Array | None = None,
             total: float | None = None) -> Array:
  """Deterministic keep decision per logit.

  Args:
    logits_HxP: logits (all heads of one mask instance).
    rule: "threshold" (sigmoid(alpha) > 0.5) or "topk": keep the highest logits (over all
      heads) whose cumulated entry count w is closest to target_density * total.
    target_density: for "topk".
    weights_P: entries per logit (None = 1 each).
    total: entries of the instance (default H * sum(w)).

  Returns:
    Bool [H, P].
  """
  a = jnp.asarray(logits_HxP, jnp.float32)
  if rule == "threshold":
    return a > 0
  if rule != "topk" or target_density is None:
    raise ValueError(f"binarize: rule {rule!r} must be 'threshold', or 'topk' with a "
                     "target_density.")
  w = jnp.ones(a.shape[-1]) if weights_P is None else jnp.asarray(weights_P, jnp.float32)
  w_all = jnp.broadcast_to(w, a.shape).ravel()
  total = jnp.sum(w_all) if total is None else total
  order = jnp.argsort(-a.ravel(), stable=True)
  cum = jnp.concatenate([jnp.zeros(1), jnp.cumsum(w_all[order])])  # cum[k]: top k kept.
  k = jnp.argmin(jnp.abs(cum - target_density * total))
  rank = jnp.zeros(a.size, jnp.int32).at[order].set(jnp.arange(a.size, dtype=jnp.int32))
  return (rank < k).reshape(a.shape)

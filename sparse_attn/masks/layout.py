"""Element mask -> static block layout (host side, numpy), densities and exporters.

A `BlockLayout` cuts a boolean attention mask into b x b tiles and records, per (example,
head, query block), which key blocks hold any kept entry, which of those are *full* (every
entry kept: no element mask needed) and which are *partial* (an element mask is stored,
deduplicated: identical partial tiles are stored once, as in Splash attention's MaskInfo).
Block-sparse kernels skip empty tiles; the block density rho_block (not the element
density) bounds their speed-up at 1 / rho_block.

Shape legend: B batch, H heads, Q query length, K key length, b block size,
NQ = ceil(Q / b) query blocks, NK = ceil(K / b) key blocks, P unique partial tiles.
Leading mask dims are kept as given (1 = shared): Bm in {1, B}, Hm in {1, H}.

Lengths that are not multiples of b are padded up to NQ*b, NK*b with False (masked):
padded keys are never attended, padded query rows are fully masked (zero output) and are
sliced away by the kernels. Edge tiles that contain padding therefore count as partial.

Exporters: `.npz` (`save_npz` / `load_npz`), the FlexAttention block form (`to_flex`:
kv_num_blocks / kv_indices for partial tiles plus full_kv_num_blocks / full_kv_indices, as
`torch.nn.attention.flex_attention.BlockMask.from_kv_blocks` expects) and Splash-ready
per-head numpy masks (`to_splash_masks`, for `NumpyMask` / `MultiHeadMask`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any

import numpy as np

from sparse_attn.masks.tree import as_4d

EMPTY, PARTIAL, FULL = 0, 1, 2  # Tile kinds, the Splash convention (block_mask values).


def _as_bool_mask(mask: Any) -> np.ndarray:
  """Returns the mask as a bool numpy array of shape [Bm, Hm, Q, K]."""
  m = np.asarray(mask)
  if m.ndim not in (2, 3, 4):
    raise ValueError(f"A block layout needs a mask of shape [Q, K], [H, Q, K] or "
                     f"[B, H, Q, K]; got shape {m.shape}.")
  if m.dtype != bool:
    if np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all():
      m = m.astype(bool)
    else:
      raise ValueError(
          f"A block layout is built from a hard (bool) mask, got dtype {m.dtype}. "
          "Binarise a relaxed / learned float mask first, e.g. `mask > 0.5` (block-sparse "
          "kernels execute bool masks only).")
  return as_4d(m)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """A static block-sparse layout of a bool mask (see the module docstring).

  Attributes:
    block_size: b, the tile side.
    q_len, k_len: unpadded query and key lengths Q, K.
    block_mask: int8 [Bm, Hm, NQ, NK]: 0 empty, 1 partial, 2 full.
    partial_blocks: bool [P, b, b], the unique partial tiles.
    partial_index: int32 [Bm, Hm, NQ, NK]: row of `partial_blocks` for partial tiles,
      -1 elsewhere.
  """
  block_size: int
  q_len: int
  k_len: int
  block_mask: np.ndarray
  partial_blocks: np.ndarray
  partial_index: np.ndarray

  def __post_init__(self):
    bm, pi = self.block_mask, self.partial_index
    b = self.block_size
    if bm.ndim != 4 or pi.shape != bm.shape:
      raise ValueError(f"block_mask {bm.shape} and partial_index {pi.shape} must both be "
                       "[Bm, Hm, NQ, NK].")
    if bm.shape[2:] != (-(-self.q_len // b), -(-self.k_len // b)):
      raise ValueError(f"block_mask has {bm.shape[2:]} tiles; lengths {self.q_len}, "
                       f"{self.k_len} at block size {b} need "
                       f"{(-(-self.q_len // b), -(-self.k_len // b))}.")
    if self.partial_blocks.shape[1:] != (b, b):
      raise ValueError(f"partial_blocks must be [P, {b}, {b}], got "
                       f"{self.partial_blocks.shape}.")
    for arr in (bm, pi, self.partial_blocks):
      arr.setflags(write=False)  # Layouts are hashed by content: keep them immutable.

  # ---- sizes and densities -------------------------------------------------------

  @property
  def num_q_blocks(self) -> int:
    return self.block_mask.shape[2]

  @property
  def num_k_blocks(self) -> int:
    return self.block_mask.shape[3]

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """The element-mask shape [Bm, Hm, Q, K] this layout stands for."""
    return self.block_mask.shape[:2] + (self.q_len, self.k_len)

  @property
  def block_density(self) -> float:
    """rho_block: non-empty tiles / all tiles (mean over Bm, Hm)."""
    return float(np.mean(self.block_mask != EMPTY))

  @property
  def full_block_fraction(self) -> float:
    """Fraction of non-empty tiles that are full (need no element mask)."""
    nonempty = np.sum(self.block_mask != EMPTY)
    return float(np.sum(self.block_mask == FULL) / max(nonempty, 1))

  @functools.cached_property
  def element_density(self) -> float:
    """rho_elem: kept (query, key) pairs / all Q*K pairs (mean over Bm, Hm)."""
    b = self.block_size
    kept = np.where(self.block_mask == FULL, b * b, 0).astype(np.int64)
    counts = self.partial_blocks.reshape(len(self.partial_blocks), b * b).sum(-1)
    part = self.partial_index >= 0
    kept[part] = counts[self.partial_index[part]]
    return float(kept.sum() / (np.prod(self.block_mask.shape[:2]) * self.q_len *
                               self.k_len))

  @functools.cached_property
  def fingerprint(self) -> str:
    """A content hash (hex) identifying the layout; equal layouts share it."""
    h = hashlib.sha1()
    h.update(np.asarray([self.block_size, self.q_len, self.k_len], np.int64).tobytes())
    for arr in (self.block_mask, self.partial_index, self.partial_blocks):
      h.update(str(arr.shape).encode())
      h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()

  def __hash__(self):
    return hash(self.fingerprint)

  def __eq__(self, other):
    return isinstance(other, BlockLayout) and self.fingerprint == other.fingerprint

  def __repr__(self):
    return (f"BlockLayout(shape={self.shape}, block_size={self.block_size}, "
            f"block_density={self.block_density:.4f}, "
            f"element_density={self.element_density:.4f}, "
            f"unique_partial_tiles={len(self.partial_blocks)})")

  # ---- views ---------------------------------------------------------------------

  def kv_lists(self, kind: str = "nonempty") -> tuple[np.ndarray, np.ndarray]:
    """Per (example, head, query block) the ascending list of key blocks of a kind.

    Args:
      kind: 'nonempty' (partial or full), 'partial' or 'full'.

    Returns:
      (num_blocks int32 [Bm, Hm, NQ], indices int32 [Bm, Hm, NQ, NK]): the first
      num_blocks[..., i] entries of indices[..., i, :] are the listed key blocks; the
      rest of the row repeats the last listed block (0 if none), so a kernel that reads
      past the count fetches nothing new.
    """
    sel = {"nonempty": self.block_mask != EMPTY, "partial": self.block_mask == PARTIAL,
           "full": self.block_mask == FULL}
    if kind not in sel:
      raise ValueError(f"kind must be 'nonempty', 'partial' or 'full', got {kind!r}.")
    on = sel[kind]
    num = on.sum(-1).astype(np.int32)
    nk = self.num_k_blocks
    # Stable sort puts listed blocks first, in ascending order.
    order = np.argsort(~on, axis=-1, kind="stable").astype(np.int32)
    last = np.take_along_axis(order, np.maximum(num - 1, 0)[..., None], axis=-1)
    last = np.where(num[..., None] > 0, last, 0)
    col = np.arange(nk, dtype=np.int32)
    indices = np.where(col < num[..., None], order, last).astype(np.int32)
    return num, indices

  def tile(self, bi: int, hi: int, qi: int, ki: int) -> np.ndarray:
    """The bool [b, b] element mask of one tile (all False / all True / stored)."""
    kind = self.block_mask[bi, hi, qi, ki]
    if kind == PARTIAL:
      return self.partial_blocks[self.partial_index[bi, hi, qi, ki]]
    return np.full((self.block_size,) * 2, kind == FULL)

  def to_element_mask(self, padded: bool = False) -> np.ndarray:
    """Rebuilds the element mask.

    Args:
      padded: keep the padded [NQ*b, NK*b] extent (padding is False).

    Returns:
      bool [Bm, Hm, Q, K] (or [Bm, Hm, NQ*b, NK*b] if padded).
    """
    b = self.block_size
    bm = self.block_mask
    tiles = np.broadcast_to((bm == FULL)[..., None, None], bm.shape + (b, b)).copy()
    part = self.partial_index >= 0
    tiles[part] = self.partial_blocks[self.partial_index[part]]
    m = tiles.transpose(0, 1, 2, 4, 3, 5).reshape(
        bm.shape[:2] + (bm.shape[2] * b, bm.shape[3] * b))
    return m if padded else m[..., :self.q_len, :self.k_len]

  # ---- exporters -----------------------------------------------------------------

  def save_npz(self, path: str | os.PathLike) -> None:
    """Writes the layout to a compressed .npz (reload with `load_npz`)."""
    np.savez_compressed(
        path, block_size=self.block_size, q_len=self.q_len, k_len=self.k_len,
        block_mask=self.block_mask, partial_blocks=self.partial_blocks,
        partial_index=self.partial_index)

  def to_flex(self) -> dict[str, Any]:
    """The FlexAttention block form (numpy; wrap with torch.as_tensor).

    `BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks,
    full_kv_indices, BLOCK_SIZE=block_size, mask_mod=...)` takes these arrays: kv_* list
    the partial tiles (where `mask_mod` is evaluated), full_kv_* the full tiles (no
    mask_mod). Sequences are padded to whole tiles as in this layout; the mask_mod must
    reproduce `to_element_mask()` on the partial tiles.

    The tiles cover the padded lengths NQ*b x NK*b; pass the real ones as
    `seq_lengths=tuple(SEQ_LENGTHS)` so that FlexAttention accepts inputs of Q x K tokens
    (without it, a block mask made at b = 128 refuses a 64-token input).

    Returns:
      {"kv_num_blocks": int32 [Bm, Hm, NQ], "kv_indices": int32 [Bm, Hm, NQ, NK],
       "full_kv_num_blocks": ..., "full_kv_indices": ..., "BLOCK_SIZE": b,
       "SEQ_LENGTHS": int64 [2] = (Q, K)}.
    """
    kv_num, kv_idx = self.kv_lists("partial")
    full_num, full_idx = self.kv_lists("full")
    return {"kv_num_blocks": kv_num, "kv_indices": kv_idx,
            "full_kv_num_blocks": full_num, "full_kv_indices": full_idx,
            "BLOCK_SIZE": self.block_size,
            "SEQ_LENGTHS": np.array([self.q_len, self.k_len], np.int64)}

  def to_splash_masks(self) -> np.ndarray:
    """Per-head padded element masks for Splash attention.

    Use as `MultiHeadMask([NumpyMask(m) for m in layout.to_splash_masks()])` (Splash has
    no batch axis: per-example layouts are not Splash-ready). Lengths are padded to
    whole tiles with False; pad q, k, v to match (padded queries output zero rows).

    Returns:
      bool [Hm, NQ*b, NK*b].
    """
    if self.block_mask.shape[0] != 1:
      raise ValueError("Splash attention masks cannot vary per example (its kernel has no "
                       f"batch axis); this layout has batch dim {self.block_mask.shape[0]}.")
    return self.to_element_mask(padded=True)[0]


def from_mask(mask: Any, block_size: int) -> BlockLayout:
  """Builds the block layout of a bool element mask.

  Args:
    mask: bool (or 0/1 integer) mask_QxK, mask_HxQxK or mask_BxHxQxK (B, H may be 1);
      numpy or JAX (copied to the host).
    block_size: b >= 1, the tile side.

  Returns:
    The BlockLayout.
  """
  if int(block_size) != block_size or block_size < 1:
    raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
  b = int(block_size)
  m = _as_bool_mask(mask)
  bm_, hm, q, k = m.shape
  nq, nk = -(-q // b), -(-k // b)
  padded = np.zeros((bm_, hm, nq * b, nk * b), dtype=bool)
  padded[..., :q, :k] = m
  tiles = padded.reshape(bm_, hm, nq, b, nk, b).transpose(0, 1, 2, 4, 3, 5)
  count = tiles.sum(axis=(-2, -1))
  block_mask = np.where(count == b * b, FULL, np.where(count > 0, PARTIAL, EMPTY))
  block_mask = block_mask.astype(np.int8)
  partial_index = np.full(block_mask.shape, -1, np.int32)
  part = block_mask == PARTIAL
  if part.any():
    packed = np.packbits(tiles[part].reshape(int(part.sum()), -1), axis=-1)
    uniq, inverse = np.unique(packed, axis=0, return_inverse=True)
    partial_blocks = np.unpackbits(uniq, axis=-1, count=b * b).astype(bool).reshape(
        -1, b, b)
    partial_index[part] = inverse.reshape(-1)
  else:
    partial_blocks = np.zeros((0, b, b), bool)
  return BlockLayout(block_size=b, q_len=q, k_len=k, block_mask=block_mask,
                     partial_blocks=partial_blocks, partial_index=partial_index)


def load_npz(path: str | os.PathLike) -> BlockLayout:
  """Reads a layout written by `BlockLayout.save_npz`."""
  with np.load(path) as z:
    missing = {"block_size", "q_len", "k_len", "block_mask", "partial_blocks",
               "partial_index"} - set(z.files)
    if missing:
      raise ValueError(f"{path} is not a block-layout .npz: missing {sorted(missing)}.")
    return BlockLayout(block_size=int(z["block_size"]), q_len=int(z["q_len"]),
                       k_len=int(z["k_len"]), block_mask=z["block_mask"].astype(np.int8),
                       partial_blocks=z["partial_blocks"].astype(bool),
                       partial_index=z["partial_index"].astype(np.int32))


def block_densities(mask: Any, block_sizes=(16, 32, 64, 128, 256)) -> dict[int, float]:
  """rho_block of a mask at several block sizes (to pick one), {b: rho_block}."""
  m = _as_bool_mask(mask)
  out = {}
  for b in block_sizes:
    nq, nk = -(-m.shape[2] // b), -(-m.shape[3] // b)
    padded = np.zeros(m.shape[:2] + (nq * b, nk * b), dtype=bool)
    padded[..., :m.shape[2], :m.shape[3]] = m
    out[int(b)] = float(padded.reshape(m.shape[:2] + (nq, b, nk, b)).any(
        axis=(-3, -1)).mean())
  return out


def window_of(mask: Any) -> tuple[int, int] | None:
  """(left, right) if a bool mask is one band -left <= j - i <= right for every head and
  example (what cuDNN's `local_window_size` skips), else None.

  Args:
    mask: bool mask_QxK / mask_HxQxK / mask_BxHxQxK (host side).
  """
  m = np.asarray(mask).astype(bool)
  m = m.reshape((-1,) + m.shape[-2:])
  if not np.all(m == m[:1]):
    return None
  m = m[0]
  q_len, k_len = m.shape
  if q_len != k_len or not m.any():
    return None
  off = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]     # j - i
  left = int(-off[m].min())
  right = int(off[m].max())
  if left < 0 or right < 0:
    return None
  band = (off >= -left) & (off <= right)
  return (left, right) if np.array_equal(band, m) else None

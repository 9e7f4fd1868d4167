"""Export a run's binarised masks as artifacts other runs and other kernels can use.

`export_masks(frozen, out_dir)` writes, atomically (into a temporary directory renamed
when complete, so `out_dir` is never half-written):

  masks.npz          {"layer_i": bool [H|1, n, n]}: the masks, True = may attend
  metadata.json      method, sequence length, densities per layer / head / block size, step,
                     source run, the method's own settings (lambda, temperature, ...)
  gates.json         per-layer gates (0 = sublayer or head pruned), when the run has any
  orbax/             an orbax checkpoint of the same masks (ocp.StandardCheckpointer)
  flex/layer_i.npz   FlexAttention block form at block size b (at most the sequence
                     length): kv_num_blocks, kv_indices, full_kv_num_blocks,
                     full_kv_indices, BLOCK_SIZE, SEQ_LENGTHS (BlockMask.from_kv_blocks)
  splash/layer_i.npy Splash-ready per-head element masks (NumpyMask / MultiHeadMask)
  png/layer_i.png    heatmaps, one panel per head
  LOADING.md         how to load these files into FlexAttention, Splash and another run
  .sparse_attn_export  marker: this directory is an export (and may be replaced)

Safety: an existing `out_dir` is replaced only when it is an earlier export (it has the
marker) or an empty directory; anything else (a folder of the user's, a run's workdir,
anything holding checkpoints) is refused with an error and left untouched. The old export
is moved aside, the new one renamed into place, and only then is the old one deleted.

A new run uses them as fixed masks with `config.masks.source = "<out_dir>"`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from sparse_attn.errors import UserError
from sparse_attn.masks import layout as layout_lib

MARKER = ".sparse_attn_export"
_RUN_FILES = ("checkpoints", "metrics.jsonl", "results.json", "tb", "_CHECKPOINT_METADATA")


def check_destination(out_dir: str | os.PathLike) -> pathlib.Path:
  """Returns `out_dir` (absolute) if an export may be written there, else raises.

  Raises:
    UserError: `out_dir` is a file, or a non-empty directory that is not an earlier export,
      or holds checkpoints or run files.
  """
  out_dir = pathlib.Path(out_dir).absolute()
  if not out_dir.exists():
    return out_dir
  if not out_dir.is_dir():
    raise UserError(f"Cannot export masks to {out_dir}: it is a file. Choose a directory "
                    "path that does not exist yet.")
  entries = sorted(p.name for p in out_dir.iterdir())
  run_files = [n for n in entries if n in _RUN_FILES or n.isdigit()]
  if run_files:
    raise UserError(f"Refusing to export masks to {out_dir}: it holds a run's files or "
                    f"checkpoints ({run_files[:4]}), which an export would replace. Export "
                    f"to a new directory, e.g. {out_dir / 'masks'}.")
  if entries and MARKER not in entries:
    raise UserError(f"Refusing to export masks to {out_dir}: the directory is not empty and "
                    f"is not an earlier mask export (no {MARKER} marker); it holds "
                    f"{entries[:4]}{' ...' if len(entries) > 4 else ''}. Export to a new "
                    "directory, or remove this one yourself.")
  return out_dir


def export_masks(frozen, out_dir: str | os.PathLike, *, block_size: int = 128,
                 heatmaps: bool = True) -> list[pathlib.Path]:
  """Writes the artifacts listed in the module docstring.

  Args:
    frozen: a `fixed_masks.FrozenStructure` (from `train.evaluate_workdir` or `Run.frozen`).
    out_dir: the directory to create; an existing one is replaced only if it is an
      earlier export or empty (see `check_destination`).
    block_size: tile size b of the FlexAttention form (128 = Flex's and Splash's default).
    heatmaps: also write PNG heatmaps.

  Returns:
    The paths written (relative to their final location).

  Raises:
    UserError: the run has no masks and no gates (dense: nothing to export), or
      `out_dir` may not be replaced (see `check_destination`).
  """
  arrays = frozen.mask_arrays()
  if not arrays and not frozen.gates:
    raise UserError("This run is dense (no masks, no gates): there is nothing to export.")
  out_dir = check_destination(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
  old = None
  try:
    _write(tmp, arrays, frozen, block_size, heatmaps)
    (tmp / MARKER).write_text(json.dumps({"format": 1}) + "\n")
    check_destination(out_dir)  # Again: it may have changed while writing.
    if out_dir.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=out_dir.name + ".old-", dir=out_dir.parent))
      os.replace(out_dir, old / "export")
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not out_dir.exists():
      os.replace(old / "export", out_dir)  # Put the earlier export back.
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  return sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MARKER)


def flex_block_size(block_size: int, n: int) -> int:
  """The FlexAttention tile for length n: `block_size`, or the largest power of two <= n
  when the sequence is shorter (a tile longer than the sequence pads it for nothing)."""
  b = int(block_size)
  while b > n and b > 1:
    b //= 2
  return max(b, 1)


def _write(d: pathlib.Path, arrays: dict[str, np.ndarray], frozen, block_size: int,
           heatmaps: bool) -> None:
  meta = dict(frozen.metadata)
  if arrays:
    block_size = flex_block_size(block_size, min(m.shape[-1] for m in arrays.values()))
  meta["export"] = {"block_size": block_size, "files": {
      "masks": "masks.npz", "flex": "flex/", "splash": "splash/", "orbax": "orbax/",
      "heatmaps": "png/" if heatmaps else None}}
  if arrays:
    np.savez_compressed(d / "masks.npz", **arrays)
    _write_orbax(d / "orbax", arrays)
    (d / "flex").mkdir()
    (d / "splash").mkdir()
    for name, m in arrays.items():
      lay = layout_lib.from_mask(m, block_size)
      np.savez_compressed(d / "flex" / f"{name}.npz", **lay.to_flex())
      np.save(d / "splash" / f"{name}.npy", lay.to_splash_masks())
      meta.setdefault("layers", {}).setdefault(name, {})[f"block_density_b{block_size}"] = (
          float(lay.block_density))
    if heatmaps:
      (d / "png").mkdir()
      for name, m in arrays.items():
        plot_layer(m, d / "png" / f"{name}.png", title=f"{name} ({meta.get('method')})")
  if frozen.gates:
    gates = {f"layer_{i}": (None if g is None else np.asarray(g).tolist())
             for i, g in enumerate(frozen.gates)}
    (d / "gates.json").write_text(json.dumps(gates, indent=1))
  (d / "metadata.json").write_text(json.dumps(meta, indent=1, default=_json_default))
  if arrays:
    name = sorted(arrays)[0]
    n = arrays[name].shape[-1]
    (d / "LOADING.md").write_text(LOADING.format(name=name, n=n, b=block_size))


LOADING = """# Loading these masks

Every `layer_i` mask is bool [H, {n}, {n}], True = may attend (`masks.npz`).

Densities in `metadata.json`, two accountings: `element_density` is the kept fraction of
the whole {n} x {n} matrix; `reported_density` is what the run's evaluation reported, per
split, over each example's valid (non-padding) pairs (short examples see only the top-left
corner). Recompute the latter for your own lengths with
`sum(sparse_attn.masks.stats.pair_weights(lengths, {n}) * mask.mean(0))`.

Another sparse_attn run: `--config.masks.source=<this directory>` (a longer run needs
`--config.masks.extrapolate=toeplitz`, for masks that depend on j - i only, or on
block offsets j // b - i // b: block DAM_s, windows rounded to whole tiles).

FlexAttention (PyTorch), e.g. {name}:

```python
import numpy as np, torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
f = np.load("flex/{name}.npz")
m = torch.as_tensor(np.load("masks.npz")["{name}"])       # [H, {n}, {n}] bool
mask_mod = lambda b, h, q, k: m[h if m.shape[0] > 1 else 0, q, k]
block_mask = BlockMask.from_kv_blocks(
    *(torch.as_tensor(f[k]) for k in ("kv_num_blocks", "kv_indices",
                                      "full_kv_num_blocks", "full_kv_indices")),
    BLOCK_SIZE=int(f["BLOCK_SIZE"]), mask_mod=mask_mod,
    seq_lengths=tuple(int(x) for x in f["SEQ_LENGTHS"]))    # ({n}, {n}), tiles of {b}
out = flex_attention(q, k, v, block_mask=block_mask)      # q, k, v: [B, H, {n}, D]
```

Splash attention (JAX, TPU), e.g. {name}:

```python
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
masks = np.load("splash/{name}.npy")       # [H, L, L], L = {n} padded to whole tiles
kernel = splash.make_splash_mha(
    splash.MultiHeadMask([splash.NumpyMask(m) for m in masks]),
    head_shards=1, q_seq_shards=1)
# Pad q, k, v ([H, L, D] per example) to L tokens with zeros; slice the output back to
# {n}. Splash tiles are multiples of 128: pad L up to one, with False rows and columns.
```
"""


def _json_default(o: Any):
  return o.tolist() if hasattr(o, "tolist") else str(o)


def _write_orbax(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {k: np.asarray(v) for k, v in arrays.items()})
    ckptr.wait_until_finished()


def load_orbax_masks(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the `orbax/` item of an export back into {"layer_i": bool array}."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(pathlib.Path(path).absolute())
  return {k: np.asarray(v) for k, v in tree.items()}


def plot_layer(mask_HxNxN: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
  """Saves a grid of per-head heatmaps (kept = dark) of one layer's [H, n, n] mask."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  m = np.asarray(mask_HxNxN)
  m = m.reshape((-1,) + m.shape[-2:])
  h = m.shape[0]
  cols = min(h, 4)
  rows = math.ceil(h / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows + 0.4),
                           squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < h:
      ax.imshow(m[i], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
      ax.set_title(f"head {i}: {m[i].mean():.0%} kept", fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)

"""Where a run's fixed masks come from: a named pattern, or masks exported by another run.

`build(config.masks, ...)` turns the `masks` config section into the per-layer mask pytree
(a tuple with one entry per layer, None = dense) at the run's maximum length n:
  source "none"      no fixed masks;
  source "pattern"   a named pattern from sparse_attn.masks.patterns on the chosen layers;
  source <path>      masks exported by a previous run (a directory with masks.npz and
                     metadata.json, or a run's workdir, whose latest checkpoint's masks item
                     is used).
Exported masks are position-indexed: loaded into a run of length n' < n they are sliced to
their top-left n' x n' block (exact for position-defined masks such as windows and DAM's
Toeplitz masks); n' > n is an error, since positions beyond n were never learned.

Leaves are [H|1, n, n]; the run structure (`sparse_attn.structure`) combines them with
learned masks, cuts them to each batch's length and adds sink-token links.
"""

from __future__ import annotations

import json
import pathlib
import re
import zipfile
import zlib
from typing import Any

import numpy as np

from sparse_attn import example_masks
from sparse_attn import learn
from sparse_attn.errors import UserError
from sparse_attn.masks import patterns, schedule, tree


def build(masks_cfg, bert_config, max_len: int) -> tuple | None:
  """The fixed mask pytree described by the `masks` config section (None = dense)."""
  n_layers = bert_config.num_hidden_layers
  source = masks_cfg.source
  if source in ("", "none", None):
    if masks_cfg.remove_diagonal:
      return _on_layers(~np.eye(max_len, dtype=bool)[None], masks_cfg, n_layers)
    return None
  if example_masks.is_example_source(source):   # Per example, from the batch: no position mask.
    if masks_cfg.remove_diagonal:
      raise UserError(f"masks.source={source!r} with masks.remove_diagonal: the per-example "
                      "masks keep every token's own link; drop remove_diagonal.")
    example_masks.settings(masks_cfg)   # Unknown kwargs fail here, before any data.
    return None
  if source == "pattern":
    m = np.asarray(patterns.build(masks_cfg.pattern, max_len, **dict(masks_cfg.kwargs)))
    if m.ndim == 2:
      m = m[None]
    if masks_cfg.remove_diagonal:
      m = patterns.remove_diagonal(m)
    return _on_layers(m, masks_cfg, n_layers)
  per_layer, meta = load_exported(source)
  if meta.get("example_masks"):
    _refuse_example_masks(meta, source)
  saved_sinks = list(meta.get("sink_tokens", []))
  if saved_sinks != list(masks_cfg.get("sink_tokens", ()) or ()):
    raise ValueError(
        f"The masks in {source} were learned with sink tokens {saved_sinks} (links to "
        "those tokens are not stored in the position masks), but this run has "
        f"masks.sink_tokens={list(masks_cfg.get('sink_tokens', ()) or ())}. Set "
        f"masks.sink_tokens={tuple(saved_sinks)} to reuse them as learned.")
  if len(per_layer) != n_layers:
    raise ValueError(f"Masks in {source} are for {len(per_layer)} layers (metadata "
                     f"num_layers) but the model has {n_layers}.")
  # The arrays' own length (load_exported checked it against metadata seq_len): slicing
  # below cuts masks to max_len, so shorter masks would only fail at the first long batch.
  n = min(m.shape[-1] for m in per_layer if m is not None)
  learned = int(meta.get("learned_extent", {}).get("max_train_len", n))
  rule = masks_cfg.get("extrapolate", "none")
  if rule not in EXTRAPOLATE_RULES:
    raise ValueError(f"masks.extrapolate={rule!r}: use one of {EXTRAPOLATE_RULES}.")
  if max_len > n and rule == "none":
    raise ValueError(f"Masks in {source} were made for sequence length {n}; this run uses "
                     f"data.max_len={max_len} > {n}. Set data.max_len <= {n}, learn masks "
                     "at the longer length, or set masks.extrapolate='toeplitz' (masks that "
                     "depend on j - i only: offsets beyond the learned range are dropped).")
  out = []
  for i, m in enumerate(per_layer):
    if m is None:
      out.append(None)
      continue
    m = np.asarray(m, bool)
    if rule == "toeplitz" and max_len > min(learned, n):
      m = extrapolate_toeplitz(m, max_len, min(learned, n), f"layer {i} of {source}")
    m = m[..., :max_len, :max_len]
    heads = bert_config.layer_heads(i)
    if m.shape[0] not in (1, heads):
      raise ValueError(f"Layer {i} mask in {source} has {m.shape[0]} heads; the model's "
                       f"layer {i} has {heads}.")
    if masks_cfg.remove_diagonal:
      m = patterns.remove_diagonal(m)
    out.append(m)
  return tuple(out)


def _refuse_example_masks(meta: dict[str, Any], source: Any) -> None:
  ex = meta["example_masks"]
  raise ExportedMasksError(
      f"The masks in {source} were per-example ({ex['source']!r} masks on layers "
      f"{ex['layers']}, built from each text): its position masks leave those layers "
      f"dense. Way out: set masks.source={ex['source']!r} (with the same masks.kwargs "
      "and layers) to build them for this run's data.")


EXTRAPOLATE_RULES = ("none", "toeplitz")


def extrapolate_toeplitz(m_HxNxN: np.ndarray, length: int, learned: int,
                         where: str = "the mask") -> np.ndarray:
  """A mask that depends on j - i only, rebuilt at `length` from its learned offsets.

  Also block-Toeplitz masks (block DAM_s, windows rounded to whole tiles): a mask that
  depends on j // b - i // b only, for the finest power of two b that fits (b = 1 is the
  element case). Leading global tokens (the first G rows and columns entirely kept,
  e.g. [CLS]) stay global. Inside the learned extent (positions < `learned`), every
  (block) diagonal must be constant; an offset never reached inside the extent was never
  learned, so it is dropped.

  Args:
    m_HxNxN: the exported bool mask.
    length: the new length L.
    learned: positions the mask was learned at (metadata `learned_extent.max_train_len`,
      else N).
    where: names the mask in errors.

  Returns:
    bool [H, L, L].

  Raises:
    ValueError: the mask is not (block-)Toeplitz within its learned extent (e.g. DAM_u).
  """
  h = m_HxNxN.shape[0]
  t = m_HxNxN[:, :learned, :learned]
  g = 0
  while g < learned and t[:, g, :].all() and t[:, :, g].all():
    g += 1
  if g == learned:   # Everything kept: a band at least as wide as the extent, no globals.
    g = 0
  core = t[:, g:, g:]
  for b in 2 ** np.arange(max(int(learned).bit_length(), 1)):
    values = _diagonal_values(core, g, int(b))
    if values is not None:
      b = int(b)
      break
  else:
    raise ValueError(f"masks.extrapolate='toeplitz': {where} does not depend on j - i (or "
                     "on j // b - i // b for a power of two b) only, apart from leading "
                     "global tokens, so it has no offsets to extend; learn the mask at the "
                     "longer length instead.")
  lo = (g // b) - ((learned - 1) // b)        # The learned block offsets: lo .. -lo.
  blocks = np.arange(g, length) // b
  off = blocks[None, :] - blocks[:, None]     # [L - G, L - G] block offsets j - i.
  keep = (off >= lo) & (off <= -lo)
  out = np.zeros((h, length, length), bool)
  out[:, g:, g:] = np.where(keep[None], values[:, np.clip(off - lo, 0, -2 * lo)], False)
  out[:, :g, :] = True
  out[:, :, :g] = True
  return out


def _diagonal_values(core_HxRxR: np.ndarray, g: int, b: int) -> np.ndarray | None:
  """[H, 2D + 1]: the value of each block offset d = -D .. D (positions g.. in absolute
  blocks of b), or None when the core is not constant along its block diagonals."""
  r = core_HxRxR.shape[-1]
  blocks = np.arange(g, g + r) // b
  off = blocks[None, :] - blocks[:, None]
  lo = int(off.min())
  # One representative pair per offset: row 0 for d >= 0, column 0 for d < 0.
  first_col = np.searchsorted(blocks, blocks[0] + np.arange(-lo + 1))
  first_row = np.searchsorted(blocks, blocks[0] + np.arange(1, -lo + 1))
  values = np.concatenate([core_HxRxR[:, first_row[::-1], 0],
                           core_HxRxR[:, 0, first_col]], axis=1)
  if not np.array_equal(values[:, off - lo], core_HxRxR):
    return None
  return values


def _on_layers(m, masks_cfg, n_layers):
  if masks_cfg.layers is not None:
    return schedule.per_layer(m, n_layers, layers=list(masks_cfg.layers))
  return schedule.later_layers(m, n_layers, int(masks_cfg.start_layer))


class ExportedMasksError(UserError):
  """Exported masks (masks.npz, metadata.json or a run's masks item) that cannot be used."""


_LAYER_KEY = re.compile(r"layer_(\d+)")
# Written by `freeze` into every export's metadata.json and every run's masks item.
_REQUIRED_META = ("seq_len", "num_layers", "num_heads")
_REEXPORT = ("Way out: export the masks again (`python eval.py --export_masks DIR` on the "
             "run that learned them) or set masks.source to another export.")


def load_exported(path: str | pathlib.Path) -> tuple[list, dict[str, Any]]:
  """Loads exported masks and checks every array against the metadata.

  Accepts a directory with masks.npz (+ metadata.json), a .npz file, or a run's workdir
  (its latest checkpoint's masks item). Without a metadata.json (a bare .npz) the arrays
  must agree with each other.

  Args:
    path: the export directory, .npz file or run workdir.

  Returns:
    (per_layer, metadata): per layer a bool [H, n, n] mask (1 <= H <= metadata num_heads,
    n = metadata seq_len) or None for a dense layer, num_layers entries; the metadata
    dict ({} for a bare .npz).

  Raises:
    FileNotFoundError: no masks at ``path``.
    ExportedMasksError (a ValueError): an unreadable or corrupt masks.npz, a metadata.json
      that is not a JSON object with positive integer seq_len / num_layers / num_heads,
      or an array that disagrees with it (key, dtype, shape, length, heads, layers);
      the message names the file and what mismatched.
  """
  path = pathlib.Path(path)
  meta: dict[str, Any] = {}
  if path.is_dir() and (path / "checkpoints").is_dir():
    from sparse_attn import checkpoint as ckpt_lib
    ck = ckpt_lib.Checkpointer(path / "checkpoints", async_save=False, read_only=True)
    try:
      got = ck.restore_masks()
      saved = ck.restore_config() if got is None or not got[0] else None
    finally:
      ck.close()
    if got is not None and got[1].get("example_masks"):
      _refuse_example_masks(got[1], path)
    source = ((saved or {}).get("masks") or {}).get("source")
    if example_masks.is_example_source(source):   # Its checkpoints hold no position masks.
      _refuse_example_masks({"example_masks": {
          "source": source, "layers": "as its config sets"}}, path)
    if got is None or not got[0]:  # A dense or gates-only run.
      raise FileNotFoundError(f"The run in {path} saved no masks.")
    arrays, meta = got
    where = meta_where = f"the masks of the latest checkpoint in {path / 'checkpoints'}"
    _check_metadata(meta, meta_where)
  else:
    npz = path / "masks.npz" if path.is_dir() else path
    if not npz.is_file():
      raise FileNotFoundError(f"No exported masks at {path}: expected a directory with "
                              "masks.npz (from `python eval.py --export_masks DIR`), a .npz "
                              "file, or a run's workdir.")
    arrays, where = _read_npz(npz), str(npz)
    meta_path = npz.parent / "metadata.json"
    if meta_path.is_file():
      meta = _read_metadata(meta_path)
      where = f"{npz} (against {meta_path})"
  return _check_arrays(arrays, meta, where), meta


def _read_npz(npz: pathlib.Path) -> dict[str, np.ndarray]:
  """All arrays of an .npz file, read fully (so that a corrupt member fails here)."""
  try:
    z = np.load(npz, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise ExportedMasksError(
          f"{npz} holds a single array, not an .npz archive of masks "
          "{'layer_<i>': bool [H, n, n]}. Save it with np.savez(path, layer_0=mask, ...).")
    with z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    if isinstance(e, ExportedMasksError):
      raise
    raise ExportedMasksError(f"{npz} is not a readable masks archive: it is corrupt, "
                             f"truncated or not an .npz file ({type(e).__name__}: {e}). "
                             + _REEXPORT) from e


def _read_metadata(meta_path: pathlib.Path) -> dict[str, Any]:
  """metadata.json as a dict, checked by `_check_metadata`."""
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ExportedMasksError(f"{meta_path}, line {e.lineno} column {e.colno}: not valid "
                             f"JSON ({e.msg}). {_REEXPORT}") from e
  except (OSError, UnicodeDecodeError) as e:
    raise ExportedMasksError(f"{meta_path} cannot be read ({e}). {_REEXPORT}") from e
  _check_metadata(meta, str(meta_path))
  return meta


def _check_metadata(meta: Any, where: str) -> None:
  """Checks the fields of exported-mask metadata that loading and `build` rely on."""
  way_out = (f"{_REEXPORT} Or fix it: an export's metadata.json is a JSON object with "
             "positive integers seq_len, num_layers and num_heads (delete it to use "
             "masks.npz alone).")
  if not isinstance(meta, dict):
    raise ExportedMasksError(f"{where} holds a JSON {type(meta).__name__}, not an object "
                             f"with the masks' metadata. {way_out}")
  for key in _REQUIRED_META:
    value = meta.get(key)
    if key not in meta:
      raise ExportedMasksError(f"{where} lacks {key!r}. {way_out}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ExportedMasksError(f"{where}: {key!r} is {value!r}; it must be a positive "
                               f"integer. {way_out}")
  sinks = meta.get("sink_tokens", [])
  if not isinstance(sinks, list) or not all(isinstance(t, str) for t in sinks):
    raise ExportedMasksError(f"{where}: 'sink_tokens' is {sinks!r}; it must be a list of "
                             f"token strings such as [\"[SEP]\"]. {way_out}")
  layers = meta.get("layers", {})
  if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
    raise ExportedMasksError(f"{where}: 'layers' must be an object of per-layer objects "
                             f"{{\"layer_<i>\": {{...}}}}. {way_out}")


def _check_arrays(arrays: dict[str, Any], meta: dict[str, Any], where: str) -> list:
  """[per layer bool [H, n, n] or None]: every array checked against ``meta`` (if any)."""
  def fail(problem):
    raise ExportedMasksError(f"Exported masks in {where}: {problem}. {_REEXPORT}")

  if not arrays:
    fail("no layer_<i> arrays (a dense run exports none)")
  bad = sorted(k for k in arrays if not _LAYER_KEY.fullmatch(k))
  if bad:
    fail(f"unexpected arrays {bad}; keys must be layer_<i>")
  n_want = meta.get("seq_len")
  num_layers = meta.get("num_layers") or 1 + max(int(k[6:]) for k in arrays)
  heads = meta.get("num_heads")
  for name in sorted(arrays, key=lambda k: int(k[6:])):
    m = arrays[name] = np.asarray(arrays[name])
    if m.dtype != np.bool_:
      fail(f"{name} has dtype {m.dtype}; masks are bool (True = may attend)")
    if m.ndim != 3 or m.shape[-1] != m.shape[-2] or m.shape[0] < 1:
      fail(f"{name} has shape {list(m.shape)}; expected [H, n, n] (H >= 1 heads, or 1 "
           "shared by all heads)")
    n_want = n_want or m.shape[-1]
    if m.shape[-1] != n_want:
      fail(f"{name} is {m.shape[-1]} x {m.shape[-1]} but "
           + (f"metadata seq_len is {meta['seq_len']}" if "seq_len" in meta else
              f"other layers are {n_want} x {n_want}"))
    if int(name[6:]) >= num_layers:
      fail(f"{name} is beyond metadata num_layers = {num_layers}")
    if heads is not None and m.shape[0] > heads:
      fail(f"{name} has {m.shape[0]} heads but metadata num_heads is {heads}")
    listed = meta.get("layers", {}).get(name, {}).get("head_density")
    if isinstance(listed, list) and len(listed) != m.shape[0]:
      fail(f"{name} has {m.shape[0]} heads but the metadata lists densities of "
           f"{len(listed)}")
  missing = sorted(set(meta.get("layers", {})) - set(arrays))
  if missing:
    fail(f"the metadata describes {missing} but the masks lack them (a truncated or "
         "mismatched masks.npz)")
  return [arrays.get(f"layer_{i}") for i in range(num_layers)]


# Moved in this release (kept here for one more): the mask-pytree operations live in
# `sparse_attn.masks.tree`, the one frozen-structure type is `learn.Frozen`.
FrozenStructure = learn.Frozen
combine = tree.combine
add_sinks = tree.add_sinks
resolve_sinks = tree.resolve_sinks
slice_masks = tree.slice_to

"""A run's structural masks: fixed masks from config, combination with learned ones, freezing.

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

Leaves are [H|1, n, n]; `slice_masks` cuts them to each batch's length L.

Sink tokens (`masks.sink_tokens`, e.g. ("[SEP]",)): every query may attend to every such
token of its example, whatever the mask (Longformer's token-defined global attention,
keys only; BERT heads park attention on [SEP] when they have nothing to do, Clark et al.
2019). The links depend on the tokens, so `add_sinks` applies them per batch, making the
masked layers' leaves per example [B, H|1, L, L].
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn import learn
from sparse_attn.masks import patterns, schedule, stats


@dataclasses.dataclass
class FrozenStructure:
  """The run's deterministic structure: bool masks and {0,1} gates, plus JSON metadata."""
  masks: tuple | None
  gates: tuple | None
  metadata: dict[str, Any]

  def mask_arrays(self) -> dict[str, np.ndarray]:
    """{"layer_i": bool [H|1, n, n]} for the layers that have a mask."""
    if self.masks is None:
      return {}
    return {f"layer_{i}": np.asarray(m) for i, m in enumerate(self.masks) if m is not None}


def build(masks_cfg, bert_config, max_len: int) -> tuple | None:
  """The fixed mask pytree described by the `masks` config section (None = dense)."""
  n_layers = bert_config.num_hidden_layers
  source = masks_cfg.source
  if source in ("", "none", None):
    if masks_cfg.remove_diagonal:
      return _on_layers(~np.eye(max_len, dtype=bool)[None], masks_cfg, n_layers)
    return None
  if source == "pattern":
    m = np.asarray(patterns.build(masks_cfg.pattern, max_len, **dict(masks_cfg.kwargs)))
    if m.ndim == 2:
      m = m[None]
    if masks_cfg.remove_diagonal:
      m = patterns.remove_diagonal(m)
    return _on_layers(m, masks_cfg, n_layers)
  per_layer, meta = load_exported(source)
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
  n = meta.get("seq_len") or next(m.shape[-1] for m in per_layer if m is not None)
  if max_len > n:
    raise ValueError(f"Masks in {source} were made for sequence length {n}; this run uses "
                     f"data.max_len={max_len} > {n}. Set data.max_len <= {n} or learn masks "
                     "at the longer length.")
  out = []
  for i, m in enumerate(per_layer):
    if m is None:
      out.append(None)
      continue
    m = np.asarray(m, bool)[..., :max_len, :max_len]
    heads = bert_config.layer_heads(i)
    if m.shape[0] not in (1, heads):
      raise ValueError(f"Layer {i} mask in {source} has {m.shape[0]} heads; the model's "
                       f"layer {i} has {heads}.")
    if masks_cfg.remove_diagonal:
      m = patterns.remove_diagonal(m)
    out.append(m)
  return tuple(out)


def _on_layers(m, masks_cfg, n_layers):
  if masks_cfg.layers is not None:
    return schedule.per_layer(m, n_layers, layers=list(masks_cfg.layers))
  return schedule.later_layers(m, n_layers, int(masks_cfg.start_layer))


def load_exported(path: str | pathlib.Path) -> tuple[list, dict[str, Any]]:
  """Loads exported masks: ([per layer bool array or None], metadata).

  Accepts a directory with masks.npz (+ metadata.json), a .npz file, or a run's workdir.
  """
  path = pathlib.Path(path)
  meta: dict[str, Any] = {}
  if path.is_dir() and (path / "checkpoints").is_dir():
    from sparse_attn import checkpoint as ckpt_lib
    ck = ckpt_lib.Checkpointer(path / "checkpoints", async_save=False)
    got = ck.restore_masks()
    ck.close()
    if got is None:
      raise FileNotFoundError(f"The run in {path} saved no masks.")
    arrays, meta = got
  else:
    npz = path / "masks.npz" if path.is_dir() else path
    if not npz.is_file():
      raise FileNotFoundError(f"No exported masks at {path}: expected a directory with "
                              "masks.npz (from `python eval.py --export_masks DIR`), a .npz "
                              "file, or a run's workdir.")
    with np.load(npz, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    meta_path = npz.parent / "metadata.json"
    if meta_path.is_file():
      meta = json.loads(meta_path.read_text())
  bad = [k for k in arrays if not k.startswith("layer_")]
  if bad:
    raise ValueError(f"Unexpected arrays {bad} in exported masks at {path}; keys must be "
                     "layer_<i>.")
  num_layers = meta.get("num_layers") or 1 + max(int(k.split("_")[1]) for k in arrays)
  per_layer = [arrays.get(f"layer_{i}") for i in range(num_layers)]
  for i, m in enumerate(per_layer):
    if m is not None and (m.ndim != 3 or m.shape[-1] != m.shape[-2]):
      raise ValueError(f"Exported mask layer_{i} has shape {m.shape}; expected [H, n, n].")
  return per_layer, meta


def combine(fixed, learned, mode: str = "and"):
  """Per layer, a fixed mask combined with a learned one.

  Args:
    fixed, learned: per-layer mask tuples (None entries = no mask) or None.
    mode: "and" (the learned mask within the fixed one, e.g. no diagonal) or "or" (the
      fixed links always kept in addition, e.g. global [CLS] links). Float learned masks
      are multiplied ("and") or maxed ("or") with the fixed {0, 1} mask.

  Returns:
    A per-layer tuple, or None.
  """
  if mode not in ("and", "or"):
    raise ValueError(f"masks.combine must be 'and' or 'or', got {mode!r}.")
  if fixed is None:
    return learned
  if learned is None:
    return fixed
  out = []
  for f, l in zip(fixed, learned):
    if l is None:  # Layers without a learned mask keep the fixed one (or stay dense).
      out.append(f)
    elif f is None:
      out.append(l)
    elif jnp.issubdtype(jnp.asarray(l).dtype, jnp.floating):
      f = jnp.asarray(f, l.dtype)
      out.append(l * f if mode == "and" else jnp.maximum(l, f))
    else:
      out.append(jnp.logical_and(f, l) if mode == "and" else jnp.logical_or(f, l))
  return tuple(out)


def add_sinks(masks, input_ids_BxL, sink_ids: tuple[int, ...]):
  """Keeps, in every masked layer, the links from each query to its example's sink tokens.

  Args:
    masks: per-layer tuple of leaves [..., L, L] (bool or float; None = dense) or None.
    input_ids_BxL: the batch's token ids.
    sink_ids: token ids every query may attend to (() = no change).

  Returns:
    The tuple with masked leaves [B, H|1, L, L]: bool masks OR-ed with the sink columns,
    float masks set to 1 there (so those entries pass no gradient to the mask); dense
    layers stay None.
  """
  if masks is None or not sink_ids:
    return masks
  sink_Bx1x1xL = jnp.isin(input_ids_BxL, jnp.asarray(sink_ids))[:, None, None, :]

  def add(m):
    if m is None:
      return None
    m = jnp.asarray(m)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape) if m.ndim < 4 else m
    if m.dtype == jnp.bool_:
      return m | sink_Bx1x1xL
    return jnp.where(sink_Bx1x1xL, jnp.ones((), m.dtype), m)  # No gradient at sinks.
  return tuple(add(m) for m in masks)


def resolve_sinks(tokens, tokenizer) -> tuple[int, ...]:
  """Token ids of `masks.sink_tokens` (token strings such as "[SEP]") in the vocabulary."""
  ids = []
  for t in tokens or ():
    i = tokenizer.token_to_id(t)
    if i is None:
      raise ValueError(f"masks.sink_tokens: {t!r} is not a token of the vocabulary; use "
                       "exact tokens such as '[SEP]', '[CLS]' or '.'.")
    ids.append(int(i))
  return tuple(ids)


def slice_masks(masks, length: int):
  """Cuts every [..., n, n] leaf to [..., length, length] (length <= n)."""
  if masks is None:
    return None
  def cut(m):
    if m is None:
      return None
    if m.shape[-1] < length:
      raise ValueError(f"A mask of length {m.shape[-1]} cannot serve a batch of length "
                       f"{length}; build masks at data.max_len.")
    return m[..., :length, :length]
  return tuple(cut(m) for m in masks)


def freeze(structure, fixed, structure_params, bert_config, max_len: int, *, step: int,
           workdir: str, mode: str = "and") -> FrozenStructure:
  """The deterministic structure used by evaluation, checkpoints and export."""
  learned = structure.freeze(jax.device_get(structure_params)) if structure else None
  masks = combine(fixed, learned.masks if learned else None, mode)
  if masks is not None:
    masks = tuple(None if m is None else np.asarray(m, bool) for m in masks)
    masks = tuple(None if m is None else (m if m.ndim == 3 else m.reshape(m.shape[-3:]))
                  for m in masks)
  gates = learned.gates if learned else None
  meta = {"method": structure.name if structure else ("fixed" if fixed else "dense"),
          "seq_len": max_len, "num_layers": bert_config.num_hidden_layers,
          "num_heads": bert_config.num_attention_heads, "step": step, "source_run": workdir}
  if masks is not None:
    meta["layers"] = {
        f"layer_{i}": {"element_density": float(m.mean()),
                       "head_density": [float(x) for x in m.reshape(m.shape[0], -1).mean(1)],
                       "block_density": {str(b): stats.block_density(m, b)
                                         for b in (16, 32, 64, 128) if b <= max_len}}
        for i, m in enumerate(masks) if m is not None}
    kept = [m.mean() for m in masks if m is not None] + [1.0] * sum(
        m is None for m in masks)
    meta["element_density"] = float(np.mean(kept))
  if gates is not None:
    meta["gates"] = [None if g is None else np.asarray(g).tolist() for g in gates]
  if learned:
    meta["learned"] = learned.metadata
  return FrozenStructure(masks=masks, gates=gates, metadata=meta)

"""Section (e): MiniLM at long lengths on real long documents, dense vs the fast path.

At each length L (batch B = max(1, 2048 // L): 2,048 tokens a batch up to L = 2048), MiniLM's
architecture with positions extended to L runs `linux_docs` documents (the validation
split, truncated or padded to L) as inference and as a train step:

  dense              no mask (the baseline the speed-ups divide)
  masked             the Longformer mask (band ±window + global [CLS]) on the dense reference
  auto               the same mask prepared by the policy (`attention.prepare`): what
                     attention_backend='auto' runs in training and evaluation
  learned            with `learned=DIR` (`--e2e-learned`): a frozen learned mask exported
                     by a run (e.g. the block DAM of `configs/longdoc.py:dam`), one per
                     layer, loaded as `masks.source=DIR` loads it (sliced to L, or extended
                     past its length with the explicit `masks.extrapolate='toeplitz'`
                     rule), prepared by the policy layer by layer
  no_attention_core  attention replaced by q + k + v: the attention share f of the step

Amdahl bound of a step: 1 / ((1 - f) + f * rho_block), f = 1 - t(no core) / t(dense);
`of_bound` = (t(dense) / t(auto)) / bound (for `learned`, with its own rho_block, the mean
over layers). A step whose dense version would not fit in memory (estimated from the
[B, H, L, L] score tensors it keeps) is skipped and says so.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from sparse_attn import attention
from sparse_attn.bench import timing
from sparse_attn.bench.long_model import _noop_backend
from sparse_attn.bench.model_steps import model_fns
from sparse_attn.masks import patterns

# Score tensors of [B, H, L, L] float32 the dense train step keeps per layer (measured:
# MiniLM at L = 1024, B = 8 peaked above 24 GB).
_KEPT_PER_LAYER = 6


def _ram_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dense_fits(cfg, batch: int, length: int, train: bool) -> tuple[bool, float]:
  """(whether the dense step fits in half of RAM, its estimated GB)."""
  tensor = batch * cfg.num_attention_heads * length * length * 4
  gb = tensor * (_KEPT_PER_LAYER * cfg.num_hidden_layers if train else 3) / 1e9
  return gb * 1e9 < 0.5 * _ram_bytes(), gb


def _document_ids(length: int, batch: int, quick: bool, vocab: int) -> np.ndarray:
  if quick:
    return np.random.default_rng(1).integers(1, vocab, (batch, length)).astype(np.int32)
  from sparse_attn.data import linux_docs, text
  tok = text.load_tokenizer()
  docs = linux_docs.linux_docs("validation")
  enc = text.encode_texts(tok, docs.texts[:batch * 4], length)
  order = np.argsort(-enc.lengths, kind="stable")[:batch]     # The longest documents.
  ids = np.zeros((batch, length), np.int32)
  for r, i in enumerate(order):
    row = enc.input_ids[enc.offsets[i]:enc.offsets[i + 1]]
    ids[r, :len(row)] = row
  return ids


def learned_masks(source: str, cfg, length: int) -> tuple:
  """A run's exported masks at `length`, per layer, as `masks.source=source` loads them
  (with `masks.extrapolate='toeplitz'` past their length)."""
  from sparse_attn import config as config_lib
  from sparse_attn import fixed_masks
  masks_cfg = config_lib.base_config().masks
  masks_cfg.source, masks_cfg.extrapolate = str(source), "toeplitz"
  return fixed_masks.build(masks_cfg, cfg, length)


def _prepare_layers(masks: tuple, head_dim: int) -> tuple[tuple, list]:
  """Per layer, what the policy prepares and its Choice (a shared array once)."""
  done: dict[int, tuple] = {}
  for m in masks:
    if id(m) not in done:
      done[id(m)] = attention.prepare_with_choice(m, head_dim=head_dim)
  return (tuple(done[id(m)][0] for m in masks), [done[id(m)][1] for m in masks])


def bench_e2e(cfg, lengths, window: int, repeats: int, quick: bool = False,
              learned: str | None = None) -> list[dict]:
  """Rows per length: times of the variants in the module docstring, share, bound.

  Args:
    cfg: the MiniLM BertConfig (positions are extended to each length).
    lengths: the sequence lengths L.
    window: the Longformer band half-width.
    repeats: interleaved timing repeats.
    quick: random token ids instead of `linux_docs` documents (tests).
    learned: a run's exported masks directory for the `learned` variant, or None.
  """
  attention.register_backend("bench_noop")(_noop_backend)
  rows = []
  for length in lengths:
    batch = max(1, 2048 // length) if not quick else 2
    c = dataclasses.replace(cfg, max_position_embeddings=max(length, 512),
                            attention_backend="auto")
    c_dense = dataclasses.replace(c, attention_backend="dense")
    c_noop = dataclasses.replace(c, attention_backend="bench_noop")
    mask = patterns.longformer(length, window, 1)
    prepared, choice = attention.prepare_with_choice(mask, head_dim=c.head_dim)
    ids = _document_ids(length, batch, quick, c.vocab_size)
    variants = {"dense": (c, None), "masked": (c_dense, mask), "auto": (c, prepared),
                "no_attention_core": (c_noop, None)}
    row = {"L": length, "batch": batch, "window": window, "auto": choice.executor,
           "auto_reason": choice.reason, "block_size": choice.block_size,
           "rho_block": choice.block_density, "rho_elem": float(mask.mean()), "times": {},
           "skipped": {}}
    if learned is not None:
      per_layer = learned_masks(learned, c, length)
      prepared_layers, choices = _prepare_layers(per_layer, c.head_dim)
      variants["learned"] = (c, prepared_layers)
      row["learned"] = {
          "source": str(learned),
          "executors": [f"{ch.executor} (b={ch.block_size})" for ch in choices],
          "rho_block": float(np.mean([1.0 if ch.block_density is None else ch.block_density
                                      for ch in choices])),
          "rho_elem": float(np.mean([1.0 if m is None else m.mean() for m in per_layer]))}
    for mode in ("infer", "train"):
      fits, gb = dense_fits(c, batch, length, mode == "train")
      fns = {}
      for name, (cc, m) in variants.items():
        if name in ("dense", "masked") and not fits:
          row["skipped"][f"{name}/{mode}"] = f"would need ~{gb:.0f} GB"
          continue
        inf, tr = model_fns(cc, batch, length, m, ids=ids)
        fns[f"{name}/{mode}"] = inf if mode == "infer" else tr
      row["times"].update(timing.interleaved(fns, repeats))
      row[mode] = _summary(row["times"], mode, row["rho_block"] or 1.0)
      if learned is not None and row[mode]:
        row[mode]["learned"] = _summary(row["times"], mode, row["learned"]["rho_block"],
                                        variant="learned")
      print(f"[e2e] L={length} {mode}: " + ", ".join(
          f"{k.split('/')[0]} {v['median'] * 1e3:.0f} ms" for k, v in row["times"].items()
          if k.endswith(mode)) + (f"; {row[mode]}" if row[mode] else ""), flush=True)
    rows.append(row)
  return rows


def _summary(t: dict, mode: str, rho: float, variant: str = "auto") -> dict | None:
  get = lambda k: t.get(f"{k}/{mode}", {}).get("median")
  dense, timed, noop, masked = (get("dense"), get(variant), get("no_attention_core"),
                                get("masked"))
  if dense is None:
    return None
  share = max(0.0, 1.0 - noop / dense)
  bound = 1.0 / ((1.0 - share) + share * rho)
  speedup = dense / timed
  return {"attention_share": share, "amdahl_bound": bound, "speedup_vs_dense": speedup,
          "of_bound": speedup / bound, f"{variant}_over_dense": timed / dense,
          "speedup_vs_masked": masked / timed if masked and variant == "auto" else None}

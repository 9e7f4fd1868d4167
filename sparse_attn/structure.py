"""A run's attention structure, built once: learned method + fixed masks + sink links.

The train and eval steps see one object instead of loose values:

  structure = build(config, bert_config, tokenizer, lengths)
  params = structure.init(rng)                                # {} without a learned method
  s = structure.sample(params, rng, step, batch)              # one training step's inputs
  model.apply(..., masks=s.masks, gates=s.gates); loss += s.penalty
  frozen = structure.freeze(params, step=..., workdir=...)    # deterministic, host-side
  masks, gates = structure.inputs(frozen, batch)              # evaluation / prediction

Inside: the learned masks are combined with the fixed ones (`masks.combine`), cut to the
batch's length and given the batch's sink-token links (`masks.tree`), so the masks a step
receives are ready for `BertModel.apply`. `prepare(frozen, length)` is where a frozen or
fixed structure is turned into what the fast attention backend runs, once per length
bucket (today it returns the masks cut to that length).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sparse_attn import fixed_masks
from sparse_attn import learn
from sparse_attn.masks import stats, tree

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RunStructure:
  """The structure of one run (see the module docstring).

  Attributes:
    learned: the learned-structure method (`learn.Structure`) or None.
    fixed: the run's fixed mask pytree (tuple per layer of bool [H|1, n, n] / None) or None.
    combine: how fixed and learned masks combine per layer ("and" | "or").
    sink_ids: token ids every query may attend to in masked layers (`masks.tree.add_sinks`).
    sink_tokens: the same sinks as token strings (recorded in the frozen metadata).
    num_layers, num_heads: the model's layer count and (unpruned) heads per layer.
    max_len: n, the run's maximum sequence length (every mask is built at n x n).
  """
  learned: learn.Structure | None
  fixed: tuple | None
  combine: str
  sink_ids: tuple[int, ...]
  sink_tokens: tuple[str, ...]
  num_layers: int
  num_heads: int
  max_len: int

  @property
  def name(self) -> str:
    """The method recorded in mask metadata: a learned method's name, "fixed" or "dense"."""
    if self.learned is not None:
      return self.learned.name
    return "fixed" if self.fixed is not None else "dense"

  def init(self, rng: Array) -> Any:
    """The structure parameters (their own optimizer group); {} without a learned method."""
    return self.learned.init(rng) if self.learned is not None else {}

  def sample(self, params: Any, rng: Array, step: Array, batch: dict[str, Array],
             train: bool = True) -> learn.Sample:
    """One step's structure for `batch`: masks ready for the model, gates, penalty.

    Args:
      params: the structure parameters (`init`).
      rng: a key for the relaxation's noise.
      step: the training step (temperature and target schedules).
      batch: the batch (its `input_ids` [B, L] give the length and the sink tokens).
      train: sample with noise (training) or deterministically.

    Returns:
      A `learn.Sample` whose masks are per-layer leaves [..., L, L] (per example
      [B, H|1, L, L] when sinks apply), combined with the fixed masks.
    """
    if self.learned is None:
      return learn.Sample(masks=self._for_batch(self.fixed, batch))
    s = self.learned.sample(params, rng, step, train)
    masks = tree.combine(self.fixed, s.masks, self.combine)
    return learn.Sample(masks=self._for_batch(masks, batch), gates=s.gates,
                        penalty=s.penalty, metrics=s.metrics)

  def inputs(self, frozen: learn.Frozen, batch: dict[str, Array]) -> tuple[Any, Any]:
    """(masks, gates) of a frozen structure for `batch`: cut to its length, with sinks."""
    return self._for_batch(frozen.masks, batch), frozen.gates

  def prepare(self, frozen: learn.Frozen, length: int) -> Any:
    """A frozen structure's masks for batches of `length` tokens (once per length bucket).

    The place where a frozen or fixed structure becomes what the attention backend runs;
    today the per-layer masks cut to `length` (per-example sink links are added per batch).
    """
    return tree.slice_to(frozen.masks, length)

  def _for_batch(self, masks: Any, batch: dict[str, Array]) -> Any:
    ids_BxL = batch["input_ids"]
    return tree.add_sinks(tree.slice_to(masks, ids_BxL.shape[1]), ids_BxL, self.sink_ids)

  def freeze(self, params: Any, *, step: int, workdir: str) -> learn.Frozen:
    """The deterministic structure that evaluation, checkpoints and export use.

    Args:
      params: the structure parameters (host or device arrays).
      step: the training step, recorded in the metadata.
      workdir: the run's directory, recorded as `source_run`.

    Returns:
      A `learn.Frozen`: per layer bool [H|1, n, n] masks (None = dense) or None, {0, 1}
      gates or None, and JSON metadata (method, seq_len, layers, heads, per-layer element /
      head / block densities over the n x n matrix, sinks, the method's own metadata).
    """
    learned = (self.learned.freeze(jax.device_get(params)) if self.learned is not None
               else None)
    masks = tree.combine(self.fixed, learned.masks if learned else None, self.combine)
    if masks is not None:
      masks = tuple(None if m is None else np.asarray(m, bool) for m in masks)
      masks = tuple(None if m is None else (m if m.ndim == 3 else m.reshape(m.shape[-3:]))
                    for m in masks)
    gates = learned.gates if learned else None
    meta: dict[str, Any] = {
        "method": self.name, "seq_len": self.max_len, "num_layers": self.num_layers,
        "num_heads": self.num_heads, "step": step, "source_run": workdir}
    if masks is not None:
      meta["layers"] = {f"layer_{i}": _layer_metadata(m, self.max_len)
                        for i, m in enumerate(masks) if m is not None}
      kept = ([float(tree.density(m).mean()) for m in masks if m is not None]
              + [1.0] * sum(m is None for m in masks))
      meta["element_density"] = float(np.mean(kept))
    if gates is not None:
      meta["gates"] = [None if g is None else np.asarray(g).tolist() for g in gates]
    if learned:
      meta["learned"] = learned.metadata
    if self.sink_ids:  # Token-defined links are not in the position masks: record them.
      meta["sink_tokens"] = list(self.sink_tokens)
      meta["sink_token_ids"] = list(self.sink_ids)
    return learn.Frozen(masks=masks, gates=gates, metadata=meta)


def _layer_metadata(m_HxNxN: np.ndarray, n: int) -> dict[str, Any]:
  """Element, per-head and block densities of one frozen layer mask (n x n accounting)."""
  return {"element_density": float(tree.density(m_HxNxN).mean()),
          "head_density": [float(tree.density(h).mean()) for h in m_HxNxN],
          "block_density": {str(b): stats.block_density(m_HxNxN, b)
                            for b in (16, 32, 64, 128) if b <= n}}


def build(config: Any, bert_config: Any, tokenizer: Any = None,
          lengths: Any = None, *, learned: bool = True) -> RunStructure:
  """The run structure described by `config.masks` and `config.structure`.

  Args:
    config: the experiment config (its `masks`, `structure` and `data.max_len`).
    bert_config: the model's BertConfig.
    tokenizer: resolves `masks.sink_tokens` to ids (needed only when sinks are set).
    lengths: [E] token counts of the training examples (methods that measure density over
      the data's valid pairs need them).
    learned: build the learned method. A finished run's learned structure is its frozen
      structure (read from its checkpoint), so restoring a run needs no sampler.
  """
  max_len = int(config.data.max_len)
  sink_tokens = tuple(config.masks.get("sink_tokens", ()) or ())
  if sink_tokens and tokenizer is None:
    raise ValueError("masks.sink_tokens needs the run's tokenizer to resolve the tokens.")
  method = (learn.build(config.structure, bert_config, max_len, lengths=lengths)
            if learned else None)
  return RunStructure(
      learned=method, fixed=fixed_masks.build(config.masks, bert_config, max_len),
      combine=config.masks.combine,
      sink_ids=tree.resolve_sinks(sink_tokens, tokenizer) if sink_tokens else (),
      sink_tokens=sink_tokens, num_layers=bert_config.num_hidden_layers,
      num_heads=bert_config.num_attention_heads, max_len=max_len)

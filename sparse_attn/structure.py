"""A run's attention structure, built once: learned method + fixed masks + sink links.

The train and eval steps see one object instead of loose values:

  structure = build(config, bert_config, tokenizer, lengths)
  params = structure.init(rng)                                # {} without a learned method
  s = structure.sample(params, rng, step, batch)              # one training step's inputs
  model.apply(..., masks=s.masks, gates=s.gates); loss += s.penalty
  frozen = structure.freeze(params, step=..., workdir=...)    # deterministic, host-side
  p = structure.prepare(frozen.masks, length)                 # once per length bucket
  masks, gates = structure.inputs(frozen, batch, p)           # evaluation / prediction

Inside: the learned masks are combined with the fixed ones (`masks.combine`), cut to the
batch's length and given the batch's sink-token links (`masks.tree`), so the masks a step
receives are ready for `BertModel.apply`.

The fast path: `prepare(masks, length)` turns frozen or fixed bool masks into what the
attention backend runs (`attention.prepare_with_choice`: a `BlockSparseMask` where the
policy says block-sparse pays, the bool array otherwise), on the host, once per length
bucket. A structure without a learned method prepares its fixed masks the first time a
step is traced at a length for a platform (`sample`, `attention.platform()`), so
training with fixed or exported masks runs block-sparse; evaluation prepares the frozen structure once per bucket and split.
Masks learned while training (DAM logits, soft windows) are float and keep the dense,
differentiable path. Sink links are per example, which a static block layout cannot
express: runs with `masks.sink_tokens` keep the dense path, and say so.
`executors` records, per length, which executor each layer ran and why.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from sparse_attn import attention
from sparse_attn import example_masks
from sparse_attn import fixed_masks
from sparse_attn import learn
from sparse_attn.masks import stats, tree

Array = jax.Array
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A structure's masks for one length bucket, ready for the attention backend.

  Attributes:
    masks: per layer a `BlockSparseMask`, a bool array [H|1, L, L] or None (dense), or
      None for a dense model.
    executors: per layer "executor: reason" (what runs it and why).
  """
  masks: tuple | None
  executors: tuple[str, ...]


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
    max_train_len: the longest training example (tokens), if known: positions at or past
      it were never trained, so `freeze` keeps no learned link there.
    backend: the model's `attention_backend` ('auto', 'dense' or a block-sparse executor):
      what `prepare` prepares for.
    dtype, head_dim: the attention inputs' dtype and head size (the policy's inputs).
    layer_heads: heads per layer of the model (0 = no attention sublayer; None = every
      layer has num_heads), for the density accountings.
    example_layers: layers that apply the batch's per-example mask (`example_mask`,
      `sparse_attn.example_masks`); example_source names it ("syntax" / "lexical").
    executors: {length: per layer "executor: reason"}, filled by `prepare`.
  """
  learned: learn.Structure | None
  fixed: tuple | None
  combine: str
  sink_ids: tuple[int, ...]
  sink_tokens: tuple[str, ...]
  num_layers: int
  num_heads: int
  max_len: int
  max_train_len: int | None = None
  backend: str = "dense"
  dtype: str = "float32"
  head_dim: int | None = None
  layer_heads: tuple[int, ...] | None = None
  example_layers: tuple[int, ...] = ()
  example_source: str = ""
  executors: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
  _fixed: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

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
      # Host side, once per length and target platform (at trace time): the policy's
      # choice depends on both (`attention.target_platform`).
      key = (attention.platform(), batch["input_ids"].shape[1])
      if key not in self._fixed:
        self._fixed[key] = self.prepare(self.fixed, key[1])
      return learn.Sample(masks=self._for_batch(self._fixed[key].masks, batch))
    s = self.learned.sample(params, rng, step, train)
    masks = tree.combine(self.fixed, s.masks, self.combine)
    return learn.Sample(masks=self._for_batch(masks, batch), gates=s.gates,
                        penalty=s.penalty, metrics=s.metrics)

  def inputs(self, frozen: learn.Frozen, batch: dict[str, Array]) -> tuple[Any, Any]:
    """(masks, gates) of a frozen structure for `batch`: cut to its length, with sinks.

    `frozen.masks` may be the run's n x n masks or what `prepare` made of them for this
    batch's length (block-sparse objects pass through unchanged).
    """
    return self._for_batch(frozen.masks, batch), frozen.gates

  def prepare(self, masks: Any, length: int) -> Prepared:
    """Frozen or fixed bool masks for batches of `length` tokens, ready for the backend.

    Args:
      masks: per-layer bool masks [H|1, n, n] (n >= length) / None, or None.
      length: the batch length L (a length bucket).

    Returns:
      A `Prepared` (recorded in `executors[length]` and logged once per length).
    """
    n = self.num_layers
    if masks is None and self.example_layers:
      masks = (None,) * n
    if masks is None:
      prepared, why = None, ("dense: no mask",) * n
    else:
      cut = tree.slice_to(masks, length)
      out, why = [], []
      for i, m in enumerate(cut):
        if i in self.example_layers:
          out.append(m)
          why.append(f"dense: per-example ({self.example_source}) masks")
        elif m is None:
          out.append(None)
          why.append("dense: no mask")
        elif self.sink_ids or np.asarray(m).dtype != bool:
          out.append(m)
          why.append("dense: per-example sink links have no block-sparse form"
                     if self.sink_ids else "dense: a relaxed (float) mask")
        else:
          # Concrete device arrays even when called while a step is traced: the object
          # is cached and reused by other traces.
          with jax.ensure_compile_time_eval():
            obj, c = attention.prepare_with_choice(
                np.asarray(m), executor=self.backend, dtype=np.dtype(self.dtype),
                head_dim=self.head_dim)
          out.append(obj)
          why.append(f"{c.executor}: {c.reason}")
      prepared = tuple(out)
    if self.executors.get(length) != tuple(why):
      log.info("attention at L=%d: %s", length, "; ".join(
          f"layer {i}: {w}" for i, w in enumerate(why)))
      self.executors[length] = tuple(why)
    return Prepared(masks=prepared, executors=tuple(why))

  def _for_batch(self, masks: Any, batch: dict[str, Array]) -> Any:
    ids_BxL = batch["input_ids"]
    masks = tree.add_sinks(tree.slice_to(masks, ids_BxL.shape[1]), ids_BxL, self.sink_ids)
    if not self.example_layers:
      return masks
    if "example_mask" not in batch:
      raise ValueError(f"masks.source={self.example_source!r} needs each batch's "
                       "per-example masks (`example_mask`, made by the dataset from its "
                       "texts: sparse_attn.example_masks.attach); this batch has none.")
    return tree.add_example_masks(masks, batch["example_mask"], self.example_layers,
                                  self.num_layers)

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
    trained = self.max_train_len if learned and learned.masks is not None else None
    if trained is not None and trained < self.max_len:
      learned = dataclasses.replace(learned, masks=tuple(
          None if m is None else _within(np.asarray(m, bool), trained) for m in learned.masks))
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
    if trained is not None:
      meta["learned_extent"] = {
          "max_train_len": int(trained),
          "rule": "learned links at positions >= max_train_len (never reached by a "
                  "training example, so never trained) are dropped"}
    if self.example_layers:  # Per-example masks are not position masks: record them.
      meta["example_masks"] = {"source": self.example_source,
                               "layers": list(self.example_layers)}
    if self.sink_ids:  # Token-defined links are not in the position masks: record them.
      meta["sink_tokens"] = list(self.sink_tokens)
      meta["sink_token_ids"] = list(self.sink_ids)
    return learn.Frozen(masks=masks, gates=gates, metadata=meta)


def _within(m_HxNxN: np.ndarray, length: int) -> np.ndarray:
  """A bool mask with every link at a query or key position >= `length` removed."""
  out = m_HxNxN.copy()
  out[..., length:, :] = False
  out[..., :, length:] = False
  return out


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
      num_heads=bert_config.num_attention_heads, max_len=max_len,
      max_train_len=(int(np.max(lengths)) if lengths is not None and len(lengths)
                     else None),
      backend=bert_config.attention_backend, dtype=np.dtype(bert_config.dtype).name,
      head_dim=bert_config.hidden_size // bert_config.num_attention_heads,
      layer_heads=tuple(bert_config.layer_heads(i)
                        for i in range(bert_config.num_hidden_layers)),
      example_layers=(example_masks.layers(config.masks, bert_config.num_hidden_layers)
                      if example_masks.is_example_source(config.masks.source) else ()),
      example_source=(config.masks.source
                      if example_masks.is_example_source(config.masks.source) else ""))

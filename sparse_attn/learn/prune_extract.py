"""Physical removal of pruned attention: the smaller BertModel that hard gates describe.

`extract` drops the attention sublayer of each layer whose gate is 0 and slices pruned heads
out of the query/key/value/output parameters; `extract_task` does the same inside a task
model's "bert" subtree. The result computes what the gated full model computes. Shape
legend: H heads, K head dim, D hidden size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sparse_attn.learn import base as learn


# Head axis of each attention parameter (model.SelfAttention's DenseGeneral layouts):
# query/key/value kernel [D, H, K], bias [H, K]; output kernel [H, K, D], bias [D] (kept).
_HEAD_AXIS = {("query", "kernel"): 1, ("query", "bias"): 0, ("key", "kernel"): 1,
              ("key", "bias"): 0, ("value", "kernel"): 1, ("value", "bias"): 0,
              ("output", "kernel"): 0}


def _take_heads(leaf: Any, idx: np.ndarray, axis: int) -> Any:
  """Slices heads out of a parameter, boxed (flax partitioning metadata) or not."""
  if isinstance(leaf, nn.meta.AxisMetadata):
    return leaf.replace_boxed(jnp.take(leaf.unbox(), idx, axis=axis))
  return jnp.take(jnp.asarray(leaf), idx, axis=axis)


def _gate_values(gate: Any, where: str) -> np.ndarray:
  g = np.asarray(gate, np.float32)
  if not np.all((g == 0) | (g == 1)):
    raise ValueError(f"{where}: gates must be hard {{0, 1}} to extract a pruned model; got "
                     f"{g.tolist()}. Use structure.freeze(params).gates.")
  return g


def extract(bert_config: Any, params: Mapping[str, Any], frozen_gates: Any
            ) -> tuple[Any, dict[str, Any]]:
  """Builds the physically smaller model that the hard gates describe.

  A layer whose gate is 0 (scalar, or every head 0) loses its attention sublayer:
  heads_per_layer[i] = 0 and its "attention" params are deleted, with "attention_LayerNorm"
  too unless BertConfig.pruned_keep_layernorm. Per-head gates slice the pruned heads out of
  the query/key/value kernels and biases and the output kernel (heads_per_layer[i] = kept
  count). The result equals the gated full model on the same inputs (up to float rounding)
  for gates from `freeze`; an all-zero [H] vector is treated like the scalar 0 that `freeze`
  writes for it (the gated model would still add the output projection's bias).

  Args:
    bert_config: the model's BertConfig.
    params: a BertModel params tree (keys "embeddings", "layer_0", ...); boxed or plain.
      For a task model use `extract_task`.
    frozen_gates: a Frozen, or a per-layer tuple/list (or {"layer_i": gate} dict) of None
      (untouched), a {0, 1} scalar, or a {0, 1} [H_i] vector.

  Returns:
    (new_bert_config, new_params); the input tree is not modified.
  """
  gates = frozen_gates.gates if isinstance(frozen_gates, learn.Frozen) else frozen_gates
  num_layers = bert_config.num_hidden_layers
  if isinstance(gates, Mapping):
    extra = sorted(set(gates) - {f"layer_{i}" for i in range(num_layers)})
    if extra:
      raise ValueError(f"Gates name layers {extra} that a {num_layers}-layer model does not "
                       "have; they were made for a model of another depth.")
    gates = [gates.get(f"layer_{i}") for i in range(num_layers)]
  if not isinstance(gates, (tuple, list)) or len(gates) != num_layers:
    got = len(gates) if isinstance(gates, (tuple, list)) else type(gates).__name__
    raise ValueError(f"Gates for {got} layers cannot be applied to a model with "
                     f"{num_layers} layers; pass one gate (or None) per layer.")
  present = sorted(int(k[6:]) for k in params if str(k).startswith("layer_"))
  if present != list(range(num_layers)):
    raise ValueError(f"params have layers {present} but bert_config has {num_layers}; "
                     "pass the BertModel params (for a task model use extract_task).")
  new_params = dict(params)
  heads = [bert_config.layer_heads(i) for i in range(num_layers)]
  for i, gate in enumerate(gates):
    if gate is None:
      continue
    g = _gate_values(gate, f"layer {i}")
    if heads[i] == 0:
      if g.any():
        raise ValueError(f"Layer {i} has no attention sublayer; its gate must be 0 or None.")
      continue
    if g.ndim == 1 and g.shape != (heads[i],):
      raise ValueError(f"Layer {i} has {heads[i]} heads but its gate has shape {g.shape}.")
    if g.ndim > 1:
      raise ValueError(f"Layer {i}: gate must be a scalar or [H]; got shape {g.shape}.")
    if g.all():
      continue
    layer = dict(new_params[f"layer_{i}"])
    if not g.any():
      del layer["attention"]
      if not bert_config.pruned_keep_layernorm:
        del layer["attention_LayerNorm"]
      heads[i] = 0
    else:
      idx = np.nonzero(g)[0]
      attn = {name: dict(sub) for name, sub in layer["attention"].items()}
      for (name, leaf), axis in _HEAD_AXIS.items():
        attn[name][leaf] = _take_heads(attn[name][leaf], idx, axis)
      layer["attention"] = attn
      heads[i] = int(idx.size)
    new_params[f"layer_{i}"] = layer
  new_config = dataclasses.replace(bert_config, heads_per_layer=tuple(heads))
  return new_config, new_params


def extract_task(bert_config: Any, task_params: Mapping[str, Any], frozen_gates: Any
                 ) -> tuple[Any, dict[str, Any]]:
  """`extract` for a task model's params: rewrites the "bert" subtree, keeps the head.

  Returns:
    (new_bert_config, new_task_params).
  """
  if "bert" not in task_params:
    raise ValueError(f"Task params have no 'bert' subtree (keys {sorted(task_params)}); "
                     "for BertModel params call extract.")
  new_config, bert = extract(bert_config, task_params["bert"], frozen_gates)
  return new_config, {**task_params, "bert": bert}

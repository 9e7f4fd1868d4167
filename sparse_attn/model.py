"""BERT in Flax linen with explicit attention-mask pytrees, and its task heads.

Semantics follow BERT / Hugging Face `BertModel` exactly: learned absolute positions,
token-type embeddings, post-LayerNorm, erf GELU, the pooler (tanh dense on [CLS]).

Masks are inputs, never built here: `masks` is a mask pytree (`masks.tree` states the
contract; docs/architecture.md draws where it comes from). Padding (`attention_mask`) is
combined inside.

Attention-layer pruning is structural: `BertConfig.heads_per_layer[i] == 0` builds layer i
without an attention sublayer (no parameters, no work). `gates` (optional, per layer: a
scalar or [H] array) scale the attention sublayer or its heads for learned pruning.

Shape legend: B batch, L sequence length, D hidden size, H heads, K head dim (D = H*K),
F intermediate (FFN) size, V vocabulary, C classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_attn.attention import seam as attention_lib
from sparse_attn.masks import tree

Array = jax.Array

# Logical axis names of parameters and activations; sharding.py maps them to mesh axes.
EMBED, VOCAB, HEADS, KV, MLP, CLASSES = "embed", "vocab", "heads", "kv", "mlp", "classes"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (the fields of a Hugging Face config.json)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  # Heads kept per layer (None = all); 0 removes that layer's attention sublayer.
  heads_per_layer: tuple[int, ...] | None = None
  # What a layer without attention computes before its FFN: False = identity (x),
  # True = the sublayer's LayerNorm of x (LN(x + 0)).
  pruned_keep_layernorm: bool = False
  # 'auto': block-sparse mask objects run on the executor prepared for them, arrays on
  # the dense reference (cuDNN for unmasked half precision on GPU); or one executor
  # ('dense', 'blocksparse', 'splash', 'cudnn'). See sparse_attn.attention.
  attention_backend: str = "auto"
  # Activation / matmul dtype; bfloat16 is mixed precision: parameters stay param_dtype,
  # LayerNorm statistics, attention softmax statistics, the MLM logits and the losses
  # float32 (docs/results.md, "bf16 mixed precision").
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}.")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of "
                       f"{sorted(_ACTIVATIONS)}.")
    if self.heads_per_layer is not None:
      hpl = tuple(int(h) for h in self.heads_per_layer)
      if len(hpl) != self.num_hidden_layers or not all(
          0 <= h <= self.num_attention_heads for h in hpl):
        raise ValueError(
            f"heads_per_layer {hpl} must have {self.num_hidden_layers} entries, each in "
            f"[0, {self.num_attention_heads}] (0 removes the attention sublayer).")
      object.__setattr__(self, "heads_per_layer", hpl)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def layer_heads(self, i: int) -> int:
    """Number of attention heads of layer i (0 = no attention sublayer)."""
    if self.heads_per_layer is None:
      return self.num_attention_heads
    return self.heads_per_layer[i]


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def _init(config: BertConfig, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(
      nn.initializers.normal(stddev=config.initializer_range), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (EMBED,)),
      bias_init=_zeros((EMBED,)), name=name)


def _dense(config: BertConfig, features, axes: tuple[str | None, ...], name: str,
           in_axis=-1, out_names=None):
  out_names = out_names or axes[-1:]
  return nn.DenseGeneral(
      features, axis=in_axis, dtype=config.dtype, param_dtype=config.param_dtype,
      kernel_init=_init(config, axes), bias_init=_zeros(out_names), name=name)


# The mask-pytree contract lives in `masks.tree`; these two names stay for callers of the model.
normalize_masks = tree.normalize


def mask_density(mask: Any, valid_BxL: Array) -> Array:
  """Mean kept fraction of valid (non-padding) query-key pairs; 1.0 for `None`.

  Args:
    mask: a mask leaf broadcastable to [B, H, Q, K] (bool or float), a block-sparse mask
      object (it knows its own density), or None.
    valid_BxL: [B, L] bool, True for real tokens.

  Returns:
    A scalar float32: `masks.tree.density` over valid pairs, averaged over the batch.
  """
  if mask is None:
    return jnp.ones((), jnp.float32)
  if hasattr(mask, "density"):
    return mask.density(valid_BxL)
  return jnp.mean(tree.density(jnp.asarray(mask), valid_BxL))


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids_BxL, deterministic: bool):
    c = self.config

    def embed(num, name):
      return nn.Embed(num, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                      embedding_init=_init(c, (VOCAB if name == "word_embeddings" else None,
                                               EMBED)), name=name)

    word = embed(c.vocab_size, "word_embeddings")
    x_BxLxD = word(input_ids_BxL)
    length = input_ids_BxL.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f"Sequence length {length} exceeds max_position_embeddings "
                       f"{c.max_position_embeddings}.")
    x_BxLxD = x_BxLxD + embed(c.max_position_embeddings, "position_embeddings")(
        jnp.arange(length)[None, :])
    x_BxLxD = x_BxLxD + embed(c.type_vocab_size, "token_type_embeddings")(
        token_type_ids_BxL)
    x_BxLxD = _layer_norm(c, "LayerNorm")(x_BxLxD)
    return nn.Dropout(c.hidden_dropout_prob)(x_BxLxD, deterministic=deterministic), word


class SelfAttention(nn.Module):
  """Multi-head self-attention with an explicit mask; output projection included."""
  config: BertConfig
  num_heads: int

  @nn.compact
  def __call__(self, x_BxLxD, mask, key_valid_BxL, gate, deterministic: bool):
    c = self.config
    h, k = self.num_heads, c.head_dim
    qkv = [_dense(c, (h, k), (EMBED, HEADS, KV), n, out_names=(HEADS, KV))(x_BxLxD)
           for n in ("query", "key", "value")]
    dropout_rng = None
    if not deterministic and c.attention_probs_dropout_prob > 0:
      dropout_rng = self.make_rng("dropout")
    ctx_BxLxHxK = attention_lib.dot_product_attention(
        *qkv, mask=mask, key_valid=key_valid_BxL, dropout_rng=dropout_rng,
        dropout_rate=c.attention_probs_dropout_prob, deterministic=deterministic,
        broadcast_dropout=False, dtype=c.dtype, backend=c.attention_backend)
    if gate is not None and jnp.ndim(gate) >= 1:  # Per-head gate: [H] or [B, H].
      g = jnp.asarray(gate, ctx_BxLxHxK.dtype)
      ctx_BxLxHxK = ctx_BxLxHxK * (g[:, None, :, None] if g.ndim == 2 else g[:, None])
    return _dense(c, c.hidden_size, (HEADS, KV, EMBED), "output", in_axis=(-2, -1))(
        ctx_BxLxHxK)


class Layer(nn.Module):
  """One post-LN transformer layer; `num_heads == 0` means no attention sublayer."""
  config: BertConfig
  num_heads: int

  @nn.compact
  def __call__(self, x_BxLxD, mask, key_valid_BxL, gate, deterministic: bool):
    c = self.config
    drop = lambda y: nn.Dropout(c.hidden_dropout_prob)(y, deterministic=deterministic)
    if self.num_heads > 0:
      a_BxLxD = SelfAttention(c, self.num_heads, name="attention")(
          x_BxLxD, mask, key_valid_BxL, gate, deterministic)
      a_BxLxD = drop(a_BxLxD)
      ln = _layer_norm(c, "attention_LayerNorm")
      if gate is not None and jnp.ndim(gate) == 0:  # Whole-sublayer gate g in [0, 1].
        g = jnp.asarray(gate, x_BxLxD.dtype)
        if c.pruned_keep_layernorm:  # g = 0 gives LN(x).
          x_BxLxD = ln(x_BxLxD + g * a_BxLxD)
        else:                        # g = 0 gives x.
          x_BxLxD = g * ln(x_BxLxD + a_BxLxD) + (1 - g) * x_BxLxD
      else:
        x_BxLxD = ln(x_BxLxD + a_BxLxD)
    elif c.pruned_keep_layernorm:
      x_BxLxD = _layer_norm(c, "attention_LayerNorm")(x_BxLxD)
    y_BxLxF = _ACTIVATIONS[c.hidden_act](
        _dense(c, c.intermediate_size, (EMBED, MLP), "intermediate")(x_BxLxD))
    y_BxLxD = drop(_dense(c, c.hidden_size, (MLP, EMBED), "output")(y_BxLxF))
    return _layer_norm(c, "output_LayerNorm")(x_BxLxD + y_BxLxD)


class BertModel(nn.Module):
  """The BERT encoder: embeddings, layers, pooler.

  Call: `(hidden_BxLxD, aux) = BertModel(cfg).apply({"params": p}, input_ids, ...)`, where
  aux = {"pooled": [B, D] pooler output (if `add_pooler`), "density": [num_layers]
  element density of each layer's structural mask over valid pairs (1.0 = dense; 0.0 for
  a layer without attention), "hidden_states": tuple of [B, L, D] (if requested)}.
  """
  config: BertConfig
  add_pooler: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               masks: Any = None, gates: Any = None, deterministic: bool = True,
               output_hidden_states: bool = False):
    """Runs the encoder.

    Args:
      input_ids: [B, L] int token ids.
      attention_mask: [B, L] padding mask, 1/True for real tokens (None = no padding).
      token_type_ids: [B, L] segment ids (None = zeros).
      masks: the structural mask pytree (see the module docstring).
      gates: None, or per layer (tuple/list/dict like `masks`) None, a scalar gate, or an
        [H] / [B, H] per-head gate in [0, 1].
      deterministic: disables dropout (evaluation).
      output_hidden_states: also return every layer's output in aux.

    Returns:
      (hidden_BxLxD, aux) as described in the class docstring.
    """
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L]; got shape {input_ids.shape}.")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    valid_BxL = attention_mask.astype(jnp.bool_)
    n = c.num_hidden_layers
    mask_list = normalize_masks(masks, n)
    gate_list = normalize_masks(gates, n)
    x_BxLxD, _ = Embeddings(c, name="embeddings")(input_ids, token_type_ids,
                                                  deterministic)
    hidden, density = [x_BxLxD], []
    for i in range(n):
      heads = c.layer_heads(i)
      if heads == 0 and mask_list[i] is not None:
        raise ValueError(f"Layer {i} has no attention sublayer but was given a mask.")
      x_BxLxD = Layer(c, heads, name=f"layer_{i}")(
          x_BxLxD, mask_list[i], valid_BxL, gate_list[i], deterministic)
      hidden.append(x_BxLxD)
      density.append(mask_density(mask_list[i], valid_BxL) if heads else
                     jnp.zeros((), jnp.float32))
    aux = {"density": jnp.stack(density)}
    if output_hidden_states:
      aux["hidden_states"] = tuple(hidden)
    if self.add_pooler:
      pooled = _dense(c, c.hidden_size, (EMBED, None), "pooler")(x_BxLxD[:, 0])
      aux["pooled"] = jnp.tanh(pooled)
    return x_BxLxD, aux


class BertForSequenceClassification(nn.Module):
  """Pooler -> dropout -> linear; single sentences or pairs (via token_type_ids).

  Returns (logits_BxC, aux); with num_labels == 1 the logit is a regression output.
  """
  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, masks=None,
               gates=None, deterministic: bool = True):
    _, aux = BertModel(self.config, name="bert")(
        input_ids, attention_mask, token_type_ids, masks=masks, gates=gates,
        deterministic=deterministic)
    x_BxD = nn.Dropout(self.config.hidden_dropout_prob)(aux["pooled"],
                                                        deterministic=deterministic)
    return _dense(self.config, self.num_labels, (EMBED, CLASSES), "classifier")(x_BxD), aux


class BertForTokenClassification(nn.Module):
  """Dropout -> linear on every token. Returns (logits_BxLxC, aux)."""
  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, masks=None,
               gates=None, deterministic: bool = True):
    x_BxLxD, aux = BertModel(self.config, add_pooler=False, name="bert")(
        input_ids, attention_mask, token_type_ids, masks=masks, gates=gates,
        deterministic=deterministic)
    x_BxLxD = nn.Dropout(self.config.hidden_dropout_prob)(x_BxLxD,
                                                          deterministic=deterministic)
    return _dense(self.config, self.num_labels, (EMBED, CLASSES), "classifier")(
        x_BxLxD), aux


class BertForMaskedLM(nn.Module):
  """MLM head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings.

  `positions` [B, P] int (the batch's `mlm_positions`) scores only those positions, so the
  vocabulary projection costs P rather than L rows. Returns (logits [B, L|P, V] float32,
  aux).
  """
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, masks=None,
               gates=None, deterministic: bool = True, positions=None):
    c = self.config
    bert = BertModel(c, add_pooler=False, name="bert")
    x_BxLxD, aux = bert(input_ids, attention_mask, token_type_ids, masks=masks,
                        gates=gates, deterministic=deterministic)
    if positions is not None:
      x_BxLxD = jnp.take_along_axis(x_BxLxD, positions[..., None].astype(jnp.int32), axis=1)
    x_BxLxD = _ACTIVATIONS[c.hidden_act](
        _dense(c, c.hidden_size, (EMBED, None), "transform")(x_BxLxD))
    x_BxLxD = _layer_norm(c, "transform_LayerNorm")(x_BxLxD)
    table_VxD = bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    table_VxD = nn.meta.unbox(table_VxD)
    bias_V = self.param("decoder_bias", _zeros((VOCAB,)), (c.vocab_size,), c.param_dtype)
    # The vocabulary logits are accumulated and returned in float32 whatever c.dtype:
    # the loss's log-softmax over V classes is where half precision would cost accuracy.
    logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, table_VxD.astype(c.dtype),
                              preferred_element_type=jnp.float32)
    return logits_BxLxV + bias_V.astype(jnp.float32), aux


def head_view(batch) -> tuple[dict, dict]:
  """(extra head arguments, the batch as the head's outputs see it).

  A masked-LM batch with `mlm_positions` [B, P]: the head scores those P positions, and
  labels / label_mask become [B, P] (the labels there; `mlm_position_mask`). Any other
  batch: ({}, batch).
  """
  if "mlm_positions" not in batch:
    return {}, batch
  pos_BxP = batch["mlm_positions"]
  view = dict(batch, labels=jnp.take_along_axis(batch["labels"], pos_BxP, axis=1),
              label_mask=batch["mlm_position_mask"])
  return {"positions": pos_BxP}, view


HEADS_BY_TASK = {
    "classification": BertForSequenceClassification,
    "regression": BertForSequenceClassification,
    "token_classification": BertForTokenClassification,
    "mlm": BertForMaskedLM,
}

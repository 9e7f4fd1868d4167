"""A run's model, and a finished run loaded back: model, structure, params, frozen structure.

`build_model` turns a config into (BertConfig, task module, initial weights), following
`init_from`: "" (random), "minilm" (the pretrained MiniLM), a Hugging Face BERT directory,
"run:<dir>" (another run's weights, placed later by the trainer) or "pruned:<dir>" (the
physically smaller model extracted from a self-pruning run's hard gates).

`load_run(workdir)` loads a finished run as evaluation, distillation, pruned-model
extraction and prediction need it: its saved config, model, run structure, parameters and
frozen structure. It tokenises no dataset and builds no optimizer, and it is read-only
towards the run: nothing there is created, renamed or written, and no process-wide setting
of this process changes. The frozen structure is the one the run saved with that step (its
checkpoint's masks item), so it needs nothing the run computed from its training data.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from sparse_attn import checkpoint as ckpt_lib
from sparse_attn import config as config_lib
from sparse_attn import data as data_lib
from sparse_attn import learn
from sparse_attn import model as model_lib
from sparse_attn import predict as predict_lib
from sparse_attn import pretrained
from sparse_attn import structure as structure_lib


def parse_init_from(init_from: str) -> tuple[str, str]:
  """`config.init_from` as (kind, argument).

  Returns:
    ("scratch", ""), ("minilm", ""), ("run", dir), ("pruned", dir) or ("hf", path).
  """
  if not init_from:
    return "scratch", ""
  if init_from == "minilm":
    return "minilm", ""
  for kind in ("run", "pruned"):
    if init_from.startswith(kind + ":"):
      return kind, init_from[len(kind) + 1:]
  return "hf", init_from


def build_model(config: ml_collections.ConfigDict, task: Any, *, weights: bool = True
                ) -> tuple[model_lib.BertConfig, nn.Module, Any]:
  """Returns (BertConfig, task module, initial params or None).

  Args:
    config: the experiment config (`model`, `init_from`).
    task: the data Task (its `kind` and `num_labels` choose the head).
    weights: read the initial weights. Without them only the architecture is built (a
      restored run's weights come from its checkpoint).

  The initial params are a BertModel tree (pretrained encoder; the head stays random) or,
  for `init_from="pruned:<run>"`, a whole task-model tree: the smaller model extracted from
  that run's hard gates (its architecture fixes heads_per_layer).
  """
  overrides = config_lib.bert_overrides(config.model)
  kind, arg = parse_init_from(config.init_from)
  init_params = None
  if kind == "minilm":
    bert_config, init_params = (pretrained.load_minilm(**overrides) if weights
                                else (pretrained.minilm_config(**overrides), None))
  elif kind == "pruned":
    bert_config, init_params = extract_pruned(arg, overrides)
  elif kind == "hf":
    bert_config, init_params = (pretrained.load_hf_bert(arg, **overrides) if weights
                                else (pretrained.load_hf_config(arg, **overrides), None))
  elif kind == "run":   # That run's architecture; its weights are placed by the trainer.
    bert_config = dataclasses.replace(run_bert_config(arg), **overrides)
  else:
    bert_config = model_lib.BertConfig(**overrides)
  if init_params is not None and "bert" not in init_params:
    init_params.pop("mlm_head", None)
    init_params = _apply_heads_per_layer(init_params, bert_config)
  if kind in ("minilm", "hf"):   # Pretrained positions; runs keep their own.
    bert_config, init_params = pretrained.extend_positions(
        bert_config, init_params, int(config.data.max_len), config.extend_positions)
  head = model_lib.HEADS_BY_TASK[task.kind]
  module = head(bert_config) if task.kind == "mlm" else head(bert_config, task.num_labels)
  return bert_config, module, init_params if weights else None


def run_bert_config(workdir: str) -> model_lib.BertConfig:
  """The BertConfig of the run in `workdir`, from the config saved with its checkpoint."""
  ckpt = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False,
                               read_only=True)
  try:
    saved = ckpt.restore_config(None)
  finally:
    ckpt.close()
  if saved is None:
    raise ckpt_lib.CheckpointError(f"init_from='run:{workdir}': no checkpoint with a config "
                                   "there; train that run first (or fix the path).")
  config = config_lib.validate(ml_collections.ConfigDict(saved))
  bert_config, _, _ = build_model(config, data_lib.get_task(config.data), weights=False)
  return bert_config


def extract_pruned(source: str, overrides: dict) -> tuple[model_lib.BertConfig, dict]:
  """The smaller model of a structure-pruning run: (BertConfig, task params with "bert").

  The run's method must offer an `extract` hook (`learn.Method`); its frozen gates say
  which attention sublayers (or heads) are removed.
  """
  src = load_run(source, role="init_from='pruned:{}'")
  method_name = src.config.structure.method
  method = None if method_name in (None, "none") else learn.get(method_name)
  if method is None or method.extract is None or src.frozen.gates is None:
    raise ValueError(f"The run in {source} learned no gates (structure.method is "
                     f"{method_name!r}, not 'prune').")
  new_config, new_params = method.extract(src.bert_config, src.params["model"],
                                          src.frozen.gates)
  keep = {k: v for k, v in overrides.items() if k != "heads_per_layer"}
  return dataclasses.replace(new_config, **keep), new_params


def _apply_heads_per_layer(params, bert_config):
  """Drops pretrained attention params of layers configured without attention."""
  if params is None or bert_config.heads_per_layer is None:
    return params
  for i, h in enumerate(bert_config.heads_per_layer):
    if h == 0:
      params[f"layer_{i}"].pop("attention", None)
      if not bert_config.pruned_keep_layernorm:
        params[f"layer_{i}"].pop("attention_LayerNorm", None)
    elif h != bert_config.num_attention_heads:
      raise ValueError(f"init_from weights have {bert_config.num_attention_heads} heads in "
                       f"layer {i} but heads_per_layer asks for {h}; extract a pruned "
                       "model with sparse_attn.learn.prune.extract instead.")
  return params


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A finished run as `load_run` returns it.

  Attributes:
    config: the run's saved, validated config (or the one passed to `load_run`).
    workdir: its absolute directory.
    step: the checkpoint step loaded.
    task: its data Task.
    bert_config, module: its model.
    tokenizer: its tokenizer.
    structure: its run structure, without a learned sampler (what it learned is `frozen`).
    params: {"model": ..., "structure": ...} host arrays.
    frozen: its frozen structure at `step` (`learn.Frozen`).
    ckpt: the read-only checkpointer it was loaded through (closed).
  """
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  step: int
  task: Any
  bert_config: model_lib.BertConfig
  module: nn.Module
  tokenizer: Any
  structure: structure_lib.RunStructure
  params: Any
  frozen: learn.Frozen
  ckpt: ckpt_lib.Checkpointer

  def predict(self, texts, **kwargs) -> list[dict]:
    """Predictions on new texts, in input order (`sparse_attn.predict.predict`)."""
    return predict_lib.predict(self, texts, **kwargs)


def load_run(workdir: str | pathlib.Path, step: int | None = None, *,
             config: ml_collections.ConfigDict | None = None, role: str = "{}"
             ) -> LoadedRun:
  """Loads a finished run (its newest readable checkpoint, or `step`); see the module doc.

  Args:
    workdir: the run's directory.
    step: a checkpoint step, or None for the newest one that restores cleanly.
    config: use this config instead of the saved one (e.g. other eval splits, or the
      same run on another mesh); the model must be the saved run's.
    role: names the option that asked for the run in error messages ("{}" = workdir),
      e.g. "distill.teacher={!r}".

  Raises:
    CheckpointError: no run there, no checkpoint (of `step`), or none readable.
  """
  workdir = pathlib.Path(workdir).absolute()
  ckpt_dir = workdir / "checkpoints"
  where = role.format(str(workdir)) if role != "{}" else str(workdir)
  if not ckpt_dir.is_dir():
    raise ckpt_lib.CheckpointError(
        f"{where}: no checkpoint in {workdir} (no checkpoints/ directory): check the path, "
        "or train that run first.")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False, read_only=True)
  try:
    if config is None:
      saved = ckpt.restore_config(step)
      if saved is None:
        raise ckpt_lib.CheckpointError(
            f"{where}: no checkpoint with a config in {ckpt_dir}; train that run first (or "
            "fix the path).")
      config = ml_collections.ConfigDict(saved)
      # How the training job was launched (coordinator, process ids), not this process.
      config.distributed = config_lib.base_config().distributed
    config = config_lib.validate(config)
    restored = ckpt.restore_params(step)
    if restored is None:
      raise ckpt_lib.CheckpointError(f"{where}: no readable checkpoint in {ckpt_dir}.")
    params, step = restored
    saved_structure = ckpt.restore_masks(step)
  finally:
    ckpt.close()
  task = data_lib.get_task(config.data)
  bert_config, module, _ = build_model(config, task, weights=False)
  config_lib.check_max_len(config.data.max_len, bert_config.max_position_embeddings)
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  if saved_structure is not None:
    structure = structure_lib.build(config, bert_config, tokenizer, learned=False)
    frozen = frozen_from_checkpoint(*saved_structure)
  else:  # A dense or fixed-mask run (nothing learned), or a checkpoint without masks item.
    structure = structure_lib.build(config, bert_config, tokenizer)
    frozen = structure.freeze(params.get("structure", {}), step=step, workdir=str(workdir))
  return LoadedRun(config=config, workdir=workdir, step=int(step), task=task,
                   bert_config=bert_config, module=module, tokenizer=tokenizer,
                   structure=structure, params=params, frozen=frozen, ckpt=ckpt)


def frozen_from_checkpoint(arrays: dict[str, np.ndarray], meta: dict[str, Any]
                           ) -> learn.Frozen:
  """A checkpoint's masks item as the frozen structure (masks per layer, gates, metadata).

  Args:
    arrays: {"layer_i": bool [H|1, n, n]} (absent layers are dense).
    meta: its metadata (num_layers; "gates": per layer a list / number or None).
  """
  n_layers = int(meta["num_layers"])
  masks = (tuple(arrays.get(f"layer_{i}") for i in range(n_layers)) if arrays else None)
  gates = meta.get("gates")
  if gates is not None:
    gates = tuple(None if g is None else np.asarray(g, np.float32) for g in gates)
  return learn.Frozen(masks=masks, gates=gates, metadata=meta)


def place_params(module: nn.Module, params: Any, example: dict[str, Any], mesh: Any,
                 rules: Any) -> Any:
  """Host model params laid out on `mesh` per the model's logical axis names.

  Args:
    module: the task module the params belong to.
    params: its parameter tree (host arrays).
    example: a batch dict with input_ids / attention_mask / token_type_ids [B, L].
    mesh, rules: the device mesh and logical-axis rules (`sharding`).
  """
  from sparse_attn import sharding
  abstract = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), example["input_ids"], example["attention_mask"],
      example["token_type_ids"])["params"])
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  return jax.device_put(params, shardings)

"""The experiment config schema: every section, its defaults, and key validation.

Experiment files in `configs/` start from `base_config()` and override what they need; the
sections owned by other modules take their defaults from there (`data.default_config()`,
the structure method's `default_config()`), so each default lives in one place.

Sections:
  init_from     "" (random init) | "minilm" (the bundled pretrained MiniLM) | a Hugging Face
                BERT directory | "run:<workdir>" (the latest checkpoint of another run).
  extend_positions  "auto" | "copy" | "off": data.max_len past the checkpoint's position
                embeddings (copy the learned ones repeatedly, Longformer's recipe).
  model         BertConfig field overrides (dropout, attention_backend, dtype, and for
                random init the sizes); unknown fields are an error.
  data          see sparse_attn/data/config.py.
  masks         fixed structural masks: source "none" | "pattern" | <exported masks dir>;
                pattern name and kwargs (sparse_attn.masks.patterns.build), layers (None =
                all, or a list of layer indices; `start_layer` = Breaking BERT's "later
                layers only"), remove_diagonal; combine "and" | "or": how fixed masks
                meet learned ones (within them, or always kept in addition).
  structure     learned structure: method "none" | "dam_u" | "dam_s" | "learned_window" |
                "prune" and that method's fields.
  optimizer     AdamW with warm-up + linear decay; parameter groups by regex (first match
                wins) with their own learning rate / weight decay.
  train         batch size, steps or epochs, logging and evaluation cadence, seed.
  checkpoint    save cadence, how many to keep (latest and best by the dev metric).
  distill       knowledge distillation: teacher = "" (off) or a finished run's workdir
                (its latest checkpoint and frozen structure), alpha = weight of the
                distillation loss, temperature (sparse_attn/distill.py).
  export        at the end of training, export the learned/fixed masks (and gates) to
                <workdir>/masks (sparse_attn/export.py), FlexAttention tiles of block_size.
  mesh          (data, model) shape and logical-axis rules.
  distributed   multi-process JAX settings (jax.distributed.initialize).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import pathlib
from typing import Any

import ml_collections

from sparse_attn import attention
from sparse_attn import checkpoint as ckpt_lib
from sparse_attn import data as data_lib
from sparse_attn import hostmem
from sparse_attn import model as model_lib
from sparse_attn import sharding
from sparse_attn.errors import UserError


def base_config() -> ml_collections.ConfigDict:
  """Every top-level key with its default (fine-tune MiniLM on offline Rotten Tomatoes)."""
  c = ml_collections.ConfigDict()
  c.init_from = "minilm"
  # data.max_len beyond the checkpoint's position embeddings: "auto" extends them by
  # copying the learned ones (Longformer's recipe, with a warning), "copy" does so
  # silently, "off" makes it an error (pretrained.extend_positions).
  c.extend_positions = "auto"
  # Every BertConfig field, None = "from init_from's config.json, else the default", so
  # that any field can be set from the command line (--config.model.hidden_dropout_prob=0).
  c.model = ml_collections.ConfigDict(_model_placeholders())
  c.data = data_lib.default_config()

  c.masks = ml_collections.ConfigDict(dict(
      source="none", pattern="", kwargs={}, layers=None, start_layer=0,
      remove_diagonal=False, combine="and",
      # Tokens every query may attend to in masked layers, e.g. ("[SEP]",).
      sink_tokens=(),
      # Exported masks into a longer run (or past their learned extent): "none" (an
      # error) | "toeplitz" (masks of j - i, or of block offsets j // b - i // b:
      # learned offsets kept, longer ones dropped).
      extrapolate="none"))
  c.structure = ml_collections.ConfigDict(dict(method="none"))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-5, warmup_fraction=0.1, schedule="linear", weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-6, grad_clip_norm=1.0,
      # (regex over "model/..." or "structure/..." parameter paths, overrides).
      groups=[
          ("structure/.*", dict(learning_rate=0.05, weight_decay=0.0, schedule="constant")),
          ("model/.*(bias|LayerNorm|scale).*", dict(weight_decay=0.0)),
      ]))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, eval_batch_size=64, num_steps=0, num_epochs=1.0, seed=0,
      log_every=20, eval_every=0, eval_splits=["validation"], max_eval_batches=0,
      # JAX's persistent compilation cache: a directory, "auto" (xla/ in the asset cache)
      # or "" (off). Reruns and eval.py then skip compilation.
      compilation_cache="auto",
      # Host allocator (sparse_attn.hostmem): "reuse" keeps freed memory between steps
      # (XLA:CPU steps stop page-faulting their temporaries; more resident memory),
      # "default", or "auto" (reuse unless a TPU / GPU plugin is installed and
      # JAX_PLATFORMS does not start with cpu).
      host_memory="auto",
      # After training, time this many train steps of the run and of the same model dense
      # on one batch of the longest bucket (sparse_attn.speed); 0 = off.
      compare_dense_steps=0))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=200, keep=2, keep_best=1, async_save=True))
  c.distill = ml_collections.ConfigDict(dict(teacher="", alpha=0.5, temperature=2.0))
  c.export = ml_collections.ConfigDict(dict(masks=True, block_size=128))
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1), rules=[list(r) for r in sharding.DEFAULT_RULES]))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=-1, process_id=-1,
      cpu_collectives=""))
  return c


def parse_arg(arg: str | None) -> dict[str, str]:
  """Parses a config-file argument: 'runlocal,lam=1e-3' -> {'runlocal': '', 'lam': '1e-3'}."""
  out = {}
  for part in (arg or "").split(","):
    if part.strip():
      key, _, value = part.partition("=")
      out[key.strip()] = value.strip()
  return out


def number(text: str) -> int | float | str:
  """'3' -> 3, '1e-3' -> 0.001, anything else unchanged (config-argument values)."""
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def minilm_finetune(args: dict[str, str]) -> ml_collections.ConfigDict:
  """The shared setting of the fine-tuning experiments in configs/: MiniLM on offline
  Rotten Tomatoes, max length 64, batch 32, `steps=N` steps (default 150), lr 1e-4,
  length-grouped batches padded to buckets 16/32/48/64 (35 tokens on average, not 64).
  `teacher=DIR` distils from that finished run (e.g. the dense one), with `alpha=A`
  (default 0.5) and `kd_temp=T` (default 2)."""
  c = base_config()
  if ("alpha" in args or "kd_temp" in args) and "teacher" not in args:
    raise ValueError("alpha= and kd_temp= set distillation; add teacher=<finished run>.")
  if "teacher" in args:
    c.distill.teacher = args["teacher"]
    c.distill.alpha = float(args.get("alpha", c.distill.alpha))
    c.distill.temperature = float(args.get("kd_temp", c.distill.temperature))
  c.data.max_len = 64
  c.data.buckets = (16, 32, 48, 64)
  c.data.length_grouping = 50
  c.optimizer.learning_rate = 1e-4
  c.train.batch_size = 32
  c.train.num_steps = int(args.get("steps", 150))
  c.train.eval_batch_size = 128
  c.train.log_every = 10
  c.checkpoint.every_steps = 50
  return c


def structure_groups(structure_lr: float) -> list:
  """Optimizer groups: structure params at their own constant lr without weight decay;
  model biases and LayerNorm params without weight decay."""
  return [
      ("structure/.*", dict(learning_rate=structure_lr, weight_decay=0.0,
                            schedule="constant")),
      ("model/.*(bias|LayerNorm|scale).*", dict(weight_decay=0.0)),
  ]


def matched_bigbird_kwargs(c: ml_collections.ConfigDict, target: float, global_tokens: int,
                           window: int | None = None, random_keys: int | None = None) -> dict:
  """`masks.patterns.bigbird` arguments whose density over c's training data's valid pairs
  is closest to `target` (`learn.window_baseline.bigbird_matched`: the widest band that
  fits first, then random keys). `window=0, random_keys=None` gives a random mask (the
  diagonal plus r keys), `random_keys=0` a neighbour band. Reads and tokenises the
  training split with c's data settings."""
  from sparse_attn.learn import window_baseline  # Local import: learn imports model modules.
  from sparse_attn.masks import stats
  ds = data_lib.build_dataset(c.data, "train")
  pairs = stats.pair_weights(ds.lengths, c.data.max_len)
  m = window_baseline.bigbird_matched(c.data.max_len, target, global_tokens, seed=0,
                                      window=window, random_keys=random_keys,
                                      pairs_NxN=pairs)
  return {"window": m.window, "global_tokens": global_tokens, "random_keys": m.random_keys,
          "seed": 0}


def apply_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks data and steps so an experiment runs on a laptop CPU in seconds."""
  c.data.max_train_examples = 64
  c.data.max_eval_examples = 64
  c.train.batch_size = 8
  c.train.eval_batch_size = 32
  c.train.num_steps = 4
  c.train.log_every = 1
  c.checkpoint.every_steps = 2
  return c


def _model_placeholders() -> dict[str, Any]:
  """Typed None placeholders for every BertConfig field (dtypes are given as strings)."""
  from ml_collections.config_dict import placeholder
  out = {}
  for name, value in dataclasses.asdict(model_lib.BertConfig()).items():
    if isinstance(value, (bool, int, float, str)):
      kind = type(value)
    elif name == "heads_per_layer":
      kind = tuple
    else:
      kind = str  # dtype / param_dtype, e.g. "bfloat16".
    out[name] = placeholder(kind)
  return out


_FREE_FORM = {("masks", "kwargs")}  # Sections whose keys are not fixed.


def _check_keys(given: dict, schema: dict, prefix: str) -> None:
  for key, value in given.items():
    path = f"{prefix}{key}"
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=3, cutoff=0.5)
      hint = f" Did you mean {close}?" if close else ""
      raise UserError(f"Unknown config key '{path}'.{hint} Valid keys here: "
                      f"{sorted(schema)}.")
    if (tuple(path.split(".")) in _FREE_FORM or not isinstance(schema[key], dict)
        or not isinstance(value, dict)):
      continue
    _check_keys(value, schema[key], path + ".")


def _fill_defaults(given: dict, defaults: dict, prefix: str) -> None:
  """Adds the keys `given` lacks from `defaults`, recursively (not into free-form dicts)."""
  for key, default in defaults.items():
    path = f"{prefix}{key}"
    if key not in given:
      given[key] = default
    elif (isinstance(default, dict) and isinstance(given[key], dict)
          and tuple(path.split(".")) not in _FREE_FORM):
      _fill_defaults(given[key], default, path + ".")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every key against the schema; fills missing keys with their defaults.

  Args:
    config: an experiment config (from a `configs/*.py` file, after flag overrides), or
      the config saved with a run, possibly by an older version without some keys.

  Returns:
    The config with every section completed with its defaults (`structure` with its
    method's).

  Raises:
    UserError: an unknown key anywhere (the message lists the close valid ones), an
      unknown BertConfig field in `model`, a value of the wrong type, or a value out of
      its range (`check_values`).
  """
  from sparse_attn import learn  # Local import: learn imports model-level modules.
  given = config.to_dict()
  schema = base_config().to_dict()
  structure = given.get("structure", {})
  method_defaults = learn.default_config(structure.get("method", "none"))
  schema["structure"] = method_defaults.to_dict()
  schema["model"] = {f: None for f in model_lib.BertConfig.__dataclass_fields__}
  _check_keys(given, schema, "")
  _fill_defaults(given, {k: v for k, v in base_config().to_dict().items()
                         if k not in ("data", "structure")}, "")
  out = ml_collections.ConfigDict(given)
  out.data = data_lib.with_defaults(given.get("data", {}))
  _check_types(given, base_config().to_dict(), "", skip=("structure", "model"))
  _check_types(structure, method_defaults.to_dict(), "structure.")
  merged = method_defaults
  merged.update(structure)
  out.structure = merged
  hostmem.wanted(out.train.host_memory)  # Raises on an unknown value.
  check_values(out)
  return out


def _type_name(value: Any) -> str:
  return {bool: "a bool", int: "an int", float: "a number", str: "a string"}[type(value)]


def _check_types(given: dict, schema: dict, prefix: str, skip: tuple = ()) -> None:
  """Scalars must have their default's type (an int is accepted for a float)."""
  for key, value in given.items():
    path = f"{prefix}{key}"
    if key in skip or key not in schema or tuple(path.split(".")) in _FREE_FORM:
      continue
    default = schema[key]
    if isinstance(default, dict) and isinstance(value, dict):
      _check_types(value, default, path + ".")
      continue
    if default is None or value is None or type(default) not in (bool, int, float, str):
      continue
    ok = (isinstance(value, float | int) and not isinstance(value, bool)
          if type(default) is float else type(value) is type(default))
    if not ok:
      raise UserError(f"Config key '{path}' must be {_type_name(default)} (like its default "
                      f"{default!r}), got {value!r} ({type(value).__name__}).")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
  if not ok:
    raise UserError(f"Config key '{key}' = {value!r} is out of range: it must be {what}.")


def check_values(c: ml_collections.ConfigDict) -> None:
  """Range checks of a complete config, so that bad values fail before any JAX work.

  Raises:
    UserError: naming the key, its value and the allowed range.
  """
  t, ck, o = c.train, c.checkpoint, c.optimizer
  for key in ("batch_size", "eval_batch_size", "log_every"):
    _require(t[key] >= 1, f"train.{key}", t[key], ">= 1")
  for key, zero in (("num_steps", "train for num_epochs"), ("eval_every", "only at the end"),
                    ("max_eval_batches", "all")):
    _require(t[key] >= 0, f"train.{key}", t[key], f">= 0 (0 = {zero})")
  if t.num_steps == 0:
    _require(math.isfinite(t.num_epochs) and t.num_epochs > 0, "train.num_epochs",
             t.num_epochs, "> 0 when train.num_steps is 0")
  _require(len(t.eval_splits) >= 1, "train.eval_splits", list(t.eval_splits),
           "a non-empty list of split names")
  _require(ck.every_steps >= 0, "checkpoint.every_steps", ck.every_steps, ">= 0 (0 = off)")
  _require(ck.keep >= 1, "checkpoint.keep", ck.keep, ">= 1")
  _require(ck.keep_best >= 0, "checkpoint.keep_best", ck.keep_best, ">= 0")
  _require(math.isfinite(o.learning_rate) and o.learning_rate >= 0,
           "optimizer.learning_rate", o.learning_rate, "a finite number >= 0")
  _require(0 <= o.warmup_fraction < 1, "optimizer.warmup_fraction", o.warmup_fraction,
           "in [0, 1)")
  _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, ">= 0")
  _require((o.grad_clip_norm or 0) >= 0, "optimizer.grad_clip_norm", o.grad_clip_norm,
           ">= 0 (0 = off)")
  for key in ("b1", "b2"):
    _require(0 <= o[key] < 1, f"optimizer.{key}", o[key], "in [0, 1)")
  _require(o.eps > 0, "optimizer.eps", o.eps, "> 0")
  _require(c.data.max_len >= 2, "data.max_len", c.data.max_len,
           ">= 2 (room for [CLS] and [SEP])")
  positions = c.model.get("max_position_embeddings")
  if positions is not None:
    check_max_len(c.data.max_len, positions)
  backend = c.model.get("attention_backend")
  known = ("auto", *sorted(attention.BACKENDS))
  _require(backend is None or backend in known, "model.attention_backend", backend,
           f"one of {known}")
  _require(c.export.block_size >= 1, "export.block_size", c.export.block_size, ">= 1")


def check_max_len(max_len: int, positions: int) -> None:
  """data.max_len must fit the model's position embeddings."""
  if max_len > positions:
    raise UserError(
        f"data.max_len={max_len} is longer than the model's {positions} position "
        f"embeddings, so batches longer than {positions} tokens would fail mid-run. Lower "
        f"data.max_len to at most {positions}.")


# Keys a resumed run may change: how it is logged, evaluated, saved, placed and launched,
# and the knobs that recover from a divergence. Everything else must match the saved
# config, since the checkpoint's state and masks were built for it.
MAY_CHANGE_ON_RESUME = (
    "train.log_every", "train.eval_every", "train.eval_splits", "train.max_eval_batches",
    "train.eval_batch_size", "train.compilation_cache", "train.host_memory",
    "train.num_steps", "train.num_epochs", "train.compare_dense_steps",
    "data.max_eval_examples", "checkpoint.",
    "export.", "mesh.", "distributed.", "optimizer.learning_rate",
    "optimizer.grad_clip_norm", "optimizer.warmup_fraction")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out  # An empty dict adds no key: its keys show up when set.
  return {prefix[:-1]: tree}


def config_changes(saved: dict, current: ml_collections.ConfigDict
                   ) -> tuple[list[str], list[str]]:
  """Differences between a run's saved config and the config it is resumed with.

  Args:
    saved: the config JSON saved with the checkpoint (any library version).
    current: the validated config of this invocation.

  Returns:
    (changes that forbid resuming, changes allowed on resume), each "key: old -> new".
  """
  old = _flatten(json.loads(json.dumps(validate(ml_collections.ConfigDict(saved)).to_dict(),
                                       default=str)))
  new = _flatten(json.loads(json.dumps(current.to_dict(), default=str)))
  forbidden, allowed = [], []
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      line = f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
      free = any(key == k or (k.endswith(".") and key.startswith(k))
                 for k in MAY_CHANGE_ON_RESUME)
      (allowed if free else forbidden).append(line)
  return forbidden, allowed


def bert_overrides(model_section: Any) -> dict[str, Any]:
  """The `model` section as BertConfig keyword arguments (dtype names resolved)."""
  import jax.numpy as jnp
  out = {k: v for k, v in dict(model_section).items() if v is not None}
  for k in ("dtype", "param_dtype"):
    if isinstance(out.get(k), str):
      out[k] = jnp.dtype(out[k])
  if "heads_per_layer" in out and out["heads_per_layer"] is not None:
    out["heads_per_layer"] = tuple(out["heads_per_layer"])
  return out


def check_resume(ckpt_dir: pathlib.Path, config) -> None:
  """Refuses to resume a workdir whose checkpoints were written by another experiment."""
  if not ckpt_dir.is_dir():
    return
  ck = ckpt_lib.Checkpointer(ckpt_dir, async_save=False, read_only=True)
  try:
    step = ck.latest_step()
    saved = ck.restore_config() if step is not None else None
  except Exception as e:  # noqa: BLE001 - an unreadable step falls back at restore.
    logging.warning("Could not read the saved config of %s (%s); not compared.", ckpt_dir, e)
    saved = None
  finally:
    ck.close()
  if saved is None:
    return
  forbidden, allowed = config_changes(saved, config)
  if forbidden:
    raise UserError(
        f"The checkpoints in {ckpt_dir} (latest step {step}) were written with another "
        "config; resuming would mix two experiments. Changed:\n  " + "\n  ".join(forbidden)
        + f"\nUse a new --workdir (init_from='run:{ckpt_dir.parent}' starts from its "
        f"weights), or rerun with the saved values (in {ckpt_dir / str(step) / 'config'}).")
  if allowed:
    logging.warning("Resuming step %d with changed settings: %s", step, "; ".join(allowed))

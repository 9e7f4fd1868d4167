"""Training and evaluation: train state, sharded train/eval steps, `train_and_evaluate`.

One step, as ARCHITECTURE.md draws it: the structure params (learned masks / gates) become
a mask pytree through a pure function, combined with the run's fixed masks; the model
takes both through `apply`; the loss adds the structure penalty; one optax optimizer with
parameter groups by regex updates model weights and structure params together. The state
is created with `jax.eval_shape` -> logical shardings -> `jax.jit(init, out_shardings=...)`
and every step is jitted with in/out shardings over the config's device mesh.

Resume order (see checkpoint.py): the latest restorable checkpoint in the workdir, else
`config.init_from` (pretrained weights or another run), else random initialisation.

Guarantees of `train_and_evaluate`: the workdir is locked for the run (`lock.py`); the
config is checked (keys, types, ranges) before any JAX work and, on resume, against the
config saved with the checkpoint; a run resumed at or past its last step goes straight to
the final evaluation, results and export; an error escaping the loop first waits for the
pending checkpoint saves; a checkpoint is saved only with finite parameters, and after a
divergence the newest checkpoint whose forward pass is finite is kept (newer ones are set
aside as `<step>.nonfinite-<n>`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sparse_attn import assets
from sparse_attn import checkpoint as ckpt_lib
from sparse_attn import config as config_lib
from sparse_attn import data as data_lib
from sparse_attn import fixed_masks as fixed_lib
from sparse_attn import hostmem
from sparse_attn import learn
from sparse_attn import lock as lock_lib
from sparse_attn import model as model_lib
from sparse_attn import observe
from sparse_attn import pretrained
from sparse_attn import sharding
from sparse_attn.errors import UserError
from sparse_attn.train_steps import TrainState, make_eval_step, make_train_step


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss (or an evaluation of the model) became NaN or infinite."""


def check_finite_metrics(metrics: dict[str, dict[str, float]], where: str) -> None:
  """Raises NonFiniteLossError when an evaluation's loss or metric is NaN / infinite.

  (Correlations of constant predictions are reported as 0.0 by `data.metrics`, so any
  non-finite value here means NaN / infinite weights or inputs.)
  """
  for split, m in metrics.items():
    bad = sorted(k for k, v in m.items() if not math.isfinite(float(v)))
    if not bad:
      continue
    raise NonFiniteLossError(
        f"{where}: non-finite evaluation metrics on {split}: "
        + ", ".join(f"{k}={m[k]}" for k in bad) + ". The model's weights or its inputs hold "
        "NaN / infinite values; evaluate an earlier step (--step), or retrain with a lower "
        "optimizer.learning_rate or optimizer.grad_clip_norm set.")


# ---------------------------------------------------------------------------- building


def build_model(config, task) -> tuple[model_lib.BertConfig, nn.Module, Any]:
  """Returns (BertConfig, task module, initial params or None).

  The initial params are a BertModel tree (pretrained encoder; the head stays random) or,
  for `init_from="pruned:<run>"`, a whole task-model tree: the physically smaller model
  extracted from that self-pruning run's hard gates (its config fixes heads_per_layer).
  """
  overrides = config_lib.bert_overrides(config.model)
  init_from = config.init_from
  init_params = None
  if init_from == "minilm":
    bert_config, init_params = pretrained.load_minilm(**overrides)
  elif init_from.startswith("pruned:"):
    bert_config, init_params = _extract_pruned(init_from[len("pruned:"):], overrides)
  elif init_from and not init_from.startswith("run:"):
    bert_config, init_params = pretrained.load_hf_bert(init_from, **overrides)
  else:
    bert_config = model_lib.BertConfig(**overrides)
  if init_params is not None and "bert" not in init_params:
    init_params.pop("mlm_head", None)
    init_params = _apply_heads_per_layer(init_params, bert_config)
  head = model_lib.HEADS_BY_TASK[task.kind]
  module = head(bert_config) if task.kind == "mlm" else head(bert_config, task.num_labels)
  return bert_config, module, init_params


def _extract_pruned(source: str, overrides: dict) -> tuple[model_lib.BertConfig, dict]:
  """The smaller model of a self-pruning run: (BertConfig, task params with "bert")."""
  from sparse_attn.learn import prune
  src, state = _restore_run(source, "init_from='pruned:{}'")
  frozen = src.frozen(state)
  if frozen.gates is None:
    raise ValueError(f"The run in {source} learned no gates (structure.method is "
                     f"{src.config.structure.method!r}, not 'prune').")
  params = jax.device_get(state.params["model"])
  new_config, new_params = prune.extract_task(src.bert_config, params, frozen.gates)
  keep = {k: v for k, v in overrides.items() if k != "heads_per_layer"}
  return dataclasses.replace(new_config, **keep), new_params


def _restore_run(source: str, role: str) -> tuple["Run", TrainState]:
  """A finished run rebuilt from its saved config, and its latest readable state.

  Read-only towards `source`: nothing there is created, renamed or written, and this
  process's compilation-cache setting is kept. `role` names the option that asked for it
  in error messages ("{}" = the source).
  """
  src_dir = pathlib.Path(source).absolute()
  saved = None
  if (src_dir / "checkpoints").is_dir():
    ck = ckpt_lib.Checkpointer(src_dir / "checkpoints", async_save=False, read_only=True)
    saved = ck.restore_config()
    ck.close()
  if saved is None:
    raise ckpt_lib.CheckpointError(
        f"{role.format(source)}: no checkpoint with a config in {src_dir}/checkpoints; "
        "train that run first (or fix the path).")
  # The source's process-wide settings (allocator, compilation cache) are not applied.
  src = setup(ml_collections.ConfigDict(saved), src_dir, restore=False, read_only=True,
              process_settings=False)
  restored = src.ckpt.restore_state(src.state)  # Unreadable steps are skipped, not moved.
  src.ckpt.close()
  if restored is None:
    raise ckpt_lib.CheckpointError(f"{role.format(source)}: no readable checkpoint in "
                                   f"{src_dir}/checkpoints.")
  return src, restored[0]


def load_teacher(config: ml_collections.ConfigDict, task) -> tuple[Any, Any]:
  """The `distill.teacher` run as (distill.Teacher, its model params), or (None, None)."""
  from sparse_attn import distill as distill_lib
  d = config.distill
  if not d.teacher:
    return None, None
  distill_lib.check_settings(float(d.alpha), float(d.temperature))
  src, state = _restore_run(d.teacher, "distill.teacher={!r}")
  mine = (config.data.task, task.kind, task.num_labels, config.data.tokenizer)
  theirs = (src.config.data.task, src.task.kind, src.task.num_labels,
            src.config.data.tokenizer)
  if mine != theirs:
    raise ValueError(
        f"distill.teacher={d.teacher!r} was trained on (task, kind, labels, tokenizer) = "
        f"{theirs}; this run has {mine}. Use a teacher of the same task and tokenizer.")
  if src.config.data.max_len < config.data.max_len:
    raise ValueError(
        f"distill.teacher={d.teacher!r} was built for sequences up to "
        f"{src.config.data.max_len} tokens but this run uses data.max_len="
        f"{config.data.max_len}; lower data.max_len or train a teacher at that length.")
  frozen = src.frozen(state)
  teacher = distill_lib.Teacher(module=src.module, masks=frozen.masks, gates=frozen.gates,
                                sinks=src.sinks, alpha=float(d.alpha),
                                temperature=float(d.temperature))
  logging.info("Distilling from %s (its step %d, alpha %.2f, T %.1f).",
               pathlib.Path(d.teacher).absolute(), int(state.step), d.alpha, d.temperature)
  return teacher, state.params["model"]


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


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int):
  """AdamW with warm-up and decay; parameter groups by regex over "model/..." paths.

  Args:
    opt: the `config.optimizer` section.
    total_steps: number of training steps (for the schedule).

  Returns:
    (optax.GradientTransformation, labels_fn, {group: learning-rate schedule}).
  """
  import re
  groups = [(str(rx), dict(over)) for rx, over in opt.groups]
  base = {k: opt[k] for k in ("learning_rate", "weight_decay", "schedule")}

  def schedule(lr, kind):
    warm = int(opt.warmup_fraction * total_steps)
    if kind == "constant":
      return optax.constant_schedule(lr)
    if kind not in ("linear", "cosine"):
      raise ValueError(f"Unknown schedule {kind!r}; use linear, cosine or constant.")
    decay = (optax.linear_schedule(lr, 0.0, max(1, total_steps - warm)) if kind == "linear"
             else optax.cosine_decay_schedule(lr, max(1, total_steps - warm)))
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(1, warm)), decay],
                                [warm]) if warm > 0 else decay

  names = [f"group_{i}" for i in range(len(groups))] + ["default"]
  settings = [dict(base, **over) for _, over in groups] + [base]
  schedules = {n: schedule(s["learning_rate"], s["schedule"]) for n, s in zip(names, settings)}
  decays = {n: float(s["weight_decay"]) for n, s in zip(names, settings)}

  def labels(params):
    def label(path, _):
      p = _path_str(path)
      for i, (rx, _) in enumerate(groups):
        if re.fullmatch(rx, p):
          return f"group_{i}"
      return "default"
    return jax.tree_util.tree_map_with_path(label, params)

  # AdamW with per-group learning rate and decoupled weight decay. One Adam state covers
  # every parameter (optax.multi_transform's masked states do not round-trip through
  # orbax checkpoints); the groups differ only in the final scaling.
  chain = []
  if opt.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  chain.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
  chain.append(_scale_by_group(labels, schedules, decays))
  return optax.chain(*chain), labels, schedules


def _scale_by_group(labels_fn, schedules, decays) -> optax.GradientTransformation:
  """u -> -lr_g(t) * (u + wd_g * param), with g the parameter's group."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    labels = labels_fn(updates)
    lrs = {g: sched(state.count) for g, sched in schedules.items()}
    def scale(u, p, g):
      if decays[g]:
        u = u + decays[g] * p
      return -lrs[g] * u
    new = jax.tree.map(scale, updates, params, labels)
    return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------ state


def _init_fn(module, structure, tx, example, seed):
  def init(rng):
    r_model, r_struct, r_state = jax.random.split(rng, 3)
    variables = module.init(r_model, example["input_ids"], example["attention_mask"],
                            example["token_type_ids"])
    params = {"model": variables["params"],
              "structure": structure.init(r_struct) if structure else {}}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=r_state)
  return init


def create_state(module, structure, tx, example, mesh, rules, seed: int):
  """Initialises the train state directly in its sharded layout.

  Returns:
    (state, state_shardings): state arrays placed per the logical rules on `mesh`.
  """
  init = _init_fn(module, structure, tx, example, seed)
  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(init, rng)  # Boxed: leaves carry logical axis names.
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


# ------------------------------------------------------------------------- evaluation


def evaluate(eval_step, state, dataset, task, mesh, batch_size, frozen, max_batches=0):
  """Runs `eval_step` over a split; returns the task's official metrics (+ loss)."""
  preds, labels, weights, losses, density = [], [], [], [], []
  for i, batch in enumerate(dataset.batches(batch_size, shuffle=False, drop_remainder=False,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())):
    if max_batches and i >= max_batches:
      break
    out = eval_step(state.params, sharding.global_batch(batch, mesh), frozen.masks,
                    frozen.gates)
    out = jax.tree.map(_to_host, out)
    preds.append(out["predictions"])
    labels.append(out["labels"])
    weights.append(out["weights"])
    losses.append((out["loss_sum"], out["loss_count"]))
    density.append((out["density_sum"], out["examples"]))
  if not preds:
    raise ValueError("The evaluation split produced no batches.")
  metrics = data_lib.compute_metrics(task, preds, labels, weights)
  total, count = (sum(float(a) for a, _ in losses), sum(float(b) for _, b in losses))
  metrics["loss"] = total / max(count, 1.0)
  # Attention density over valid (non-padding) pairs, per layer and over all layers.
  per_layer = sum(d for d, _ in density) / max(sum(float(n) for _, n in density), 1.0)
  for i, d in enumerate(per_layer):
    metrics[f"density/layer_{i}"] = float(d)
  metrics["attention_density"] = float(np.mean(per_layer))
  metrics["attention_sparsity"] = 1.0 - metrics["attention_density"]
  return metrics


def _to_host(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ----------------------------------------------------------------------- the main loop


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can save before exiting."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler.
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: Any
  task: Any
  train_ds: Any
  eval_sets: dict
  bert_config: model_lib.BertConfig
  module: Any
  structure: Any
  fixed: Any
  total_steps: int
  tx: Any
  schedules: dict
  state: TrainState
  state_shardings: Any
  ckpt: ckpt_lib.Checkpointer
  sinks: tuple[int, ...] = ()  # Token ids of masks.sink_tokens.

  def frozen(self, state) -> fixed_lib.FrozenStructure:
    """The deterministic structure of `state` (masks for eval, checkpoints, export)."""
    frozen = fixed_lib.freeze(self.structure, self.fixed, state.params["structure"],
                              self.bert_config, self.config.data.max_len,
                              step=int(state.step), workdir=str(self.workdir),
                              mode=self.config.masks.combine)
    if self.sinks:  # Token-defined links are not in the position masks: record them.
      frozen.metadata["sink_tokens"] = list(self.config.masks.sink_tokens)
      frozen.metadata["sink_token_ids"] = list(self.sinks)
    return frozen

  def evaluate(self, state, eval_step=None) -> tuple[dict[str, dict], Any]:
    """Official metrics of every eval split, and the frozen structure used."""
    eval_step = eval_step or jax.jit(make_eval_step(self.module, self.task, self.sinks))
    frozen = self.frozen(state)
    out = {s: evaluate(eval_step, state, ds, self.task, self.mesh,
                       self.config.train.eval_batch_size, frozen,
                       self.config.train.max_eval_batches)
           for s, ds in self.eval_sets.items()}
    return out, frozen


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` ("" = leave JAX's setting,
  "auto" = `xla/` in the asset cache, ``$SPARSE_ATTN_CACHE`` or ~/.cache/sparse_attn).

  A rerun, a resumed run or `eval.py` then loads the compiled train / eval steps (one per
  length bucket) instead of compiling them again, which on CPU saves tens of seconds.
  """
  if path == "auto":
    path = str(assets.cache_dir() / "xla")
  if path:
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(path).expanduser()))


def prepare_process(config: ml_collections.ConfigDict) -> None:
  """This command's process-wide settings: host allocator, multi-process JAX, compilation
  cache. Taken from the current config only, never from a restored run's."""
  hostmem.reuse_freed_memory(config.train.host_memory)  # Before JAX's first computation.
  sharding.maybe_initialize_distributed(config)
  enable_compilation_cache(config.train.compilation_cache)


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          restore: bool = True, *, read_only: bool = False,
          process_settings: bool = True) -> Run:
  """Validates the config, builds data, model, structure, optimizer and the sharded state.

  Args:
    config: the experiment config.
    workdir: the run's directory.
    restore: the state is the latest restorable checkpoint in `workdir` (whose saved
      config must match, see `config.config_changes`), else `config.init_from`, else
      random (the resume order). Without it the state is freshly initialised.
    read_only: open the checkpoints read-only (evaluation, teachers): nothing in `workdir`
      is created or written.
    process_settings: apply `prepare_process(config)` first.
  """
  config = config_lib.validate(config)
  if process_settings:
    prepare_process(config)
  workdir = pathlib.Path(workdir).absolute()
  ckpt_dir = workdir / "checkpoints"
  if restore and not read_only:
    _check_resume_config(ckpt_dir, config)
  task = data_lib.get_task(config.data)
  bert_config, module, init_params = build_model(config, task)
  config_lib.check_max_len(config.data.max_len, bert_config.max_position_embeddings)
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = sharding.rules_from_config(config.mesh.rules)

  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  train_ds = data_lib.build_dataset(config.data, "train", tokenizer=tokenizer)
  eval_sets = {s: data_lib.build_dataset(config.data, s, tokenizer=tokenizer)
               for s in config.train.eval_splits}
  max_len = config.data.max_len
  structure = learn.build(config.structure, bert_config, max_len, lengths=train_ds.lengths)
  fixed = fixed_lib.build(config.masks, bert_config, max_len)

  batch_size = config.train.batch_size
  sharding.check_batch_divisible(batch_size, mesh)
  sharding.check_batch_divisible(config.train.eval_batch_size, mesh)
  total_steps = config.train.num_steps or max(1, math.ceil(
      config.train.num_epochs * len(train_ds) / batch_size))
  tx, _, schedules = make_optimizer(config.optimizer, total_steps)

  example = next(train_ds.batches(batch_size, seed=config.data.seed, start_step=0))
  state, state_shardings = create_state(module, structure, tx, example, mesh, rules,
                                        config.train.seed)
  ckpt = ckpt_lib.Checkpointer(
      ckpt_dir, keep=config.checkpoint.keep,
      keep_best=config.checkpoint.keep_best, best_metric=task.main_metric,
      async_save=config.checkpoint.async_save, read_only=read_only)
  restored = (ckpt.restore_state(state, set_aside_unreadable=not read_only) if restore
              else None)
  if restored is not None:
    state, step = restored
    logging.info("Resumed from %s at step %d.", ckpt.directory, step)
  else:
    state = _init_from(state, config, init_params, state_shardings)
  return Run(config, workdir, mesh, task, train_ds, eval_sets, bert_config, module,
             structure, fixed, total_steps, tx, schedules, state, state_shardings, ckpt,
             fixed_lib.resolve_sinks(config.masks.sink_tokens, tokenizer))


def _check_resume_config(ckpt_dir: pathlib.Path, config) -> None:
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
  forbidden, allowed = config_lib.config_changes(saved, config)
  if forbidden:
    raise UserError(
        f"The checkpoints in {ckpt_dir} (latest step {step}) were written with another "
        "config; resuming would mix two experiments. Changed:\n  " + "\n  ".join(forbidden)
        + f"\nUse a new --workdir (init_from='run:{ckpt_dir.parent}' starts from its "
        f"weights), or rerun with the saved values (in {ckpt_dir / str(step) / 'config'}).")
  if allowed:
    logging.warning("Resuming step %d with changed settings: %s", step, "; ".join(allowed))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates per `config`, checkpointing to and resuming from `workdir`.

  Args:
    config: an experiment config (see sparse_attn/config.py and configs/).
    workdir: directory for checkpoints, metrics.jsonl, TensorBoard events, results.json.

  Returns:
    The final evaluation metrics per split, plus "step", "wall_time_s" and, after a
    SIGTERM, "preempted": True.

  Raises:
    UserError: a bad config, data, asset or checkpoint, a workdir locked by another run,
      or a divergence (NonFiniteLossError, after keeping the newest finite checkpoint).
  """
  t_start = time.perf_counter()
  config = config_lib.validate(config)
  if config.distill.teacher:  # Saved with the run as an absolute path (resume elsewhere).
    config.distill.teacher = str(pathlib.Path(config.distill.teacher).absolute())
  prepare_process(config)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      stack.enter_context(lock_lib.WorkdirLock(workdir))
    run = setup(config, workdir, process_settings=False)
    try:
      results = _train(run, t_start)
    except BaseException:
      _close_quietly(run.ckpt)  # Pending async saves land before the error leaves.
      raise
  return results


def _close_quietly(ckpt) -> None:
  try:
    ckpt.close()
  except Exception as e:  # noqa: BLE001 - keep the original error.
    logging.error("Could not finish the pending checkpoint saves: %s", e)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _train(run: Run, t_start: float) -> dict[str, Any]:
  """The loop of `train_and_evaluate` on a built run."""
  config, ckpt, state = run.config, run.ckpt, run.state
  run.workdir.mkdir(parents=True, exist_ok=True)
  start, total_steps = int(state.step), run.total_steps
  if start >= total_steps:
    logging.warning("The checkpoint in %s is at step %d (train: %d steps): nothing to "
                    "train; evaluating it and writing the results.", ckpt.directory, start,
                    total_steps)
  abstract = ckpt_lib.abstract(state)  # The restore target once `state` is donated.
  teacher, teacher_params = load_teacher(config, run.task)
  train_step = jax.jit(make_train_step(run.module, run.structure, run.fixed, run.tx, run.task,
                                       config.masks.combine, run.sinks, teacher),
                       in_shardings=(run.state_shardings, None, None),
                       out_shardings=(run.state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(run.module, run.task, run.sinks))
  writer = observe.MetricWriter(run.workdir, total_steps)
  cfg_dict = config.to_dict()
  main_split = config.train.eval_splits[0]

  def diverged(what: str, step: int):
    return _keep_newest_finite(run, abstract, eval_step, what, step)

  def run_eval(state):
    out, frozen = run.evaluate(state, eval_step)
    for s, m in out.items():
      writer.write(int(state.step), m, split=s)
    if any(not math.isfinite(float(m["loss"])) for m in out.values()):
      raise diverged("The evaluation loss is not finite", int(state.step))
    return out, frozen

  def save(state, frozen=None, metrics=None, force=False):
    step = int(state.step)
    if ckpt.has_step(step):
      return  # Already saved (a rerun of a finished or preempted-at-the-end run).
    if not bool(_all_finite(state.params)):
      raise diverged("The parameters hold NaN / infinite values", step)
    frozen = frozen or run.frozen(state)
    ckpt.save(step, state, masks=frozen.mask_arrays(), masks_meta=frozen.metadata,
              config=cfg_dict, metrics=metrics, force=force)

  def check(pending):
    step, metrics = pending
    metrics = jax.device_get(metrics)
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise diverged(f"Training loss is {loss}", step)
    return step, metrics

  results: dict[str, Any] = {}
  pending = None  # (step, metrics) of the last dispatched step, fetched one step later.
  with _Preemption() as preempt:
    batches = run.train_ds.batches(config.train.batch_size, seed=config.data.seed,
                                   start_step=start, process_index=jax.process_index(),
                                   process_count=jax.process_count())
    for step in range(start, total_steps):
      batch = sharding.global_batch(next(batches), run.mesh)
      state, metrics = train_step(state, batch, teacher_params)
      if pending is not None:
        s, m = check(pending)
        if s % config.train.log_every == 0 or s == start + 1:
          m = dict(m, learning_rate=float(run.schedules["default"](s - 1)))
          writer.write(s, m)
          writer.progress(s, float(m["loss"]))
      pending = (step + 1, metrics)
      done = step + 1
      if preempt.requested:
        check(pending)
        save(state, force=True)
        ckpt.wait()
        results.update(step=done, preempted=True)
        logging.warning("Saved step %d after SIGTERM; rerun the same command to resume.",
                        done)
        break
      if done == total_steps:
        continue  # The final evaluation and save follow the loop.
      if config.train.eval_every and done % config.train.eval_every == 0:
        check(pending)
        out, frozen = run_eval(state)
        save(state, frozen, metrics=out[main_split])
      elif config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0:
        check(pending)
        save(state)
    else:
      if pending is not None:
        s, m = check(pending)
        writer.write(s, m)
      out, frozen = run_eval(state)
      save(state, frozen, metrics=out[main_split], force=True)
      results.update(out)
      results["step"] = int(state.step)
      if jax.process_index() == 0:
        _write_artifacts(run, frozen)
  ckpt.close()
  writer.close()
  results["wall_time_s"] = time.perf_counter() - t_start
  if jax.process_index() == 0:
    (run.workdir / "results.json").write_text(json.dumps(results, indent=2, default=float))
  return results


def _keep_newest_finite(run: Run, abstract, eval_step, what: str, step: int
                        ) -> NonFiniteLossError:
  """After a divergence: keeps the newest checkpoint whose forward pass is finite.

  Newer checkpoints (finite loss when saved, but NaN / infinite once evaluated) are set
  aside as `<step>.nonfinite-<n>`, so a rerun resumes from the kept one.

  Returns:
    The error to raise, saying which step was kept and what changes the outcome.
  """
  ckpt, config = run.ckpt, run.config
  ckpt.wait()
  split = config.train.eval_splits[0]
  kept, bad = None, []
  for s in reversed(ckpt.all_steps()):
    try:
      restored = ckpt.restore_state(abstract, s)
    except ckpt_lib.CheckpointError:
      continue  # Unreadable: the next resume skips it anyway.
    state = restored[0]
    ok = bool(_all_finite(state.params))
    if ok:  # One evaluation batch through the model, as the resumed run would see it.
      m = evaluate(eval_step, state, run.eval_sets[split], run.task, run.mesh,
                   config.train.eval_batch_size, run.frozen(state), max_batches=1)
      ok = math.isfinite(m["loss"])
    if ok:
      kept = s
      break
    bad.append(s)
  if bad:
    ckpt.set_aside(bad, "nonfinite")
  o = config.optimizer
  clip = (f"a smaller --config.optimizer.grad_clip_norm (now {o.grad_clip_norm:g}; e.g. "
          f"{o.grad_clip_norm / 4:g})" if o.grad_clip_norm else
          "--config.optimizer.grad_clip_norm=1 (now off)")
  kept_text = (f"Kept step {kept} (finite parameters and evaluation loss); rerunning "
               f"resumes there." if kept is not None else
               "No checkpoint is finite; rerunning starts afresh.")
  aside = (f" Set aside steps {sorted(bad)} as <step>.nonfinite-<n> in {ckpt.directory}."
           if bad else "")
  return NonFiniteLossError(
      f"{what} at step {step}. {kept_text}{aside} The same command would meet the same "
      "batches with the same settings and diverge again; change the outcome with a lower "
      f"--config.optimizer.learning_rate (now {o.learning_rate:g}; e.g. "
      f"{o.learning_rate / 10:g}), {clip}, or a longer "
      f"--config.optimizer.warmup_fraction (now {o.warmup_fraction:g}); these may change "
      "on resume. If the data holds NaN / infinite labels or features, fix them.")


def _write_artifacts(run: Run, frozen) -> None:
  """End-of-training artifacts: exported masks and, for pruning, the pruned-layer report."""
  from sparse_attn import export
  if run.config.export.masks and (frozen.masks is not None or frozen.gates is not None):
    export.export_masks(frozen, run.workdir / "masks", block_size=run.config.export.block_size)
  if run.structure is not None and run.structure.name == "prune":
    from sparse_attn.learn import prune
    from sparse_attn import learn as learn_lib
    report = prune.report(learn_lib.Frozen(gates=frozen.gates,
                                           metadata=frozen.metadata.get("learned", {})))
    (run.workdir / "pruned_layers.md").write_text(report + "\n")
    print(report)


def evaluate_workdir(workdir: str | pathlib.Path, config=None, step: int | None = None
                     ) -> tuple[dict[str, dict], Run, fixed_lib.FrozenStructure]:
  """Re-evaluates a run's checkpoint (default: latest) with its saved config.

  Read-only: nothing in `workdir` is created or written. The process-wide settings
  (allocator, compilation cache) come from `config` when given, else the defaults, never
  from the saved config.

  Returns:
    (metrics per split, the Run, the frozen structure used).

  Raises:
    CheckpointError: no such workdir, no checkpoint there, or no checkpoint of `step`
      (the message lists the steps there).
  """
  workdir = pathlib.Path(workdir).absolute()
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise ckpt_lib.CheckpointError(
        f"No run in {workdir} (no checkpoints/ directory): check the path, or train first.")
  current = config_lib.validate(config if config is not None else config_lib.base_config())
  # Before the checkpointer below starts JAX. The saved `distributed` section describes how
  # the training job was launched (coordinator, process ids), not this one.
  prepare_process(current)
  if config is None:
    ck = ckpt_lib.Checkpointer(ckpt_dir, async_save=False, read_only=True)
    saved = ck.restore_config(step)
    ck.close()
    if saved is None:
      raise ckpt_lib.CheckpointError(f"No checkpoint with a config in {ckpt_dir}; "
                                     "pass --config or train first.")
    config = ml_collections.ConfigDict(saved)
    config.distributed = config_lib.base_config().distributed
  run = setup(config, workdir, restore=False, read_only=True, process_settings=False)
  restored = run.ckpt.restore_state(run.state, step)
  if restored is None:
    raise ckpt_lib.CheckpointError(f"No checkpoint in {run.ckpt.directory}.")
  state = restored[0]
  out, frozen = run.evaluate(state)
  run.ckpt.close()
  return out, run, frozen


def _init_from(state, config, bert_params, state_shardings):
  """Places pretrained encoder weights (or another run's model params) into `state`."""
  init_from = config.init_from
  if init_from.startswith("run:"):
    other = ckpt_lib.Checkpointer(pathlib.Path(init_from[4:]) / "checkpoints",
                                  async_save=False)
    model_params = other.restore_model_params()
    other.close()
    if model_params is None:
      raise ckpt_lib.CheckpointError(f"init_from={init_from!r}: no checkpoint there.")
    target = state.params["model"]
    if jax.tree.structure(model_params) != jax.tree.structure(target):
      raise ValueError(f"init_from={init_from!r}: that run's model has other parameters "
                       "than this config's (different size, heads or task head).")
    params = dict(state.params)
    params["model"] = jax.device_put(model_params, state_shardings.params["model"])
    return state.replace(params=params)
  if bert_params is None:
    return state
  if "bert" in bert_params:  # A whole task model (e.g. an extracted pruned model).
    params = dict(state.params)
    params["model"] = jax.device_put(bert_params, state_shardings.params["model"])
    return state.replace(params=params)
  model_params = dict(state.params["model"])
  target = model_params["bert"]
  missing = sorted(set(_paths(target)) - set(_paths(bert_params)))
  if any(not p.startswith("pooler") for p in missing):  # A missing pooler stays random.
    raise ValueError(f"init_from={init_from!r} lacks encoder parameters {missing[:5]}.")
  shard = state_shardings.params["model"]["bert"]
  placed = {k: jax.device_put(bert_params[k], shard[k]) if k in bert_params else target[k]
            for k in target}
  model_params["bert"] = placed
  params = dict(state.params)
  params["model"] = model_params
  return state.replace(params=params)


def _paths(tree) -> list[str]:
  return [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]

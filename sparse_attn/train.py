"""Training: a run built from its config, the sharded loop, evaluation cadence, preemption.

One step (`train_steps`): the run structure turns its parameters into the step's masks and
gates (combined with the fixed masks, cut to the batch), the model takes them through
`apply`, the loss adds the structure penalty, and one optimizer (`optim`) with parameter
groups updates model weights and structure params together, jitted with in/out shardings
over the config's device mesh. docs/architecture.md draws the whole path.

Resume order (`state`): the latest restorable checkpoint in the workdir, else
`config.init_from` (pretrained weights or another run), else random initialisation.

Guarantees of `train_and_evaluate`: the workdir is locked for the run (`lock`); the config
is checked (keys, types, ranges) before any JAX work and, on resume, against the config
saved with the checkpoint; a run resumed at or past its last step goes straight to the
final evaluation, results and export; an error escaping the loop first waits for the
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

import jax
import ml_collections

from sparse_attn import checkpoint as ckpt_lib
from sparse_attn import config as config_lib
from sparse_attn import data as data_lib
from sparse_attn import divergence
from sparse_attn import distill as distill_lib
from sparse_attn import evaluation
from sparse_attn import example_masks
from sparse_attn import learn
from sparse_attn import lock as lock_lib
from sparse_attn import model as model_lib
from sparse_attn import observe
from sparse_attn import sharding
from sparse_attn import speed
from sparse_attn import state as state_lib
from sparse_attn import structure as structure_lib
from sparse_attn.optim import make_optimizer
from sparse_attn.process import prepare_process
from sparse_attn.train_steps import TrainState, jit_steps, make_eval_step

# Kept importable from here for one more release (they moved with this one).
from sparse_attn.evaluation import NonFiniteLossError, check_finite_metrics, evaluate_workdir
from sparse_attn.process import enable_compilation_cache
from sparse_attn.restore import build_model

__all__ = ["Run", "setup", "train_and_evaluate", "NonFiniteLossError", "check_finite_metrics",
           "evaluate_workdir", "enable_compilation_cache", "build_model", "prepare_process"]


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
  structure: structure_lib.RunStructure
  total_steps: int
  tx: Any
  schedules: dict
  state: TrainState
  state_shardings: Any
  ckpt: ckpt_lib.Checkpointer

  def frozen(self, state) -> learn.Frozen:
    """The deterministic structure of `state` (masks for eval, checkpoints, export)."""
    return self.structure.freeze(state.params["structure"], step=int(state.step),
                                 workdir=str(self.workdir))

  def evaluate(self, state, eval_step=None) -> tuple[dict[str, dict], learn.Frozen]:
    """Official metrics of every eval split, and the frozen structure used."""
    eval_step = eval_step or jax.jit(make_eval_step(self.module, self.task, self.structure))
    frozen = self.frozen(state)
    out = {s: evaluation.evaluate(eval_step, state.params, ds, self.task, self.mesh,
                                  self.config.train.eval_batch_size, frozen,
                                  self.config.train.max_eval_batches, self.structure)
           for s, ds in self.eval_sets.items()}
    return out, evaluation.with_reported_density(frozen, out)


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          restore: bool = True, *, read_only: bool = False) -> Run:
  """Validates the config, builds data, model, structure, optimizer and the sharded state.

  Process-wide settings are not applied here (`train_and_evaluate` applies them once).

  Args:
    config: the experiment config.
    workdir: the run's directory.
    restore: the state is the latest restorable checkpoint in `workdir` (whose saved
      config must match, see `config.config_changes`), else `config.init_from`, else
      random (the resume order). Without it the state is freshly initialised.
    read_only: open the checkpoints read-only: nothing in `workdir` is created or written.
  """
  config = config_lib.validate(config)
  workdir = pathlib.Path(workdir).absolute()
  ckpt_dir = workdir / "checkpoints"
  if restore and not read_only:
    config_lib.check_resume(ckpt_dir, config)
  task = data_lib.get_task(config.data)
  bert_config, module, init_params = build_model(config, task)
  config_lib.check_max_len(config.data.max_len, bert_config.max_position_embeddings)
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = sharding.rules_from_config(config.mesh.rules)

  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  sets = example_masks.datasets(config, ("train", *config.train.eval_splits), tokenizer)
  train_ds, eval_sets = sets["train"], {s: sets[s] for s in config.train.eval_splits}
  structure = structure_lib.build(config, bert_config, tokenizer, train_ds.lengths)

  batch_size = config.train.batch_size
  sharding.check_batch_divisible(batch_size, mesh)
  sharding.check_batch_divisible(config.train.eval_batch_size, mesh)
  total_steps = config.train.num_steps or max(1, math.ceil(
      config.train.num_epochs * len(train_ds) / batch_size))
  tx, _, schedules = make_optimizer(config.optimizer, total_steps)

  example = next(train_ds.batches(batch_size, seed=config.data.seed, start_step=0))
  state, state_shardings = state_lib.create_state(module, structure, tx, example, mesh,
                                                  rules, config.train.seed)
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
    state = state_lib.apply_init_from(state, config.init_from, init_params, state_shardings)
  return Run(config, workdir, mesh, task, train_ds, eval_sets, bert_config, module,
             structure, total_steps, tx, schedules, state, state_shardings, ckpt)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates per `config`, checkpointing to and resuming from `workdir`.

  Args:
    config: an experiment config (`sparse_attn.config`; one experiment per configs/ file).
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
    run = setup(config, workdir)
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
  teacher, teacher_params = distill_lib.load_teacher(config, run.task)
  train_step, eval_step = jit_steps(run.module, run.structure, run.tx, run.task,
                                    run.state_shardings, teacher)
  writer = observe.MetricWriter(run.workdir, total_steps)
  cfg_dict = config.to_dict()
  main_split = config.train.eval_splits[0]

  def diverged(what: str, step: int):
    def finite_on_one_batch(state):  # One evaluation batch, as the resumed run would see it.
      m = evaluation.evaluate(eval_step, state.params, run.eval_sets[main_split], run.task,
                              run.mesh, config.train.eval_batch_size, run.frozen(state),
                              max_batches=1, structure=run.structure)
      return math.isfinite(m["loss"])
    return divergence.keep_newest_finite(ckpt, config.optimizer, abstract,
                                         finite_on_one_batch, what, step)

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
    if not bool(state_lib.all_finite(state.params)):
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
  timer = observe.StepTimer()
  pending = None  # (step, metrics) of the last dispatched step, fetched one step later.
  with _Preemption() as preempt:
    batches = run.train_ds.batches(config.train.batch_size, seed=config.data.seed,
                                   start_step=start, process_index=jax.process_index(),
                                   process_count=jax.process_count())
    for step in range(start, total_steps):
      timer.tick()
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
        timer.pause()
      elif config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0:
        check(pending)
        save(state)
        timer.pause()
    else:
      if pending is not None:
        s, m = check(pending)
        writer.write(s, m)
      t_eval = time.perf_counter()
      out, frozen = run_eval(state)
      t_eval = time.perf_counter() - t_eval
      save(state, frozen, metrics=out[main_split], force=True)
      results.update(out)
      results["step"] = int(state.step)
      results["timing"] = observe.timing_section(
          timer, sum(min(len(ds), (config.train.max_eval_batches or len(ds))
                         * config.train.eval_batch_size) for ds in run.eval_sets.values()),
          t_eval,
          run.structure.executors)
      if (masks := observe.mask_summary(frozen.metadata)) is not None:
        results["masks"] = masks
      if config.train.compare_dense_steps and start < total_steps:
        results["timing"]["dense_comparison"] = speed.compare_with_dense(
            run, state, batch, config.train.compare_dense_steps, config.data.max_len)
      if jax.process_index() == 0:
        _write_artifacts(run, frozen)
  ckpt.close()
  writer.close()
  results["wall_time_s"] = time.perf_counter() - t_start
  if jax.process_index() == 0:
    (run.workdir / "results.json").write_text(json.dumps(results, indent=2, default=float))
  return results


def _write_artifacts(run: Run, frozen: learn.Frozen) -> None:
  """End-of-training artifacts: exported masks and the method's report, if it has one."""
  from sparse_attn import export
  if run.config.export.masks and (frozen.masks is not None or frozen.gates is not None):
    export.export_masks(frozen, run.workdir / "masks", block_size=run.config.export.block_size)
  learned = run.structure.learned
  method = learn.get(learned.name) if learned is not None else None
  if method is not None and method.report is not None:
    report = method.report(learn.Frozen(gates=frozen.gates,
                                        metadata=frozen.metadata.get("learned", {})))
    (run.workdir / method.report_file).write_text(report + "\n")
    print(report)

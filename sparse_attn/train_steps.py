"""The jitted step functions: TrainState, task losses, train step and eval step.

Batch keys (`sparse_attn.data.batching`): input_ids, token_type_ids, attention_mask [B, L];
weights [B] (0 = filler row); labels [B] (classification int / regression float) or [B, L]
(token classification, MLM) with label_mask [B, L] (1 = position carries a label); MLM
batches also list their predicted positions (mlm_positions, mlm_position_mask [B, P]), and
the steps score those only (`model.head_view`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from sparse_attn import attention
from sparse_attn import distill as distill_lib
from sparse_attn import learn
from sparse_attn import model as model_lib
from sparse_attn.masks import tree
from sparse_attn.structure import RunStructure


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. params = {"model": ..., "structure": ...}."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def task_loss(kind: str, logits, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of per-item losses, number of items) for one batch; filler rows weigh 0.

  Args:
    kind: "classification" | "regression" | "token_classification" | "mlm".
    logits: [B, C] (sequence tasks) or [B, L, C] (token tasks, MLM).
    batch: the batch dict.
  """
  w_B = batch["weights"].astype(jnp.float32)
  if kind == "classification":
    per = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["labels"])
    return jnp.sum(per * w_B), jnp.sum(w_B)
  if kind == "regression":
    per = jnp.square(logits[:, 0].astype(jnp.float32) - batch["labels"])
    return jnp.sum(per * w_B), jnp.sum(w_B)
  if kind in ("token_classification", "mlm"):
    w_BxL = batch["label_mask"].astype(jnp.float32) * w_B[:, None]
    per = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["labels"])
    return jnp.sum(per * w_BxL), jnp.sum(w_BxL)
  raise ValueError(f"Unknown task kind {kind!r}.")


def _predictions(kind: str, logits):
  if kind == "regression":
    return logits[:, 0].astype(jnp.float32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _model_inputs(batch):
  return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def make_train_step(module, structure: RunStructure, tx, task,
                    teacher: distill_lib.Teacher | None = None):
  """Returns step(state, batch[, teacher_params]) -> (state, metrics); jit it with shardings.

  Args:
    module: the task model (a linen module returning (logits, aux)).
    structure: the run structure (`sparse_attn.structure`): it samples the step's masks,
      gates and penalty, combined with the fixed masks and ready for the batch.
    tx: the optax optimizer over {"model", "structure"} params.
    task: the data Task (its `kind`).
    teacher: distil from this frozen model (`sparse_attn.distill`); the step then takes
      the teacher's model params as its third argument.
  """
  kind = task.kind

  def step(state: TrainState, batch, teacher_params=None):
    rng = jax.random.fold_in(state.rng, state.step)
    r_drop, r_struct = jax.random.split(rng)
    head_args, scored = model_lib.head_view(batch)
    t_logits = None if teacher is None else teacher.logits(teacher_params, batch)

    def loss_fn(params):
      s = structure.sample(params["structure"], r_struct, state.step, batch)
      logits, aux = module.apply(
          {"params": params["model"]}, *_model_inputs(batch), masks=s.masks, gates=s.gates,
          deterministic=False, rngs={"dropout": r_drop}, **head_args)
      total, count = task_loss(kind, logits, scored)
      loss = total / jnp.maximum(count, 1.0)
      metrics = {"task_loss": loss, "penalty": jnp.asarray(s.penalty),
                 "density": aux["density"], **s.metrics}
      if teacher is not None:
        d_total, d_count = distill_lib.distill_loss(kind, logits, t_logits, scored,
                                                    teacher.temperature)
        metrics["distill_loss"] = d_total / jnp.maximum(d_count, 1.0)
        loss = (1.0 - teacher.alpha) * loss + teacher.alpha * metrics["distill_loss"]
      metrics["objective"] = loss
      return loss + s.penalty, metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["loss"] = metrics.pop("objective") + metrics["penalty"]
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def _density_sum(masks, gates, batch, bert_config):
  """Per layer, the sum over real examples of the kept fraction of valid (q, k) pairs.

  A dense layer counts 1, a layer without attention (or with a closed layer gate) 0.
  `masks` are the batch's masks (`RunStructure.inputs`): leaves [..., L, L], per example
  or not; the density is `masks.tree.density` over valid pairs. Returns [num_layers].
  """
  valid_BxL = batch["attention_mask"].astype(bool)
  w_B = batch["weights"].astype(jnp.float32)
  masks = masks or (None,) * bert_config.num_hidden_layers
  out = []
  for i, m in enumerate(masks):
    if bert_config.layer_heads(i) == 0:
      out.append(jnp.zeros(()))
      continue
    if m is None:
      d_B = jnp.ones_like(w_B)
    elif isinstance(m, attention.BlockSparseMask):
      d_B = m.density(valid_BxL, per_example=True)
    else:
      d_B = tree.density(jnp.asarray(m), valid_BxL)
    if gates is not None and gates[i] is not None:
      d_B = d_B * jnp.mean(jnp.asarray(gates[i], jnp.float32))  # Closed heads keep nothing.
    out.append(jnp.sum(d_B * w_B))
  return jnp.stack(out)


def make_eval_step(module, task, structure: RunStructure):
  """Returns eval_step(params, batch, masks, gates) -> predictions and loss sums.

  `masks` / `gates` are a frozen structure's (`learn.Frozen`): bool masks at the run's
  maximum length or, on the fast path, what `structure.prepare` made of them for the
  batch's length (block-sparse objects); {0, 1} gates. `structure` cuts array masks to the
  batch's length and adds its sink links.
  """
  kind = task.kind

  def eval_step(params, batch, masks, gates):
    masks, gates = structure.inputs(learn.Frozen(masks=masks, gates=gates), batch)
    head_args, scored = model_lib.head_view(batch)
    logits, _ = module.apply({"params": params["model"]}, *_model_inputs(batch),
                             masks=masks, gates=gates, deterministic=True, **head_args)
    total, count = task_loss(kind, logits, scored)
    if kind in ("token_classification", "mlm"):
      weights = scored["label_mask"].astype(jnp.float32) * batch["weights"][:, None]
    else:
      weights = batch["weights"]
    return {"predictions": _predictions(kind, logits), "labels": scored["labels"],
            "weights": weights, "loss_sum": total, "loss_count": count,
            "density_sum": _density_sum(masks, gates, batch, module.config),
            "examples": jnp.sum(batch["weights"])}

  return eval_step


def jit_steps(module, structure: RunStructure, tx, task, state_shardings,
              teacher: distill_lib.Teacher | None = None):
  """The jitted train and eval steps of a run, as `train.train_and_evaluate` runs them.

  The train step takes and returns the state laid out by `state_shardings` and donates
  it. Executors are chosen when a step is first traced (for `attention.platform()`).

  Args:
    module, structure, tx, task, teacher: as in `make_train_step`.
    state_shardings: the TrainState's shardings (`state.create_state`).

  Returns:
    (train_step(state, batch, teacher_params) -> (state, metrics),
     eval_step(params, batch, masks, gates) -> predictions and loss sums).
  """
  train_step = jax.jit(make_train_step(module, structure, tx, task, teacher),
                       in_shardings=(state_shardings, None, None),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
  return train_step, jax.jit(make_eval_step(module, task, structure))

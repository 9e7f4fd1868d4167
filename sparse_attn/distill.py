"""Knowledge distillation from a finished run (e.g. the dense model) into a sparse student.

The student's loss becomes (1 - alpha) * task loss + alpha * distillation loss, where the
distillation loss follows Hinton et al. (2015): T^2 * KL(softmax(t / T) || softmax(s / T))
per labelled item (sequence for classification, labelled token for token tasks and MLM),
and the squared difference of the predictions for regression. The teacher runs in
deterministic mode with its own frozen structure (masks, gates), so any finished run, dense
or sparse, can teach. Config section `distill`: teacher = a finished run's workdir, alpha,
temperature.

With a teacher, the logged training "loss" is that mixed objective (plus any structure
penalty); "task_loss" is the plain task loss, comparable with the evaluation "loss".
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp

from sparse_attn import model as model_lib
from sparse_attn import restore


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model that the train step queries; its params travel as a step argument.

  Attributes:
    module: the teacher's task module (may differ in size or heads from the student's).
    structure: its run structure (cuts its masks to each batch and adds its sink links).
    frozen: its frozen structure (`learn.Frozen`: masks, gates).
    alpha: weight of the distillation loss in [0, 1].
    temperature: softmax temperature T > 0.
  """
  module: Any
  structure: Any
  frozen: Any
  alpha: float
  temperature: float

  def logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The teacher's logits for `batch` (deterministic: no dropout, no mask noise)."""
    masks, gates = self.structure.inputs(self.frozen, batch)
    head_args, _ = model_lib.head_view(batch)
    logits, _ = self.module.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"],
        batch["token_type_ids"], masks=masks, gates=gates, deterministic=True, **head_args)
    return logits


def load_teacher(config: Any, task: Any) -> tuple[Teacher | None, Any]:
  """The `distill.teacher` run as (Teacher, its model params), or (None, None).

  The teacher is loaded with `restore.load_run`: its datasets are not built, nor its
  optimizer; it must share this run's task, labels and tokenizer and cover its length.
  """
  d = config.distill
  if not d.teacher:
    return None, None
  check_settings(float(d.alpha), float(d.temperature))
  src = restore.load_run(d.teacher, role="distill.teacher={!r}")
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
  teacher = Teacher(module=src.module, structure=src.structure, frozen=src.frozen,
                    alpha=float(d.alpha), temperature=float(d.temperature))
  logging.info("Distilling from %s (its step %d, alpha %.2f, T %.1f).", src.workdir,
               src.step, d.alpha, d.temperature)
  return teacher, src.params["model"]


def check_settings(alpha: float, temperature: float) -> None:
  """Raises a ValueError naming the fix for alpha outside [0, 1] or temperature <= 0."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"distill.alpha must lie in [0, 1] (weight of the distillation loss); "
                     f"got {alpha}.")
  if not temperature > 0.0:
    raise ValueError(f"distill.temperature must be > 0; got {temperature}.")


def distill_loss(kind: str, student, teacher, batch, temperature: float
                 ) -> tuple[jax.Array, jax.Array]:
  """(sum of per-item distillation losses, number of items); filler rows weigh 0.

  Args:
    kind: "classification" | "regression" | "token_classification" | "mlm".
    student: student logits [B, C] or [B, L, C] (regression: [B, 1]).
    teacher: teacher logits of the same shape (no gradient flows into them).
    batch: the batch dict (weights [B]; label_mask [B, L] for token tasks).
    temperature: T; the KL term is scaled by T^2 so its gradients keep their size.
  """
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  student = student.astype(jnp.float32)
  w_B = batch["weights"].astype(jnp.float32)
  if kind == "regression":
    per = jnp.square(student[:, 0] - teacher[:, 0])
    return jnp.sum(per * w_B), jnp.sum(w_B)
  t = temperature
  log_p_t = jax.nn.log_softmax(teacher / t, axis=-1)
  log_p_s = jax.nn.log_softmax(student / t, axis=-1)
  per = t * t * jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  if kind == "classification":
    return jnp.sum(per * w_B), jnp.sum(w_B)
  if kind in ("token_classification", "mlm"):
    w_BxL = batch["label_mask"].astype(jnp.float32) * w_B[:, None]
    return jnp.sum(per * w_BxL), jnp.sum(w_BxL)
  raise ValueError(f"Unknown task kind {kind!r}.")

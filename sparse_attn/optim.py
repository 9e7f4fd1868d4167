"""The optimizer: AdamW with warm-up and decay, parameter groups by regex over param paths.

Groups come from `config.optimizer.groups`, a list of (regex, overrides) pairs matched with
`re.fullmatch` against "model/..." and "structure/..." paths: structure logits typically
get their own learning rate and no weight decay; a group with `frozen=True` is not trained
at all (its gradients are dropped before clipping, so they neither move it nor shrink the
other groups' steps; e.g. fitting a masked-LM head on a frozen encoder). One Adam state
covers every parameter and
the groups differ only in the final scaling, so the optimizer state round-trips through
orbax checkpoints unchanged.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax


def path_str(path) -> str:
  """A pytree key path as "a/b/c" (the form the group regexes match)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int):
  """AdamW with warm-up and decay; parameter groups by regex over "model/..." paths.

  Args:
    opt: the `config.optimizer` section.
    total_steps: number of training steps (for the schedule).

  Returns:
    (optax.GradientTransformation, labels_fn, {group: learning-rate schedule}).
  """
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
  unknown = {k for s in settings for k in s} - {"learning_rate", "weight_decay", "schedule",
                                                 "frozen"}
  if unknown:
    raise ValueError(f"optimizer.groups: unknown settings {sorted(unknown)}; a group sets "
                     "learning_rate, weight_decay, schedule or frozen.")
  frozen = {n for n, s in zip(names, settings) if s.get("frozen", False)}
  # A frozen group: no gradient (below), no learning rate and no weight decay.
  schedules = {n: optax.constant_schedule(0.0) if n in frozen
               else schedule(s["learning_rate"], s["schedule"]) for n, s in zip(names, settings)}
  decays = {n: 0.0 if n in frozen else float(s["weight_decay"])
            for n, s in zip(names, settings)}

  def labels(params):
    def label(path, _):
      p = path_str(path)
      for i, (rx, _) in enumerate(groups):
        if re.fullmatch(rx, p):
          return f"group_{i}"
      return "default"
    return jax.tree_util.tree_map_with_path(label, params)

  # AdamW with per-group learning rate and decoupled weight decay. One Adam state covers
  # every parameter (optax.multi_transform's masked states do not round-trip through
  # orbax checkpoints); the groups differ only in the final scaling.
  chain = [_drop_frozen(labels, frozen)] if frozen else []
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


def _drop_frozen(labels_fn, frozen: set[str]) -> optax.GradientTransformation:
  """Zero updates for parameters of the frozen groups (their gradients are never used, so
  XLA drops their computation)."""
  def update(updates, state, params=None):
    del params
    new = jax.tree.map(lambda u, g: jnp.zeros_like(u) if g in frozen else u,
                       updates, labels_fn(updates))
    return new, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

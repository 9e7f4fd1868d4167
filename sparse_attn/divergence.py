"""After a divergence: the newest checkpoint whose forward pass is finite is kept, newer ones
set aside, and the error says what would change the outcome."""

from __future__ import annotations

from sparse_attn import checkpoint as ckpt_lib
from sparse_attn import state as state_lib
from sparse_attn.evaluation import NonFiniteLossError


def keep_newest_finite(ckpt, opt, abstract, finite_on_one_batch, what: str, step: int
                       ) -> NonFiniteLossError:
  """After a divergence: keeps the newest checkpoint whose forward pass is finite.

  Newer checkpoints (finite loss when saved, but NaN / infinite once evaluated) are set
  aside as `<step>.nonfinite-<n>`, so a rerun resumes from the kept one.

  Args:
    ckpt: the run's checkpointer.
    opt: the `config.optimizer` section (the message names the settings to change).
    abstract: the state's restore target.
    finite_on_one_batch: state -> whether one evaluation batch gives a finite loss.
    what, step: what diverged, at which step (for the message).

  Returns:
    The error to raise, saying which step was kept and what changes the outcome.
  """
  ckpt.wait()
  kept, bad = None, []
  for s in reversed(ckpt.all_steps()):
    try:
      restored = ckpt.restore_state(abstract, s)
    except ckpt_lib.CheckpointError:
      continue  # Unreadable: the next resume skips it anyway.
    state = restored[0]
    ok = bool(state_lib.all_finite(state.params)) and finite_on_one_batch(state)
    if ok:
      kept = s
      break
    bad.append(s)
  if bad:
    ckpt.set_aside(bad, "nonfinite")
  o = opt
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

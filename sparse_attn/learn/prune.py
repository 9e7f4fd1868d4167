"""Self-pruning of attention sublayers (Not All Attention, Wu et al.), and per-head gates.

The papers' exact algorithms could not be recovered; this is a documented reconstruction
(see docs/architecture.md). The paper states only that, during task fine-tuning, the model
prunes itself down to "nearly 80% of self-attention layers pruned"; the gates, their
training and the budget are not public. Here every attention sublayer (unit="layer") or
every head (unit="head", beyond the paper) owns a logit theta and a stochastic gate:

  * "hard_concrete" (Louizos, Welling & Kingma 2018): s = sigmoid((logit u + theta) / tau),
    z = clip(s (zeta - gamma) + gamma, 0, 1) with stretch limits (gamma, zeta) = (-0.1, 1.1)
    and tau = 2/3. P(z != 0) = sigmoid(theta - tau log(-gamma / zeta)) is the L0 penalty
    of the relaxed gate; the straight-through gate (`hard`) is open with P(z > 1/2), and
    that is the keep probability the budget uses then.
  * "gumbel_sigmoid": z = sigmoid((logit u + theta) / tau); P(z > 1/2) = sigmoid(theta).

With `hard` the forward gate is exactly {0, 1} (z > 1/2), with the straight-through gradient
of z. How the budget is imposed (`budget`):

  * "penalty": beta * |E[kept fraction] - (1 - prune_fraction)|, or beta * E[kept fraction]
    (plain L0 pressure) with prune_fraction None. Under Adam every logit then drifts at
    about the same rate, so the logits separate only where the task gradient is strong.
  * "shift": no penalty; the gates are sampled at theta + c, with the scalar c (no
    gradient) solved by bisection so that E[kept fraction] equals the fraction `freeze`
    will keep (k / U) at every step. The budget is met from the first step, and only the
    task gradient orders the logits (the frozen top-k is invariant to c).
    `budget_warmup_steps` W moves the kept fraction from 1 to the budget linearly over W
    steps (so the model first trains with every gate open). Needs a prune_fraction.

Budget and rounding: of U gated units (layers with attention, or their heads), `freeze`
keeps exactly the k with the largest logits (ties: lower index), where
k = U - floor(prune_fraction * U + 1/2) (the nearest count; halves prune more), raised to
`min_layers_kept` for unit="layer". For unit="head", after the top-k, the best head of the
best-scoring empty layers is added until `min_layers_kept` layers keep a head (so k may be
exceeded by that many). Without a budget, units with theta > 0 are kept. A configuration
that would prune every unit is an error unless `allow_prune_all=True`; without a budget and
without it, the best unit is always kept.

A layer whose heads are all pruned loses its attention sublayer: `freeze` gives it a scalar
gate 0 (so the gated model and the `extract`ed model agree), while sampled per-head gates of
zeros still add the output projection's bias. `extract` builds the physically smaller model
(`learn.prune_extract`); the relaxations and config checks are `learn.common`'s (re-exported
here under their old names).

Shape legend: L layers, H heads, K head dim, D hidden size, U gated units.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_attn.learn import base as learn
from sparse_attn.learn import common
from sparse_attn.learn import prune_extract

Array = jax.Array
_LABEL = "prune"

# Old names of the shared parts (same functions, same random draws).
hard_concrete = common.hard_concrete
hard_concrete_keep_prob = common.hard_concrete_keep_prob
hard_concrete_open_prob = common.hard_concrete_open_prob
straight_through = common.straight_through
extract = prune_extract.extract
extract_task = prune_extract.extract_task

UNITS = ("layer", "head")
BUDGETS = ("penalty", "shift")
RELAXATIONS = ("hard_concrete", "gumbel_sigmoid")
_DEFAULT_TEMPERATURE = {"hard_concrete": 2.0 / 3.0, "gumbel_sigmoid": 1.0}


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the "prune" method (a reconstruction; see the module docstring).

  Returns:
    ConfigDict with fields:
      unit: "layer" (gate each attention sublayer) or "head" (gate each head).
      relaxation: "hard_concrete" or "gumbel_sigmoid".
      temperature: None = the relaxation's default (2/3 hard_concrete, 1.0 gumbel_sigmoid).
      limits: hard-concrete stretch interval (gamma, zeta), gamma < 0 and zeta > 1.
      hard: straight-through {0, 1} gates in the forward pass (True) or the relaxed gate.
      budget: "penalty" or "shift" (see the module docstring).
      budget_warmup_steps: "shift" only: steps over which the kept fraction falls from 1
        to the budget (0 = the budget from the start).
      beta: penalty weight (>= 0; "penalty" only).
      prune_fraction: target fraction of units to prune (0.8 = "prune 80% of attention
        sublayers"), or None for a plain L0 penalty and a theta > 0 keep rule.
      keep_layernorm: what a pruned layer computes; must equal
        BertConfig.pruned_keep_layernorm (None = take it from the BertConfig).
      init_logit: initial theta of every gate (3.0: gates start open).
      min_layers_kept: at least this many layers keep attention (>= 0).
      allow_prune_all: permit a structure with no attention at all.
  """
  c = ml_collections.ConfigDict()
  c.unit = "layer"
  c.relaxation = "hard_concrete"
  c.temperature = None
  c.limits = (-0.1, 1.1)
  c.hard = True
  c.budget = "penalty"
  c.budget_warmup_steps = 0
  c.beta = 1.0
  c.prune_fraction = 0.8
  c.keep_layernorm = None
  c.init_logit = 3.0
  c.min_layers_kept = 0
  c.allow_prune_all = False
  return c


# ---------------------------------------------------------------------------------------------
# Pure functions: gates, budget.


def gumbel_sigmoid(theta: Array, rng: Array, temperature: float = 1.0) -> Array:
  """Relaxed Bernoulli sample sigmoid((logit u + theta) / tau) in (0, 1); P(> 1/2) = sigmoid(theta).

  `common.gumbel_sigmoid` with the "uniform" noise of `hard_concrete`. theta's shape."""
  return common.gumbel_sigmoid(theta, rng, temperature, noise="uniform")


def budget_shift(theta: Array, valid: Array, target: Array, keep_prob_fn,
                 iters: int = 40) -> Array:
  """c with mean over valid units of keep_prob_fn(theta + c) = target (bisection, no grad).

  Args:
    theta: logits, any shape; valid: bool of the same shape (False = padding).
    target: kept fraction in (0, 1]; keep_prob_fn: monotone theta -> P(keep).
    iters: bisection steps on c in [-60 - max theta, 60 - min theta].

  Returns:
    Scalar c (stop_gradient).
  """
  theta = jax.lax.stop_gradient(jnp.asarray(theta, jnp.float32))
  valid = jnp.asarray(valid, jnp.float32)
  n = jnp.maximum(jnp.sum(valid), 1.0)
  theta_v = jnp.where(valid > 0, theta, 0.0)  # Padding must not widen the bracket.
  lo = -60.0 - jnp.max(theta_v)
  hi = 60.0 - jnp.min(theta_v)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    mean = jnp.sum(keep_prob_fn(theta + mid) * valid) / n
    return jnp.where(mean < target, mid, lo), jnp.where(mean < target, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
  return jax.lax.stop_gradient(0.5 * (lo + hi))


def kept_count(num_units: int, prune_fraction: float) -> int:
  """k = U - floor(prune_fraction * U + 1/2): units kept by the budget (before minimums)."""
  return num_units - int(math.floor(prune_fraction * num_units + 0.5))


def select_top(theta_LxH: Array, valid_LxH: np.ndarray, k: int | None, min_layers: int,
               unit: str) -> Array:
  """The frozen keep pattern: top-k units by theta (or theta > 0 if k is None), jittable.

  Args:
    theta_LxH: logits of the gated layers, padded to H columns (unit="layer": H = 1).
    valid_LxH: bool, False on padding (layers with fewer heads).
    k: units to keep, or None for the theta > 0 rule.
    min_layers: at least this many rows keep a unit (best rows by their max theta).
    unit: "layer" or "head" (documentation only; the rule is the same on rows).

  Returns:
    bool keep_LxH.
  """
  del unit
  valid = jnp.asarray(valid_LxH)
  t = jnp.where(valid, theta_LxH, -jnp.inf)
  flat = t.ravel()
  if k is None:
    keep = (t > 0) & valid
  else:
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size))
    keep = (rank < k).reshape(t.shape) & valid
  has = jnp.any(keep, axis=1)
  deficit = jnp.maximum(min_layers - jnp.sum(has), 0)
  row_score = jnp.where(has, -jnp.inf, jnp.max(t, axis=1))
  row_order = jnp.argsort(-row_score, stable=True)
  row_rank = jnp.zeros(row_score.shape, jnp.int32).at[row_order].set(
      jnp.arange(row_score.size))
  extra = (~has) & (row_rank < deficit)
  best = jnp.arange(t.shape[1])[None, :] == jnp.argmax(t, axis=1)[:, None]
  return keep | (extra[:, None] & best & valid)


# ---------------------------------------------------------------------------------------------
# The Structure factory.


def _rules(bert_config: Any, layers: tuple[int, ...]) -> list[common.Rule]:
  """prune's cross-field checks and derived entries (after the field checks), in order."""

  def budget(c):
    if c["budget"] == "shift" and c["prune_fraction"] is None:
      return ("structure.budget='shift' meets a prune_fraction exactly; set "
              "structure.prune_fraction (e.g. 0.67) or use budget='penalty' for plain L0 "
              "pressure.")

  def relaxation(c):
    if c["temperature"] is None:
      c["temperature"] = _DEFAULT_TEMPERATURE[c["relaxation"]]
    limits = tuple(c["limits"]) if isinstance(c["limits"], (tuple, list)) else ()
    if not (len(limits) == 2 and all(common.number().accepts(x) for x in limits)
            and limits[0] < 0 and limits[1] > 1):
      return (f"structure.limits (gamma, zeta) need gamma < 0 < 1 < zeta; got "
              f"{c['limits']}.")
    c["limits"] = (float(limits[0]), float(limits[1]))

  def layernorm(c):
    model_ln = bool(bert_config.pruned_keep_layernorm)
    if c["keep_layernorm"] is None:
      c["keep_layernorm"] = model_ln
    elif bool(c["keep_layernorm"]) != model_ln:
      return (f"structure.keep_layernorm={c['keep_layernorm']} disagrees with "
              f"BertConfig.pruned_keep_layernorm={model_ln}; the model decides what a "
              "pruned layer computes, so set both the same (or leave keep_layernorm None).")

  def units(c):
    pf, m = c["prune_fraction"], int(c["min_layers_kept"])
    c["layers"] = layers
    c["heads"] = {i: bert_config.layer_heads(i) for i in layers}
    num = len(layers) if c["unit"] == "layer" else sum(c["heads"].values())
    c["num_units"] = num
    c["k"] = None if pf is None else kept_count(num, pf)
    if c["k"] is not None and c["unit"] == "layer":
      c["k"] = max(c["k"], m)
    if c["k"] == 0 and m == 0 and not c["allow_prune_all"]:
      return (f"structure.prune_fraction={pf} prunes every one of the {num} attention "
              f"{c['unit']}s (kept = {num} - floor({pf} * {num} + 1/2) = 0). Lower "
              "prune_fraction, set min_layers_kept >= 1, or set allow_prune_all=True to "
              "build a model without attention.")
    # Without a budget the theta > 0 rule could drop everything: keep the best unit then.
    c["min_rows"] = m if (c["allow_prune_all"] or m > 0) else (0 if c["k"] else 1)

  return [budget, relaxation, layernorm, units]


def resolve_config(structure_config: Any, bert_config: Any) -> dict[str, Any]:
  """Merges a config section over `default_config()` and validates it (plain dict out).

  Returns:
    The method's fields (temperature, limits and keep_layernorm resolved) plus "layers"
    (gated layer indices), "heads" ({layer: H}), "num_units" (U), "k" (units `freeze`
    keeps, None without a budget) and "min_rows" (layers that must keep a unit).
  """
  layers = common.select_layers(None, bert_config, _LABEL)
  fields = {
      "unit": common.choice(*UNITS),
      "relaxation": common.choice(*RELAXATIONS),
      "temperature": common.number(0.0, low_open=True, none_ok=True),
      "hard": common.flag(),
      "budget": common.choice(*BUDGETS),
      "budget_warmup_steps": common.integer(0),
      "beta": common.number(0.0),
      "prune_fraction": common.number(0.0, 1.0, none_ok=True),
      "keep_layernorm": common.flag(none_ok=True),
      "init_logit": common.number(finite=True),
      "min_layers_kept": common.integer(0, len(layers)),
      "allow_prune_all": common.flag(),
  }
  return common.check_section(structure_config, default_config().to_dict(), fields,
                              label=_LABEL, rules=_rules(bert_config, layers))


def make_structure(structure_config: Any, bert_config: Any, seq_len: int,
                   lengths: Any = None) -> learn.Structure:
  """Builds the attention-pruning Structure (reconstruction of Not All Attention's self-pruning).

  Params: {"layer_i": theta} with theta a scalar (unit="layer") or [H_i] (unit="head") for
  each layer with attention. `sample` returns gates as a per-layer tuple (None for layers
  without attention), penalty, and metrics "prune/expected_kept", "prune/kept";
  `train=False` returns the frozen {0, 1} gates. `freeze` returns
  Frozen(gates, metadata={"pruned_layers", "pruned_heads", "kept_fraction", ...}).
  """
  del seq_len, lengths  # Gates do not depend on the sequence length or the data.
  c = resolve_config(structure_config, bert_config)
  num_layers, layers, heads = bert_config.num_hidden_layers, c["layers"], c["heads"]
  by_head = c["unit"] == "head"
  width = max(heads.values()) if by_head else 1
  valid_LxH = np.zeros((len(layers), width), bool)
  for row, i in enumerate(layers):
    valid_LxH[row, :heads[i] if by_head else 1] = True

  def init(rng):
    del rng  # Deterministic init: every gate open.
    return {f"layer_{i}": jnp.full((heads[i],) if by_head else (), c["init_logit"],
                                   jnp.float32) for i in layers}

  def padded(params):
    rows = [jnp.pad(jnp.atleast_1d(jnp.asarray(params[f"layer_{i}"], jnp.float32)),
                    (0, width - (heads[i] if by_head else 1))) for i in layers]
    return jnp.stack(rows)

  def keep_prob(theta):
    """P(the forward gate is on): z > 1/2 with `hard`, else z != 0 (hard concrete's L0)."""
    if c["relaxation"] == "hard_concrete":
      f = hard_concrete_open_prob if c["hard"] else hard_concrete_keep_prob
      return f(theta, c["temperature"], c["limits"])
    return jax.nn.sigmoid(theta)

  def frozen_keep(params):
    return select_top(padded(params), valid_LxH, c["k"], c["min_rows"], c["unit"])

  def shift(params, step):
    """The budget's common logit offset c ("shift"), 0 for "penalty"."""
    if c["budget"] != "shift":
      return 0.0
    target = c["k"] / c["num_units"]  # What `freeze` keeps (rounded, with minimums).
    if c["budget_warmup_steps"]:  # From every gate open to the budget.
      target = common.linear_ramp(step, 1.0, target, c["budget_warmup_steps"])
    # Open gates: P(keep) <= 1 - 1e-6 keeps the bisection finite when the target is 1.
    target = jnp.minimum(target, 1.0 - 1e-6)
    return budget_shift(padded(params), valid_LxH, target, keep_prob)

  def sample(params, rng, step, train):
    gates = [None] * num_layers
    offset = shift(params, step) if train else 0.0
    if train:
      for i in layers:
        theta = jnp.asarray(params[f"layer_{i}"], jnp.float32) + offset
        r = jax.random.fold_in(rng, i)
        z = (hard_concrete(theta, r, c["temperature"], c["limits"])
             if c["relaxation"] == "hard_concrete" else
             gumbel_sigmoid(theta, r, c["temperature"]))
        gates[i] = straight_through(z) if c["hard"] else z
    else:
      keep = frozen_keep(params).astype(jnp.float32)
      for row, i in enumerate(layers):
        gates[i] = keep[row, :heads[i]] if by_head else keep[row, 0]
    probs = jnp.concatenate([jnp.ravel(keep_prob(jnp.asarray(params[f"layer_{i}"],
                                                             jnp.float32) + offset))
                             for i in layers])
    expected_kept = jnp.mean(probs)
    kept = jnp.mean(jnp.concatenate([jnp.ravel(gates[i]) for i in layers]))
    if c["budget"] == "shift":
      penalty = jnp.zeros(())
    elif c["prune_fraction"] is None:
      penalty = c["beta"] * expected_kept
    else:
      penalty = c["beta"] * jnp.abs(expected_kept - (1.0 - c["prune_fraction"]))
    return learn.Sample(masks=None, gates=tuple(gates), penalty=penalty,
                        metrics={"prune/expected_kept": expected_kept, "prune/kept": kept})

  def freeze(params):
    keep = np.asarray(frozen_keep(params))
    gates, pruned_layers, pruned_heads, probs = [None] * num_layers, [], {}, {}
    # Keep probabilities as the search sampled them at the end (after any warm-up).
    offset = float(shift(params, c["budget_warmup_steps"]))
    for row, i in enumerate(layers):
      k_h = keep[row, :heads[i] if by_head else 1]
      theta = np.asarray(params[f"layer_{i}"], np.float32)
      p = np.asarray(keep_prob(jnp.asarray(theta) + offset))
      probs[f"layer_{i}"] = [float(x) for x in p] if by_head else float(p)
      if not k_h.any():  # The whole sublayer goes (also when every head was pruned).
        gates[i] = np.zeros((), np.float32)
        pruned_layers.append(i)
      elif by_head:
        gates[i] = k_h.astype(np.float32)
        if not k_h.all():
          pruned_heads[f"layer_{i}"] = [int(h) for h in np.nonzero(~k_h)[0]]
      else:
        gates[i] = np.ones((), np.float32)
    kept_units = int(keep.sum())
    metadata = {
        "method": "prune",
        "reconstruction": "Not All Attention self-pruning (documented reconstruction; the "
                          "paper's exact algorithm is not public)",
        "unit": c["unit"], "relaxation": c["relaxation"], "budget": c["budget"],
        "keep_layernorm": bool(c["keep_layernorm"]),
        "prune_fraction": c["prune_fraction"], "num_units": c["num_units"],
        "kept_units": kept_units, "kept_fraction": kept_units / c["num_units"],
        "pruned_layers": pruned_layers, "pruned_heads": pruned_heads,
        "keep_probability": probs,
    }
    return learn.Frozen(masks=None, gates=tuple(gates), metadata=metadata)

  return learn.Structure(name="prune", init=init, sample=sample, freeze=freeze)


# ---------------------------------------------------------------------------------------------
# Reporting.


def report(frozen: Any) -> str:
  """Markdown summary of a pruned structure: one row per layer, then the totals.

  Args:
    frozen: a Frozen from the prune method (or a per-layer gates tuple).

  Returns:
    A markdown string.
  """
  gates = frozen.gates if isinstance(frozen, learn.Frozen) else frozen
  meta = frozen.metadata if isinstance(frozen, learn.Frozen) else {}
  probs = meta.get("keep_probability", {})
  lines = ["| layer | attention | heads kept | pruned heads | keep prob. |",
           "|---|---|---|---|---|"]
  removed = []
  for i, gate in enumerate(gates):
    p = probs.get(f"layer_{i}")
    p_txt = "" if p is None else (f"{p:.3f}" if np.ndim(p) == 0 else
                                  ", ".join(f"{x:.2f}" for x in p))
    if gate is None:
      lines.append(f"| {i} | kept (not gated) | all | - | {p_txt} |")
      continue
    g = np.asarray(gate)
    if not g.any():
      removed.append(i)
      lines.append(f"| {i} | **pruned** | 0 | all | {p_txt} |")
    elif g.ndim == 0 or g.all():
      lines.append(f"| {i} | kept | {'all' if g.ndim == 0 else g.size} | - | {p_txt} |")
    else:
      off = ", ".join(str(h) for h in np.nonzero(g == 0)[0])
      lines.append(f"| {i} | kept | {int(g.sum())}/{g.size} | {off} | {p_txt} |")
  head = [f"Attention pruning ({meta.get('unit', 'gates')}): "
          f"{len(removed)}/{len(gates)} attention sublayers removed "
          f"({', '.join(map(str, removed)) or 'none'})."]
  if "kept_fraction" in meta:
    head.append(f"Kept fraction of gated units: {meta['kept_fraction']:.3f}; "
                f"pruned layers keep LayerNorm: {meta.get('keep_layernorm')}.")
  return "\n".join(head + [""] + lines) + "\n"


learn.register(learn.Method(name="prune", default_config=default_config,
                            build=make_structure, report=report,
                            report_file="pruned_layers.md", extract=extract_task))

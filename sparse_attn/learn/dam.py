"""SparseBERT's Differentiable Attention Mask (DAM_u / DAM_s): logits, sampling, penalty.

A DAM "mask instance" owns logits alpha, one per attention position (DAM_u) or per diagonal
offset (DAM_s, a Toeplitz mask M[h, i, j] = m[h, |i - j|]), optionally per head and per
b x b block. Each step samples m = gumbel_sigmoid(alpha) per logit and expands it to
mask_HxNxN, which enters the model as a float mask (masked softmax, so dropped entries still
get a gradient). One instance is shared by all DAM layers (the official code) or there is
one per layer.

Official code (han-shi/SparseBERT), reproduced by `official()`: DAM_s, per head, shared by
all layers, |i - j| offsets, a hard straight-through 2-class Gumbel-softmax at tau = 1 (the
same thing as a hard Gumbel-sigmoid on alpha = a0 - a1 with Logistic(0, 1) noise), penalty
lam * ||M||_1 over the expanded H x n x n tensor counted once, noise also at evaluation.

Conventions of this module:
  * Noise is `jax.random.logistic` (exactly the difference of two Gumbels; the code's
    eps = 1e-5 inside the log is a numerical guard and is not reproduced).
  * Hard mode: forward exactly {0, 1} (1 iff alpha + noise > 0), backward the gradient of
    the soft sample sigmoid((alpha + noise) / tau). P(keep) = sigmoid(alpha) for any tau.
  * Penalties use |m| (= m, since m >= 0) as the code's torch.norm(M, p=1) does, so in hard
    mode only kept entries get the penalty's gradient (|x| has zero gradient at 0).
    "l1_sum" = lam * sum(|M|) over each instance's H x n x n entries, summed over instances
    (a shared mask counts once); "density" = lam * sum(|M|) / (number of entries), i.e. the
    same thing divided by H * n^2 (196,608 for BERT-base at n = 128), so lam_density ~
    H * n^2 * lam_l1_sum.
  * target_density t (a target, not a cap) replaces the lam penalty, per instance, on the
    expected density d = sum(w * sigmoid(alpha)) / (H * n^2). With target_warmup_steps W
    the target moves linearly from sigmoid(init_logit) (the density at init) to t over W
    steps. "abs" adds lam * |d - t| (mean over instances, so lam is on the density scale,
    O(1)). "lagrangian" adds mu1 * g + mu2 * g^2, g = d - t (the form of Wang et al. 2020
    and CoFi pruning), with free multipliers (mu1, mu2) = params["lagrange"][s] (init 0)
    whose gradient is reversed: each term is sg(mu) * f + (sg(mu) - mu) * sg(f), whose
    value is mu * f, whose logit gradient is mu * grad(f), and whose mu gradient is -f.
    An optimizer that descends the loss therefore ascends the multipliers (dual ascent).
    Under Adam the multipliers make the density circle the target; keep their learning
    rate small and use a warm-up (see tests/test_learn_dam.py for a working toy setting).
  * density_over="data" measures every density (target, "density" penalty, top-k, the
    logged dam/density) over the training data's valid (query, key) pairs instead of the
    full n x n matrix: position (i, j) weighs the share of the data's pairs that sit there
    (`masks.stats.pair_weights` of the example lengths), so target_density=0.25 asks for
    75% sparsity as evaluation measures it. With short sentences in a long max_len, the
    matrix density of a band is several times lower than its valid-pair density.
  * `sample(train=False)` is deterministic unless stochastic_eval (which only affects
    callers of `sample`: the trainer evaluates `freeze`'s masks, always deterministic, so
    that evaluation, checkpoints and exports agree). "threshold" keeps
    sigmoid(alpha) > 0.5; "topk" keeps the highest logits until each instance's element
    density (see density_over) is closest to target_density (exact up to one logit's share: 1 for
    element DAM_u, c_d for a DAM_s offset, a block's size with block_size > 0).
  * keep_diagonal=False forces M[h, i, i] = 0 (SparseBERT's "no diagonal" finding); the
    diagonal then counts as dropped in every density and gets no gradient.
  * A head whose whole row is dropped outputs zero for that query (this library's masked
    softmax), not dense attention as the code's -10000 bias would give.

Shape legend: S mask instances, H heads (1 when not per head), N sequence length n,
P logits per head, U = n (or n_blocks) rows of DAM_u logits, L layers. The index maps,
expansion, densities and top-k live in `learn.dam_masks`; the relaxation, schedules and
config checks are `learn.common`'s (re-exported here under their old names).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_attn.learn import base as learn
from sparse_attn.learn import common
from sparse_attn.learn import dam_masks
from sparse_attn.learn.dam_masks import binarize, expand, expected_density, logit_weights
from sparse_attn.learn.dam_masks import num_units, toeplitz_index, unstructured_index
from sparse_attn.masks import stats

Array = jax.Array
_LABEL = "DAM"

# Old names of the shared parts (same functions, same random draws).
gumbel_sigmoid = common.gumbel_sigmoid
temperature_at = common.temperature_at
expand_toeplitz = dam_masks.expand_toeplitz
expand_unstructured = dam_masks.expand_unstructured

_FIELDS = {
    "method": common.choice("dam_u", "dam_s"),
    "share": common.choice("all_layers", "per_layer"),
    "relaxation": common.choice("hard", "soft"),
    "anneal": common.choice("exponential", "linear"),
    "penalty": common.choice("l1_sum", "density"),
    "target_mode": common.choice("lagrangian", "abs"),
    "eval_rule": common.choice("threshold", "topk"),
    "density_over": common.DENSITY_OVER,
    **{key: common.flag() for key in ("per_head", "symmetric", "asymmetric",
                                      "stochastic_eval", "keep_diagonal")},
    "temperature": common.POSITIVE,
    "temperature_final": common.number(0.0, low_open=True, none_ok=True),
    "lam": common.number(0.0, finite=True),
    "init_logit": common.number(finite=True),
    "init_std": common.number(0.0),
    **{key: common.integer(0) for key in ("anneal_steps", "block_size",
                                          "target_warmup_steps")},
    "target_density": common.TARGET_DENSITY,
}


def default_config(method: str = "dam_s") -> ml_collections.ConfigDict:
  """The DAM defaults (the only place they live): the official code's search settings,
  with deterministic evaluation. `method`: "dam_s" or "dam_u"."""
  return ml_collections.ConfigDict(dict(
      method=method,           # "dam_u": a logit per (i, j); "dam_s": per offset i - j.
      share="all_layers",      # One mask for all DAM layers (code) | "per_layer".
      per_head=True,           # A mask per head (code) or one for all heads.
      layers=None,             # None = every layer with attention; or e.g. [6, 7, ...].
      symmetric=False,         # DAM_u only: alpha_ij = alpha_ji (code's commented variant).
      asymmetric=False,        # DAM_s only: signed offsets i - j instead of |i - j|.
      block_size=0,            # 0 = element level; b > 0 = a logit per b x b block (offset).
      init_logit=0.0,          # Mean of the initial logits (0: P(keep) = 0.5).
      init_std=1e-3 * math.sqrt(2.0),  # Code: a0 - a1 with a0, a1 ~ 1e-3 * N(0, 1).
      relaxation="hard",       # "hard" straight-through (code) | "soft" sigmoid sample.
      temperature=1.0,         # Code: 1, constant.
      temperature_final=None,  # None = temperature (constant).
      anneal_steps=0,          # Steps from temperature to temperature_final.
      anneal="exponential",    # Or "linear".
      penalty="l1_sum",        # lam * sum |M| (code) | "density": lam * mean |M|.
      lam=1e-4,                # Code: BertForPreTraining default; README 1e-4 .. 1e-1.
      target_density=None,     # None, or a target density in (0, 1].
      target_mode="lagrangian",  # Or "abs": lam * |expected density - target|.
      target_warmup_steps=0,   # Move the target from the init density to it over W steps.
      eval_rule="threshold",   # sigmoid(alpha) > 0.5 | "topk" (needs target_density).
      density_over="matrix",   # Densities over the n x n matrix | "data": valid pairs.
      stochastic_eval=False,   # True = the code's noisy masks at evaluation.
      keep_diagonal=True,      # False forces M_ii = 0.
  ))


def official() -> ml_collections.ConfigDict:
  """Preset "dam_s_official": the han-shi/SparseBERT code (see the module docstring)."""
  cfg = default_config()
  cfg.update(method="dam_s", share="all_layers", per_head=True, asymmetric=False,
             block_size=0, relaxation="hard", temperature=1.0, penalty="l1_sum",
             lam=1e-4, stochastic_eval=True)
  return cfg


PRESETS = {"dam_s_official": official}


def _rules(bert_config: Any, seq_len: int | None) -> list[common.Rule]:
  """DAM's cross-field checks (after `_FIELDS`), in order."""

  def constant_by_default(c):
    if c["temperature_final"] is None:
      c["temperature_final"] = c["temperature"]

  def topk(c):
    if c["eval_rule"] == "topk" and c["target_density"] is None:
      return ("structure.eval_rule='topk' needs target_density (the density to keep); set "
              "structure.target_density or use eval_rule='threshold'.")

  def tying(c):
    if c["symmetric"] and c["method"] != "dam_u":
      return ("structure.symmetric ties alpha_ij = alpha_ji for dam_u; dam_s offsets "
              "|i - j| are already symmetric (use asymmetric=True for signed offsets).")
    if c["asymmetric"] and c["method"] != "dam_s":
      return ("structure.asymmetric (signed offsets) applies to dam_s only; dam_u is "
              "unstructured.")

  def blocks(c):
    if seq_len is None:
      return None
    if not common.integer(1).accepts(seq_len):
      return f"seq_len must be a positive integer, got {seq_len!r}."
    if c["block_size"] > seq_len:
      return (f"structure.block_size {c['block_size']} exceeds seq_len {seq_len}; a "
              "partial last block is allowed but not a block larger than the sequence.")

  def layers(c):
    if c["layers"] is not None:
      c["layers"] = list(common.select_layers(c["layers"], bert_config, _LABEL))

  return [constant_by_default, common.anneal_rule, topk, tying, blocks, layers]


def validate_config(structure_config: Any, bert_config: Any = None,
                    seq_len: int | None = None) -> ml_collections.ConfigDict:
  """Merges `structure_config` onto `default_config()` and checks every field.

  Args:
    structure_config: a ConfigDict / dict with any subset of the default fields.
    bert_config: optional BertConfig (layer indices and head counts are checked).
    seq_len: optional maximum sequence length n (block_size is checked against it).

  Returns:
    The complete, checked ConfigDict (temperature_final filled in; `layers` None or a list).
  """
  c = common.check_section(structure_config, default_config().to_dict(), _FIELDS,
                           label=_LABEL, rules=_rules(bert_config, seq_len))
  return ml_collections.ConfigDict(c)


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


def target_at(step: Array | int, target: float, start: float, warmup_steps: int) -> Array:
  """Density target at `step` (jit-safe): linear from `start` to `target` over warm-up."""
  return common.linear_ramp(step, start, target, warmup_steps)


# ---------------------------------------------------------------- the Structure

@dataclasses.dataclass(frozen=True)
class _Instance:
  """One mask (shared by `layers`) and its static index data."""
  name: str
  layers: tuple[int, ...]
  heads: int                 # H of its mask (1 when not per head).
  logits_shape: tuple[int, ...]
  index: np.ndarray          # [N, N] into the P logits of a head.
  eligible: np.ndarray       # [N, N] float32: 0 where the diagonal is forced off.
  weights: np.ndarray        # [P] eligible entries per logit.
  pair_weights: np.ndarray   # [P] share of the counted pairs per logit (density_over).
  pair_total: float          # H * (pairs counted): densities are sums / pair_total.


def _instances(c, bert_config, n: int, lengths: Any) -> list[_Instance]:
  layers = common.select_layers(c.layers, bert_config, _LABEL)
  b, u = c.block_size, num_units(n, c.block_size)
  if c.method == "dam_s":
    index = toeplitz_index(n, c.asymmetric, b)
    shape = (2 * u - 1 if c.asymmetric else u,)
  else:
    index = unstructured_index(n, c.symmetric, b)
    shape = (u, u)
  eligible = np.ones((n, n), np.float32)
  if not c.keep_diagonal:
    np.fill_diagonal(eligible, 0.0)
  weights = logit_weights(index, int(np.prod(shape)), eligible)
  pairs_NxN = common.data_pair_weights(c.density_over, lengths, n, _LABEL)
  pairs_NxN = np.ones((n, n)) if pairs_NxN is None else pairs_NxN
  pair_w = logit_weights(index, int(np.prod(shape)), eligible * pairs_NxN)
  heads = {i: bert_config.layer_heads(i) if c.per_head else 1 for i in layers}
  if c.share == "all_layers":
    if len(set(heads.values())) > 1:
      common.fail(_LABEL, f"a mask shared by all layers needs equal head counts, got "
                          f"{heads}; use structure.share='per_layer' or per_head=False.")
    groups = [("shared", tuple(layers))]
  else:
    groups = [(f"layer_{i}", (i,)) for i in layers]
  return [_Instance(name, ls, heads[ls[0]], (heads[ls[0]],) + shape, index, eligible,
                    weights, pair_w, float(heads[ls[0]] * pairs_NxN.sum()))
          for name, ls in groups]


def _make(structure_config, bert_config, seq_len: int, method: str,
          lengths: Any = None) -> learn.Structure:
  c = validate_config(structure_config, bert_config, seq_len)
  if c.method != method:
    common.fail(_LABEL, f"structure.method {c.method!r} was built by the {method!r} "
                        "factory; call the factory of that method (or learn.build).")
  n, nl = int(seq_len), bert_config.num_hidden_layers
  insts = _instances(c, bert_config, n, lengths)
  hard = c.relaxation == "hard"
  lagrangian = c.target_density is not None and c.target_mode == "lagrangian"

  def init(rng: Array) -> dict[str, Any]:
    keys = jax.random.split(rng, len(insts))
    params = {"logits": {
        s.name: c.init_logit + c.init_std * jax.random.normal(k, s.logits_shape)
        for s, k in zip(insts, keys)}}
    if lagrangian:  # (mu1, mu2) per instance.
      params["lagrange"] = jnp.zeros((len(insts), 2), jnp.float32)
    return params

  def sample(params, rng: Array, step: Array, train: bool) -> learn.Sample:
    tau = temperature_at(step, c.temperature, c.temperature_final, c.anneal_steps,
                         c.anneal)
    noisy = train or c.stochastic_eval
    masks: list[Any] = [None] * nl
    l1, mass, expected = [], [], []
    for s, inst in enumerate(insts):
      a_HxP = params["logits"][inst.name].reshape(inst.heads, -1).astype(jnp.float32)
      if noisy:
        m_HxP = gumbel_sigmoid(a_HxP, jax.random.fold_in(rng, s), tau, hard)
      else:
        m_HxP = binarize(a_HxP, c.eval_rule, c.target_density, inst.pair_weights,
                         inst.pair_total).astype(jnp.float32)
      mask_HxNxN = expand(m_HxP, inst.index)
      if not c.keep_diagonal:
        mask_HxNxN = mask_HxNxN * inst.eligible
      for layer in inst.layers:
        masks[layer] = mask_HxNxN
      # sum |M| over the expanded mask, computed per logit (w_p entries share m_p). Like
      # torch's |x| (gradient 0 at 0), an exactly dropped entry gets no penalty gradient.
      abs_HxP = jnp.where(m_HxP != 0, jnp.abs(m_HxP), 0.0)
      l1.append(jnp.sum(abs_HxP * inst.weights))
      mass.append(jnp.sum(abs_HxP * inst.pair_weights))
      expected.append(expected_density(a_HxP, inst.pair_weights, inst.pair_total))
    total = sum(i.pair_total for i in insts)
    metrics = {"dam/density": sum(mass) / total,
               "dam/expected_density": sum(e * i.pair_total for e, i in zip(expected, insts))
                                       / total,
               "dam/temperature": tau}
    if c.target_density is None:
      penalty = c.lam * (sum(l1) if c.penalty == "l1_sum" else sum(mass) / total)
    else:
      target = target_at(step, c.target_density, _sigmoid(c.init_logit),
                         c.target_warmup_steps)
      metrics["dam/target_density"] = target
      gap_S = jnp.stack(expected) - target
      if c.target_mode == "abs":
        penalty = c.lam * jnp.mean(jnp.abs(gap_S))
      else:
        mu_Sx2 = params["lagrange"].astype(jnp.float32)
        f_Sx2 = jnp.stack([gap_S, gap_S ** 2], axis=-1)
        sg = jax.lax.stop_gradient
        # Value mu * f; d/dlogits = mu * df; d/dmu = -f (ascent under descent).
        penalty = jnp.sum(sg(mu_Sx2) * f_Sx2 + (sg(mu_Sx2) - mu_Sx2) * sg(f_Sx2))
        metrics["dam/lagrange_mu"] = jnp.mean(mu_Sx2[:, 0])
        metrics["dam/lagrange_mu2"] = jnp.mean(mu_Sx2[:, 1])
    return learn.Sample(masks=tuple(masks), gates=None,
                        penalty=jnp.asarray(penalty, jnp.float32), metrics=metrics)

  def freeze(params) -> learn.Frozen:
    masks: list[Any] = [None] * nl
    dens_layer: list[float | None] = [None] * nl
    dens_head: list[list[float] | None] = [None] * nl
    block_dens: list[float | None] = [None] * nl
    for inst in insts:
      a_HxP = np.asarray(params["logits"][inst.name], np.float32).reshape(inst.heads, -1)
      keep_HxP = np.asarray(binarize(a_HxP, c.eval_rule, c.target_density,
                                     inst.pair_weights, inst.pair_total))
      mask_HxNxN = keep_HxP[:, inst.index] & (inst.eligible > 0)
      for layer in inst.layers:
        masks[layer] = mask_HxNxN
        dens_layer[layer] = float(mask_HxNxN.mean())
        dens_head[layer] = [float(x) for x in mask_HxNxN.mean(axis=(1, 2))]
        if c.block_size:
          block_dens[layer] = stats.block_density(mask_HxNxN, c.block_size)
    metadata = {
        "method": c.method, "seq_len": n, "block_size": int(c.block_size),
        "share": c.share, "per_head": bool(c.per_head),
        "layers": sorted(l for i in insts for l in i.layers),
        "symmetric": bool(c.symmetric), "asymmetric": bool(c.asymmetric),
        "keep_diagonal": bool(c.keep_diagonal), "relaxation": c.relaxation,
        "temperature": float(c.temperature),
        "temperature_final": float(c.temperature_final),
        "anneal_steps": int(c.anneal_steps), "penalty": c.penalty, "lam": float(c.lam),
        "target_density": None if c.target_density is None else float(c.target_density),
        "target_mode": c.target_mode, "target_warmup_steps": int(c.target_warmup_steps),
        "eval_rule": c.eval_rule, "density_over": c.density_over,
        "threshold": "sigmoid(logit) > 0.5" if c.eval_rule == "threshold" else
                     f"top logits to density {c.target_density} over the "
                     + ("data's valid pairs" if c.density_over == "data" else "matrix"),
        "element_density": float(np.mean([m.mean() for m in masks if m is not None])),
        "element_density_per_layer": dens_layer,
        "element_density_per_head": dens_head,
    }
    if c.block_size:
      metadata["block_density_per_layer"] = block_dens
    return learn.Frozen(masks=tuple(masks), gates=None, metadata=metadata)

  return learn.Structure(name=method, init=init, sample=sample, freeze=freeze)


@learn.register("dam_u", default_config=functools.partial(default_config, "dam_u"))
def dam_u(structure_config, bert_config, seq_len: int, lengths: Any = None) -> learn.Structure:
  """DAM_u: a logit per attention position (or b x b block). See `default_config`.

  `lengths`: [E] training example lengths (needed for density_over="data")."""
  return _make(structure_config, bert_config, seq_len, "dam_u", lengths)


@learn.register("dam_s", default_config=functools.partial(default_config, "dam_s"))
def dam_s(structure_config, bert_config, seq_len: int, lengths: Any = None) -> learn.Structure:
  """DAM_s: a logit per diagonal offset (Toeplitz mask). See `default_config`.

  `lengths`: [E] training example lengths (needed for density_over="data")."""
  return _make(structure_config, bert_config, seq_len, "dam_s", lengths)

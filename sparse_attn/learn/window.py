"""Learned neighbour degrees (Breaking BERT, Brahma et al.): a band half-width per layer/head.

The papers' exact algorithms could not be recovered; this is a documented reconstruction
(see docs/architecture.md). Breaking BERT states that it "learns the degree of connectivity in
the neighbour connections while optimizing for sparsity"; how is not public. Here each
learned layer (optionally each head) owns a neighbour half-width w: query i attends to key j
iff |i - j| <= w, OR-ed with BigBird-style global tokens and random keys that stay fixed.
Two relaxations make w learnable jointly with the model:

  * "gumbel_softmax": categorical logits over candidate half-widths D (default 0..max_width);
    each step draws a straight-through hard Gumbel-softmax one-hot z, so the forward mask is
    exactly the band of the drawn width while the logits receive the relaxed gradient. The
    penalty is beta * E_p[density], p = softmax(logits), in closed form.
  * "soft_window": a real width w and the soft band sigmoid((w - |i-j|) / T) (adaptive-span
    style); the penalty is beta * density of the soft mask.

Penalty normalisation: beta times the MEAN over learned layers (and heads) of the expected
density, so beta does not scale with depth. The density is over the n x n matrix at the
run's maximum length n (density_over="matrix"), or over the training data's valid pairs,
each example weighing the same (density_over="data", `masks.stats.pair_weights`), which is
the density evaluation reports. Sweeping beta traces
the accuracy/sparsity trade-off; `bigbird_matched` builds the fixed BigBird baseline at a
matched density. `freeze` takes the argmax width (gumbel_softmax) or floor(w), the width at
which the soft band crosses 0.5 (soft_window), clipped to [0, max_width].

Window larger than the sequence: max_width (and every candidate) must be <= n - 1, where
band(n - 1) is already dense; a larger value is a configuration error (no silent clipping).

Mask semantics: True / 1 = may attend. Shape legend: N sequence length (queries = keys),
H heads (1 when the width is shared by the heads of a layer), C candidate widths, L layers.
The BigBird baseline lives in `learn.window_baseline`; temperature schedules, layer choice
and config checks are `learn.common`'s (re-exported here under their old names).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_attn.learn import base as learn
from sparse_attn.learn import common
from sparse_attn.learn import window_baseline
from sparse_attn.masks import patterns

Array = jax.Array
_LABEL = "learned_window"

RELAXATIONS = ("gumbel_softmax", "soft_window")
INITS = ("widest", "uniform", "narrowest")

# Old names of the shared parts and of the BigBird baseline (same functions).
temperature_at = common.temperature_at
gumbel_softmax_st = common.gumbel_softmax_st
BigBirdMatch = window_baseline.BigBirdMatch
bigbird_matched = window_baseline.bigbird_matched
_bigbird_counts = window_baseline.bigbird_counts


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the "learned_window" method (a reconstruction; see the module docstring).

  Returns:
    ConfigDict with fields:
      relaxation: "gumbel_softmax" (categorical over candidate widths, straight-through hard
        Gumbel-softmax) or "soft_window" (learnable real width, sigmoid band).
      per_head: one width per head (True) or one per layer, shared by its heads (False).
      layers: indices of the layers that learn a window; None = every layer with attention.
        Other layers stay dense (mask None).
      max_width: largest half-width; None = n - 1 (the dense band). Must be <= n - 1.
      candidates: explicit list of candidate half-widths (gumbel_softmax); None = 0..max_width.
      temperature: Gumbel-softmax temperature tau, or the soft band's T (in positions).
      temperature_final: None = constant; else tau decays geometrically from `temperature` to
        `temperature_final` over `anneal_steps` steps and then stays there.
      anneal_steps: length of the annealing schedule.
      beta: weight of the expected-density penalty (>= 0).
      global_tokens: g, the first g positions are global (BigBird); 1 makes [CLS] global.
      random_keys: r random keys per query row, drawn once from `random_seed` and shared by
        every learned layer and head.
      random_seed: seed of the random keys.
      include_self: the diagonal is always kept (True) or never kept by the band (False).
      init: "widest" (start near dense), "uniform" or "narrowest".
      init_prob: gumbel_softmax: probability the init puts on the favoured width (the rest is
        spread uniformly); ignored by "uniform" and by soft_window.
      density_over: "matrix" (the n x n matrix) or "data" (the training data's valid pairs;
        needs the example lengths, which the trainer passes).
      target_density: None (penalty beta * density), or a density in (0, 1]: the penalty
        becomes beta * mean over learned layers (and heads) of |E[density] - target|, so a
        run asks for a sparsity instead of searching beta for it.
      block_size: 0, or b: the frozen band is rounded up to whole b x b tiles
        (`patterns.block_band`), so block-sparse kernels skip the rest.
  """
  return ml_collections.ConfigDict(dict(
      relaxation="gumbel_softmax", per_head=False, layers=None, max_width=None,
      candidates=None, temperature=1.0, temperature_final=None, anneal_steps=0, beta=0.1,
      global_tokens=0, random_keys=0, random_seed=0, include_self=True, init="widest",
      init_prob=0.9, density_over="matrix", target_density=None, block_size=0))


# ---------------------------------------------------------------------------------------------
# Pure functions: bands, densities, relaxed masks.


def offsets(n: int) -> np.ndarray:
  """Returns d_NxN = |i - j| (int32)."""
  pos = np.arange(n)
  return np.abs(pos[:, None] - pos[None, :]).astype(np.int32)


def offset_counts(n: int) -> np.ndarray:
  """Number of (i, j) pairs at each offset k = |i - j|: c_0 = n, c_k = 2 (n - k). Shape [N]."""
  k = np.arange(n)
  return np.where(k == 0, n, 2 * (n - k)).astype(np.int64)


def band_masks(widths: Any, n: int, include_self: bool = True) -> np.ndarray:
  """Band masks from integer half-widths: M[..., i, j] = |i - j| <= w (diagonal per flag).

  Args:
    widths: int or int array of any shape [...], each in [0, n - 1].
    n: sequence length N.
    include_self: keep the diagonal (True) or clear it (False).

  Returns:
    bool mask_...xNxN.
  """
  w = np.asarray(widths)
  if not np.issubdtype(w.dtype, np.integer) or np.any(w < 0) or np.any(w > n - 1):
    raise ValueError(f"Band widths must be integers in [0, {n - 1}] at n={n}; got {w}.")
  d_NxN = offsets(n)
  mask = d_NxN <= w[..., None, None]
  return mask if include_self else mask & (d_NxN > 0)


def band_density(width: int, n: int, include_self: bool = True) -> float:
  """Closed-form density of band(width) at n: (n + 2 sum_{d=1..w} (n - d)) / n^2.

  The sum is w n - w (w + 1) / 2; without the diagonal the leading n is dropped.
  """
  w = int(width)
  if not 0 <= w <= n - 1:
    raise ValueError(f"Band width must lie in [0, {n - 1}] at n={n}; got {width}.")
  return ((n if include_self else 0) + 2 * (w * n - w * (w + 1) // 2)) / n**2


def fixed_links(n: int, global_tokens: int = 0, random_keys: int = 0,
                seed: int = 0) -> np.ndarray:
  """The links the method never learns: global tokens OR r random keys per row.

  Returns:
    bool mask_NxN (all False when g = r = 0).
  """
  fixed_NxN = np.zeros((n, n), bool)
  if global_tokens:
    fixed_NxN |= patterns.global_tokens(n, global_tokens)
  if random_keys:
    fixed_NxN |= patterns.random(n, random_keys, seed)
  return fixed_NxN


def free_offset_counts(fixed_NxN: np.ndarray, pairs_NxN: np.ndarray | None = None) -> np.ndarray:
  """Pairs at each offset k that the fixed links do NOT already cover. Shape [N].

  With `pairs_NxN` (weights per position), their summed weight instead of their count."""
  n = fixed_NxN.shape[-1]
  w = None if pairs_NxN is None else np.asarray(pairs_NxN, np.float64)[~fixed_NxN]
  counts = np.bincount(offsets(n)[~fixed_NxN], weights=w, minlength=n)
  return counts.astype(np.int64) if pairs_NxN is None else counts


def tail_keep(z_xC: Any, candidates: Sequence[int], n: int) -> Array:
  """Per-offset keep value of a distribution over widths: t[..., k] = sum_{c: D_c >= k} z_c.

  For a one-hot z this is the 0/1 band profile of the chosen width; for probabilities it is
  P(width >= k), the expected keep of offset k.

  Args:
    z_xC: [..., C] one-hot samples or probabilities over `candidates`.
    candidates: the C candidate half-widths.
    n: sequence length N.

  Returns:
    t_xN, float.
  """
  covers_CxN = (np.asarray(candidates)[:, None] >= np.arange(n)[None, :]).astype(np.float32)
  return jnp.asarray(z_xC, jnp.float32) @ covers_CxN


def soft_keep(w_x: Any, n: int, temperature: Any) -> Array:
  """Soft band profile t[..., k] = sigmoid((w - k) / T). Returns t_xN (w_x has shape [...])."""
  k_N = jnp.arange(n, dtype=jnp.float32)
  return jax.nn.sigmoid((jnp.asarray(w_x, jnp.float32)[..., None] - k_N) / temperature)


def _set_diagonal(t_xN: Array, include_self: bool) -> Array:
  return t_xN.at[..., 0].set(1.0 if include_self else 0.0)


def masks_from_keep(t_xN: Array, fixed_NxN: np.ndarray) -> Array:
  """Expands a per-offset profile to a mask and ORs the fixed links (which are exactly 1).

  Args:
    t_xN: [..., N] keep value per offset |i - j|.
    fixed_NxN: bool fixed links.

  Returns:
    float mask_...xNxN, M[..., i, j] = 1 if fixed[i, j] else t[..., |i - j|].
  """
  n = fixed_NxN.shape[-1]
  m = jnp.take(t_xN, jnp.asarray(offsets(n)), axis=-1)
  return jnp.where(jnp.asarray(fixed_NxN), 1.0, m)


def density_from_keep(t_xN: Any, fixed_NxN: np.ndarray,
                      pairs_NxN: np.ndarray | None = None) -> Array:
  """Density of masks_from_keep(t, fixed), in closed form: (sum_k free_k t_k + |F|) / n^2.

  Linear in t, so with t = P(width >= k) it is the expected density E_p[density]. With
  `pairs_NxN` (weights summing to 1, e.g. `masks.stats.pair_weights`), the weighted
  density sum_k free_k(W) t_k + W[F] instead.

  Returns:
    float array of shape [...].
  """
  n = fixed_NxN.shape[-1]
  if pairs_NxN is None:
    pairs_NxN = np.full((n, n), 1.0 / n**2)
  free_N = jnp.asarray(free_offset_counts(fixed_NxN, pairs_NxN), jnp.float32)
  return jnp.asarray(t_xN, jnp.float32) @ free_N + float(np.sum(pairs_NxN[fixed_NxN]))


def expected_density(probs_xC: Any, candidates: Sequence[int], n: int,
                     include_self: bool = True,
                     fixed_NxN: np.ndarray | None = None) -> Array:
  """E_p[density(band(D) OR fixed)] at n for a categorical p over candidate widths D.

  Args:
    probs_xC: [..., C] probabilities.
    candidates: the C half-widths.
    n: sequence length N.
    include_self: whether the band keeps the diagonal.
    fixed_NxN: fixed links (None = none).

  Returns:
    float array of shape [...].
  """
  fixed_NxN = np.zeros((n, n), bool) if fixed_NxN is None else fixed_NxN
  return density_from_keep(_set_diagonal(tail_keep(probs_xC, candidates, n), include_self),
                           fixed_NxN)


# ---------------------------------------------------------------------------------------------
# The Structure factory.


def _fields(n: int) -> dict[str, common.Field]:
  return {
      "relaxation": common.choice(*RELAXATIONS),
      "per_head": common.flag(),
      "max_width": common.integer(0, none_ok=True),
      "temperature": common.POSITIVE,
      "temperature_final": common.number(0.0, low_open=True, none_ok=True),
      "anneal_steps": common.integer(0),
      "beta": common.number(0.0),
      "global_tokens": common.integer(0, n),
      "random_keys": common.integer(0, n),
      "random_seed": common.integer(0),
      "include_self": common.flag(),
      "init": common.choice(*INITS),
      "init_prob": common.number(0.0, 1.0, low_open=True, high_open=True),
      "density_over": common.DENSITY_OVER,
      "target_density": common.TARGET_DENSITY,
      "block_size": common.integer(0, n),
  }


def _rules(bert_config: Any, n: int) -> list[common.Rule]:
  """learned_window's cross-field checks (after `_fields`), in order."""

  def sequence(c):
    if n < 2:
      return f"learned_window needs seq_len >= 2; got {n}."

  def widths(c):
    max_width = n - 1 if c["max_width"] is None else int(c["max_width"])
    if max_width > n - 1:
      return (f"structure.max_width={max_width} is a window larger than the sequence "
              f"(seq_len={n}); band(n - 1 = {n - 1}) is already dense. Set max_width <= "
              f"{n - 1} or None.")
    cands = (tuple(range(max_width + 1)) if c["candidates"] is None
             else tuple(c["candidates"]))
    if (not cands or not all(common.integer(0).accepts(d) for d in cands) or
        list(cands) != sorted(set(cands))):
      return (f"structure.candidates must be strictly increasing non-negative integers; "
              f"got {c['candidates']}.")
    if cands[-1] > max_width:
      return (f"Candidate width {cands[-1]} exceeds max_width={max_width} (a window larger "
              f"than the sequence when > {n - 1}); drop it from structure.candidates or "
              f"raise structure.max_width (<= {n - 1}).")
    c["candidates"] = tuple(int(d) for d in cands)
    c["max_width"] = max_width

  def layers(c):
    c["layers"] = tuple(sorted(common.select_layers(c["layers"], bert_config, _LABEL)))

  return [sequence, common.anneal_rule, widths, layers]


def resolve_config(structure_config: Any, bert_config: Any, seq_len: int) -> dict[str, Any]:
  """Merges a config section over `default_config()` and validates it.

  Returns:
    A plain dict of the method's fields, plus "candidates" (tuple of widths) and
    "layers" (tuple of learned layer indices, sorted) resolved.
  """
  n = int(seq_len)
  return common.check_section(structure_config, default_config().to_dict(), _fields(n),
                              label=_LABEL, rules=_rules(bert_config, n))


def _init_params(c: dict[str, Any], heads: dict[int, int]) -> dict[str, Array]:
  cands = np.asarray(c["candidates"])
  if c["relaxation"] == "gumbel_softmax":
    num = len(cands)
    fav = {"widest": num - 1, "narrowest": 0, "uniform": None}[c["init"]]
    probs = np.full(num, 1.0 / num)
    if fav is not None and num > 1:
      probs = np.full(num, (1.0 - c["init_prob"]) / (num - 1))
      probs[fav] = c["init_prob"]
    row = np.log(probs).astype(np.float32)
  else:
    row = np.float32({"widest": cands[-1], "narrowest": cands[0],
                      "uniform": 0.5 * (cands[0] + cands[-1])}[c["init"]])
  return {f"layer_{i}": jnp.broadcast_to(jnp.asarray(row), (h,) + row.shape)
          for i, h in heads.items()}


@learn.register("learned_window", default_config=default_config)
def make_structure(structure_config: Any, bert_config: Any, seq_len: int,
                   lengths: Any = None) -> learn.Structure:
  """Builds the learned-window Structure (reconstruction of Breaking BERT's learned degrees).

  Params: {"layer_i": logits [H|1, C]} (gumbel_softmax) or {"layer_i": width [H|1]}
  (soft_window) for each learned layer. `sample` returns masks as a per-layer tuple of float
  [H|1, N, N] (None for dense layers), penalty beta * mean expected density, and metrics
  "window/expected_width", "window/expected_density", "window/density",
  "window/temperature". `freeze` returns bool masks and JSON-able metadata.
  """
  c = resolve_config(structure_config, bert_config, seq_len)
  n, cands, num_layers = int(seq_len), c["candidates"], bert_config.num_hidden_layers
  pairs_NxN = common.data_pair_weights(c["density_over"], lengths, n, _LABEL)  # None: matrix.
  heads = {i: (bert_config.layer_heads(i) if c["per_head"] else 1) for i in c["layers"]}
  fixed_NxN = fixed_links(n, c["global_tokens"], c["random_keys"], c["random_seed"])
  gumbel = c["relaxation"] == "gumbel_softmax"
  cands_C = jnp.asarray(cands, jnp.float32)

  def init(rng):
    del rng  # Deterministic init.
    return _init_params(c, heads)

  def expected(p):
    """(expected width [H], expected per-offset keep t [H, N]) of one layer's params."""
    if gumbel:
      probs = jax.nn.softmax(p, axis=-1)
      return probs @ cands_C, _set_diagonal(tail_keep(probs, cands, n), c["include_self"])
    return p, None

  def sample(params, rng, step, train):
    tau = temperature_at(step, c["temperature"], c["temperature_final"], c["anneal_steps"])
    masks, exp_dens, dens, widths = [None] * num_layers, [], [], []
    for i in c["layers"]:
      p = jnp.asarray(params[f"layer_{i}"], jnp.float32)
      if gumbel:
        if train:
          z = gumbel_softmax_st(p, jax.random.fold_in(rng, i), tau)
        else:  # Deterministic: the argmax width, as `freeze`.
          z = jax.nn.one_hot(jnp.argmax(p, axis=-1), len(cands), dtype=jnp.float32)
        t = _set_diagonal(tail_keep(z, cands, n), c["include_self"])
        ew, et = expected(p)
        exp_dens.append(density_from_keep(et, fixed_NxN, pairs_NxN))
      else:
        if train:
          t = _set_diagonal(soft_keep(p, n, tau), c["include_self"])
        else:  # Deterministic: the frozen band.
          w = jnp.clip(jnp.floor(p), 0, c["max_width"])
          t = _set_diagonal((jnp.arange(n) <= w[..., None]).astype(jnp.float32),
                            c["include_self"])
        ew = p
        exp_dens.append(density_from_keep(
            _set_diagonal(soft_keep(p, n, tau), c["include_self"]), fixed_NxN, pairs_NxN))
      masks[i] = masks_from_keep(t, fixed_NxN)
      dens.append(density_from_keep(t, fixed_NxN, pairs_NxN))
      widths.append(ew)
    mean = lambda xs: jnp.mean(jnp.concatenate([jnp.ravel(x) for x in xs]))
    expected_density_ = mean(exp_dens)
    if c["target_density"] is None:
      penalty = c["beta"] * expected_density_
    else:
      penalty = c["beta"] * mean([jnp.abs(d - c["target_density"]) for d in exp_dens])
    metrics = {"window/expected_width": mean(widths),
               "window/expected_density": expected_density_,
               "window/density": mean(dens),
               "window/temperature": tau}
    return learn.Sample(masks=tuple(masks), gates=None,
                        penalty=penalty, metrics=metrics)

  def freeze(params):
    masks, widths, densities, pair_densities = [None] * num_layers, {}, {}, {}
    for i in c["layers"]:
      p = np.asarray(params[f"layer_{i}"], np.float32)
      if gumbel:
        w_H = np.asarray(cands)[np.argmax(p, axis=-1)]
      else:
        w_H = np.clip(np.floor(p), 0, c["max_width"]).astype(np.int64)
      m = (patterns.block_band(n, c["block_size"], w_H.astype(np.int64)) if c["block_size"]
           else band_masks(w_H.astype(np.int64), n, c["include_self"])) | fixed_NxN
      masks[i] = m
      per = [float(x) for x in m.mean(axis=(-2, -1))]
      widths[f"layer_{i}"] = ([int(x) for x in w_H] if c["per_head"] else int(w_H[0]))
      densities[f"layer_{i}"] = per if c["per_head"] else per[0]
      if pairs_NxN is not None:  # The density evaluation reports (valid pairs).
        pv = [float(x) for x in (m * pairs_NxN).sum(axis=(-2, -1))]
        pair_densities[f"layer_{i}"] = pv if c["per_head"] else pv[0]
    layer_density = [1.0 if masks[i] is None else float(masks[i].mean())
                     for i in range(num_layers)]
    metadata = {
        "method": "learned_window",
        "reconstruction": "Breaking BERT learned neighbour degrees (documented "
                          "reconstruction; the paper's exact algorithm is not public)",
        "relaxation": c["relaxation"], "seq_len": n, "per_head": bool(c["per_head"]),
        "layers": list(c["layers"]), "widths": widths, "densities": densities,
        "density": float(np.mean(layer_density)),  # densities / density: n x n matrix.
        "density_over": c["density_over"],
        "target_density": c["target_density"],
        **({"valid_pair_densities": pair_densities} if pairs_NxN is not None else {}),
        "global_tokens": int(c["global_tokens"]), "random_keys": int(c["random_keys"]),
        "random_seed": int(c["random_seed"]), "include_self": bool(c["include_self"]),
        "block_size": int(c["block_size"]),
    }
    return learn.Frozen(masks=tuple(masks), gates=None, metadata=metadata)

  return learn.Structure(name="learned_window", init=init, sample=sample, freeze=freeze)


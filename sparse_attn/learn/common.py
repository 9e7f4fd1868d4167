"""What the learned-structure methods share: relaxations, schedules, layer choice, config checks.

Relaxations (all jit-safe, float32):
  * `gumbel_sigmoid`: sigmoid((logit + g) / tau) with Logistic(0, 1) noise g, optionally
    straight-through (forward exactly 1[logit + g > 0], gradient of the soft sample).
  * `hard_concrete` (Louizos, Welling & Kingma 2018) and its keep / open probabilities.
  * `straight_through`: forward a hard {0, 1} value, backward the gradient of a soft one.
  * `gumbel_softmax_st`: a straight-through one-hot Gumbel-softmax over categories.

Schedules: `temperature_at` (constant, exponential or linear annealing) and `linear_ramp`.

Config sections: `check_section` merges a method's `structure` section over its defaults,
rejects unknown keys with close-match hints, checks every field's type and range (`Field`:
`flag`, `choice`, `integer`, `number`) and then the method's own cross-field `rules`. Every
message names the key as `structure.<key>` and says what would be accepted; all raise
`UserError` (a ValueError).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Callable, Mapping, NoReturn, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.errors import UserError
from sparse_attn.masks import stats

Array = jax.Array


# ---------------------------------------------------------------- relaxations

def uniform_logistic_noise(rng: Array, shape: Sequence[int]) -> Array:
  """Logistic(0, 1) noise as logit(u), u ~ U(1e-6, 1 - 1e-6) (finite). float32 [shape]."""
  u = jax.random.uniform(rng, shape, jnp.float32, 1e-6, 1.0 - 1e-6)
  return jnp.log(u) - jnp.log1p(-u)


def _logistic_noise(rng: Array, shape: Sequence[int]) -> Array:
  return jax.random.logistic(rng, shape, jnp.float32)


NOISES: dict[str, Callable[[Array, Sequence[int]], Array]] = {
    "logistic": _logistic_noise,         # jax.random.logistic (DAM).
    "uniform": uniform_logistic_noise,   # logit of a clipped uniform (gates, hard concrete).
}


def straight_through(z: Array, hard: Array | None = None) -> Array:
  """Forward exactly `hard` (default: z > 1/2) as {0, 1} in z's dtype; gradient of z.

  Args:
    z: the relaxed value, any shape.
    hard: bool of z's shape, the forward decision (None: z > 1/2).

  Returns:
    Array of z's shape and dtype, exactly {0, 1} in the forward pass.
  """
  hard = z > 0.5 if hard is None else hard
  # hard + (z - sg(z)) is exactly `hard` forward (x - x == 0).
  return hard.astype(z.dtype) + (z - jax.lax.stop_gradient(z))


def gumbel_sigmoid(logits: Array, rng: Array, temperature: Array | float = 1.0,
                   hard: bool = False, noise: str = "logistic") -> Array:
  """A Gumbel-sigmoid (binary Concrete) sample per logit.

  soft = sigmoid((alpha + g) / tau), g ~ Logistic(0, 1). Hard: forward exactly
  1[alpha + g > 0] in {0, 1}, backward the gradient of `soft` (straight-through). For any
  tau, P(hard = 1) = P(soft > 1/2) = sigmoid(alpha).

  Args:
    logits: alpha, any shape.
    rng: PRNG key.
    temperature: tau > 0 (may be traced).
    hard: straight-through binary sample, else the soft sample.
    noise: how g is drawn, a key of `NOISES`: "logistic" (`jax.random.logistic`) or
      "uniform" (`uniform_logistic_noise`); the same key gives other draws under each.

  Returns:
    Float32 array of the logits' shape, in [0, 1].
  """
  logits = jnp.asarray(logits, jnp.float32)
  z = logits + NOISES[noise](rng, logits.shape)
  soft = jax.nn.sigmoid(z / temperature)
  if not hard:
    return soft
  return straight_through(soft, z > 0)


def hard_concrete(theta: Array, rng: Array, temperature: float = 2.0 / 3.0,
                  limits: tuple[float, float] = (-0.1, 1.1)) -> Array:
  """A hard-concrete sample z in [0, 1] (exact 0 and 1 have positive probability).

  s = sigmoid((logit u + theta) / tau), z = clip(s (zeta - gamma) + gamma, 0, 1).

  Args:
    theta: log alpha, any shape.
    rng: PRNG key.
    temperature: tau.
    limits: stretch interval (gamma, zeta), gamma < 0, zeta > 1.

  Returns:
    z with theta's shape, differentiable in theta where 0 < z < 1.
  """
  gamma, zeta = limits
  s = jax.nn.sigmoid((uniform_logistic_noise(rng, jnp.shape(theta)) + theta) / temperature)
  return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_keep_prob(theta: Array, temperature: float = 2.0 / 3.0,
                            limits: tuple[float, float] = (-0.1, 1.1)) -> Array:
  """P(z != 0) = sigmoid(theta - tau log(-gamma / zeta)): the L0 expected-keep probability.

  Returns:
    Array of theta's shape."""
  gamma, zeta = limits
  return jax.nn.sigmoid(theta - temperature * math.log(-gamma / zeta))


def hard_concrete_open_prob(theta: Array, temperature: float = 2.0 / 3.0,
                            limits: tuple[float, float] = (-0.1, 1.1)) -> Array:
  """P(z > 1/2) = sigmoid(theta - tau logit((1/2 - gamma) / (zeta - gamma))): how often the
  straight-through gate is open (sigmoid(theta) for symmetric limits). theta's shape."""
  gamma, zeta = limits
  t = (0.5 - gamma) / (zeta - gamma)
  return jax.nn.sigmoid(theta - temperature * math.log(t / (1.0 - t)))


def gumbel_softmax_st(logits_xC: Array, rng: Array, temperature: Any) -> Array:
  """Straight-through hard Gumbel-softmax: forward exactly one-hot, gradient of the soft draw.

  Args:
    logits_xC: [..., C] logits over C categories; rng: PRNG key; temperature: tau > 0.

  Returns:
    z_xC: one-hot in the forward pass; d z / d logits is that of softmax((logits + g) / tau).
  """
  g = jax.random.gumbel(rng, logits_xC.shape, jnp.float32)
  soft = jax.nn.softmax((logits_xC + g) / temperature, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits_xC.shape[-1], dtype=jnp.bool_)
  # hard + (soft - sg(soft)) is exactly `hard` forward, whereas (hard - soft) + soft can
  # round away from {0, 1}.
  return straight_through(soft, hard)


# ---------------------------------------------------------------- schedules

def temperature_at(step: Array | int, temperature: float,
                   temperature_final: float | None = None, anneal_steps: int = 0,
                   anneal: str = "exponential") -> Array:
  """Temperature at `step` (jit-safe): constant, or annealed over `anneal_steps`.

  exponential: tau0 * (tau1 / tau0) ** r; linear: tau0 + (tau1 - tau0) * r, with
  r = clip(step / anneal_steps, 0, 1); tau1 is kept after `anneal_steps`. Constant tau0
  when tau1 is None or equal to tau0, or anneal_steps <= 0.

  Returns:
    float32 scalar.
  """
  t0 = float(temperature)
  t1 = t0 if temperature_final is None else float(temperature_final)
  if anneal_steps <= 0 or t0 == t1:
    return jnp.asarray(t0, jnp.float32)
  r = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  if anneal == "exponential":
    return t0 * (t1 / t0) ** r
  if anneal == "linear":
    return t0 + (t1 - t0) * r
  raise ValueError(f"anneal must be 'exponential' or 'linear'; got {anneal!r}.")


def linear_ramp(step: Array | int, start: float, end: float, steps: int) -> Array:
  """start + (end - start) * clip(step / steps, 0, 1) (jit-safe); `end` when steps <= 0.

  Returns:
    float32 scalar.
  """
  if steps <= 0:
    return jnp.asarray(end, jnp.float32)
  r = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
  return start + (end - start) * r


# ---------------------------------------------------------------- layers and data

def fail(label: str, message: str) -> NoReturn:
  """Raises the UserError "<label> config: <message>" (label: the method, e.g. "prune")."""
  raise UserError(f"{label} config: {message}")


def attention_layers(bert_config: Any) -> tuple[int, ...]:
  """Indices of the layers that have an attention sublayer (heads_per_layer > 0)."""
  return tuple(i for i in range(bert_config.num_hidden_layers)
               if bert_config.layer_heads(i) > 0)


def select_layers(layers: Sequence[int] | None, bert_config: Any,
                  label: str) -> tuple[int, ...] | None:
  """The layers a method learns, checked against the model (`structure.layers`).

  Args:
    layers: None (every layer with attention) or a non-empty list of distinct indices.
    bert_config: the model's BertConfig, or None to check only the list itself.
    label: the method's name in messages.

  Returns:
    The indices in the given order (None for None without a bert_config).
  """
  if layers is None:
    if bert_config is None:
      return None
    chosen = attention_layers(bert_config)
    if not chosen:
      fail(label, "the model has no layer with an attention sublayer (heads_per_layer is "
                  "all 0), so there is nothing to learn; use structure.method='none'.")
    return chosen
  layers = list(layers)
  if (not layers or len(set(layers)) != len(layers) or
      not all(_is_integer(i) for i in layers)):
    fail(label, f"structure.layers must be None or a non-empty list of distinct layer "
                f"indices, got {layers}.")
  layers = [int(i) for i in layers]
  if bert_config is not None:
    nl = bert_config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < nl]
    if bad:
      fail(label, f"structure.layers {bad} are outside [0, {nl}) (the model has {nl} "
                  "layers).")
    empty = [i for i in layers if bert_config.layer_heads(i) == 0]
    if empty:
      fail(label, f"structure.layers {empty} have no attention sublayer "
                  "(heads_per_layer = 0); remove them from structure.layers.")
  return tuple(layers)


def data_pair_weights(density_over: str, lengths: Any, n: int,
                      label: str) -> np.ndarray | None:
  """Weights of the (query, key) positions that densities are measured over.

  Args:
    density_over: "matrix" (the n x n matrix) or "data" (the data's valid pairs).
    lengths: [E] token counts of the training examples, or None.
    n: the run's maximum sequence length.
    label: the method's name in messages.

  Returns:
    None for "matrix", else `masks.stats.pair_weights(lengths, n)`, [n, n] summing to 1.
  """
  if density_over != "data":
    return None
  if lengths is None:
    fail(label, "structure.density_over='data' needs the training data's example "
                "lengths: build with learn.build(..., lengths=dataset.lengths) (the trainer "
                "does), or use density_over='matrix'.")
  return stats.pair_weights(lengths, n)


# ---------------------------------------------------------------- config sections

@dataclasses.dataclass(frozen=True)
class Field:
  """The type and range `check_section` accepts for one field (build with the helpers).

  kind: "bool", "choice", "int" or "number"; choices: for "choice"; low / high: bounds
  (None = unbounded), excluded when low_open / high_open; none_ok: None is accepted too;
  finite: numbers must be finite.
  """
  kind: str
  choices: tuple = ()
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  none_ok: bool = False
  finite: bool = False

  def describe(self) -> str:
    """What is accepted, e.g. "None or in (0, 1]" or "an integer >= 0"."""
    if self.kind == "bool":
      text = "True or False"
    elif self.kind == "choice":
      text = f"one of {list(self.choices)}"
    else:
      lo, hi = self.low, self.high
      if lo is not None and hi is not None:
        bounds = (f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}"
                  f"{')' if self.high_open else ']'}")
      elif lo is not None:
        bounds = f"{'>' if self.low_open else '>='} {lo:g}"
      elif hi is not None:
        bounds = f"{'<' if self.high_open else '<='} {hi:g}"
      else:
        bounds = ""
      if self.kind == "int":
        text = f"an integer {bounds}".rstrip()
      elif self.finite:
        text = f"a finite number {bounds}".rstrip()
      else:
        text = bounds or "a number"
    return f"None or {text}" if self.none_ok else text

  def accepts(self, value: Any) -> bool:
    """Whether `value` has this field's type and lies in its range."""
    if value is None:
      return self.none_ok
    if self.kind == "bool":
      return isinstance(value, (bool, np.bool_))
    if self.kind == "choice":
      return value in self.choices
    if self.kind == "int" and not _is_integer(value):
      return False
    if not _is_number(value) or (self.finite and not math.isfinite(value)):
      return False
    if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)


def flag(none_ok: bool = False) -> Field:
  """A bool field (True / False; also None with none_ok)."""
  return Field("bool", none_ok=none_ok)


def choice(*options: Any) -> Field:
  """A field that takes one of `options`."""
  return Field("choice", choices=tuple(options))


def integer(low: int | None = 0, high: int | None = None, none_ok: bool = False) -> Field:
  """An integer field in [low, high] (an integral float such as 3.0 is accepted)."""
  return Field("int", low=low, high=high, none_ok=none_ok)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, none_ok: bool = False, finite: bool = False) -> Field:
  """A real-valued field with optional (open or closed) bounds."""
  return Field("number", low=low, high=high, low_open=low_open, high_open=high_open,
               none_ok=none_ok, finite=finite)


# Fields several methods have.
POSITIVE = number(0.0, low_open=True)                                   # e.g. temperature.
TARGET_DENSITY = number(0.0, 1.0, low_open=True, none_ok=True)
DENSITY_OVER = choice("matrix", "data")


def anneal_rule(c: dict[str, Any]) -> str | None:
  """temperature_final (None = constant) differing from temperature needs anneal_steps."""
  t1 = c["temperature_final"]
  if t1 is not None and t1 != c["temperature"] and not c["anneal_steps"] > 0:
    return ("structure.temperature_final differs from structure.temperature but "
            "structure.anneal_steps is 0; set anneal_steps > 0 or temperature_final = "
            "temperature (or None).")
  return None


Rule = Callable[[dict], "str | None"]


def check_section(section: Any, defaults: Mapping[str, Any], fields: Mapping[str, Field],
                  *, label: str, rules: Sequence[Rule] = ()) -> dict[str, Any]:
  """Merges a method's config section over its defaults and checks it.

  Args:
    section: ConfigDict / mapping with any subset of the default fields, or None. A
      "method" key is accepted and dropped when `defaults` has none.
    defaults: {key: default value} of the method (its `default_config().to_dict()`).
    fields: {key: Field}: type and range of the fields that have one, checked in order.
    label: the method's name in messages ("DAM", "learned_window", "prune").
    rules: cross-field checks, run in order on the merged dict after the field checks:
      each returns a message (the problem and the way out) or None, and may fill in
      derived entries (or raise with `fail` itself).

  Returns:
    The merged, checked plain dict.

  Raises:
    UserError: an unknown key (with close valid ones), a bad value or combination.
  """
  given = dict(section.items()) if section is not None else {}
  if "method" not in defaults:
    given.pop("method", None)
  unknown = [k for k in given if k not in defaults]
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, list(defaults), n=3)
      if close:
        hints.append(f" Did you mean {close} for structure.{key}?")
    raise UserError(f"Unknown {label} config keys {[f'structure.{k}' for k in unknown]}."
                    + "".join(hints) + f" Valid keys: {sorted(defaults)}; rename or remove "
                    "the unknown ones.")
  c = {**defaults, **given}
  for key, field in fields.items():
    value = c[key]
    if not field.accepts(value):
      if field.kind == "choice" and value is not None:
        fail(label, f"structure.{key}={value!r} is not one of {list(field.choices)}.")
      fail(label, f"structure.{key} must be {field.describe()}, got {value!r}.")
  for rule in rules:
    message = rule(c)
    if message:
      fail(label, message)
  return c


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_integer(value: Any) -> bool:
  return _is_number(value) and math.isfinite(value) and int(value) == value

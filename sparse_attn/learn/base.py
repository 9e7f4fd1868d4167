"""The learned-structure interface (Structure, Sample, Frozen) and the method registry.

A method (DAM, learned neighbour windows, attention-layer gates) owns a parameter pytree
apart from the model weights and pure functions that turn it into the model's structural
inputs. The train step only sees a `Structure`:

  params = structure.init(rng)                       # structure parameters (own optimizer group)
  s = structure.sample(params, rng, step, train)     # masks / gates for one step
  model.apply(..., masks=s.masks, gates=s.gates)
  loss += s.penalty                                  # e.g. lambda * expected mask mass
  frozen = structure.freeze(params)                  # deterministic binarised structure

`s.masks` follows the mask pytree contract (a tuple with one entry per layer, None = dense;
leaves [H, n, n] or [1, H, n, n] at the run's maximum length n; the train step slices them to
each batch's length). `s.gates` is None or a per-layer tuple of scalars / [H] arrays.
`freeze` returns the same kind of pytrees, bool masks and {0, 1} gates, with no noise:
it is what evaluation uses and what checkpoints store and export.

The registry maps each `structure.method` name to a `Method`: its default config section,
its `build` factory and optional hooks (an end-of-training `report`, a model `extract`), so
the trainer asks `get(name)` for what a method offers instead of testing its name. The
parts the methods share (relaxations, schedules, config checks) live in `learn.common`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from sparse_attn.errors import UserError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sample:
  """One step's structure: model inputs plus the penalty term and metrics to log."""
  masks: Any = None           # Mask pytree (tuple per layer) or None.
  gates: Any = None           # Gate pytree (tuple per layer) or None.
  penalty: Array | float = 0.0  # Added to the task loss.
  metrics: dict[str, Array] = dataclasses.field(default_factory=dict)


jax.tree_util.register_dataclass(
    Sample, data_fields=["masks", "gates", "penalty", "metrics"], meta_fields=[])


@dataclasses.dataclass
class Frozen:
  """The one frozen-structure type: deterministic structure for evaluation and export.

  Attributes (keyword or positional, in this order):
    masks: tuple per layer of bool [H|1, n, n] arrays (None = dense layer), or None.
    gates: tuple per layer of {0, 1} float scalars / [H] arrays (None = not gated), or None.
    metadata: JSON-able description (method, densities, ...); callers may add entries.
  """
  masks: Any = None
  gates: Any = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def mask_arrays(self) -> dict[str, np.ndarray]:
    """{"layer_i": bool [H|1, n, n]} for the layers that have a mask ({} without masks)."""
    if self.masks is None:
      return {}
    return {f"layer_{i}": np.asarray(m) for i, m in enumerate(self.masks) if m is not None}


@dataclasses.dataclass(frozen=True)
class Structure:
  """A learned-structure method as the train step sees it (pure functions only).

  Attributes:
    name: method name (e.g. "dam_s"), recorded in mask metadata.
    init: rng -> structure params pytree.
    sample: (params, rng, step, train) -> Sample. `train=False` must be deterministic
      (no noise) unless the method's config asks for stochastic evaluation.
    freeze: params -> Frozen (host-side is fine; not jitted by the caller).
  """
  name: str
  init: Callable[[Array], Any]
  sample: Callable[[Any, Array, Array, bool], Sample]
  freeze: Callable[[Any], Frozen]


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method: its hooks, so that callers never test a method's name.

  Attributes:
    name: the `structure.method` value (e.g. "dam_s").
    default_config: () -> ConfigDict, the section with every field at its default (its
      `method` field may be missing or another name; `default_config(name)` sets it).
    build: (structure_config, bert_config, seq_len, lengths=None) -> Structure.
    report: Frozen -> markdown summary written at the end of training, or None.
    report_file: file name of that report in the run's workdir (with `report`).
    extract: (bert_config, task_params, frozen_gates) -> (smaller bert_config, task
      params): the physically smaller model that the frozen gates describe, or None.
  """
  name: str
  default_config: Callable[[], ml_collections.ConfigDict]
  build: Callable[..., Structure]
  report: Callable[[Frozen], str] | None = None
  report_file: str | None = None
  extract: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None

  def __call__(self, structure_config, bert_config, seq_len: int,
               lengths=None) -> Structure:
    """Same as `build` (a Method is also its factory)."""
    return self.build(structure_config, bert_config, seq_len, lengths=lengths)


# name -> Method. Each method module registers itself on import (`sparse_attn.learn` imports
# the built-in ones); see `get` and `build`.
METHODS: dict[str, Method] = {}


def register(method: Method | str, *, default_config=None, report=None, report_file=None,
             extract=None):
  """Registers a method.

  Either `register(Method(...))` (returns the Method), or as a decorator on a build
  factory: `@register("name", default_config=..., report=..., ...)` (returns the factory).
  """
  if isinstance(method, Method):
    if (method.report is None) != (method.report_file is None):
      raise ValueError(f"Method {method.name!r}: report and report_file go together.")
    METHODS[method.name] = method
    return method

  if default_config is None:
    raise ValueError(f"register({method!r}): pass default_config= (the method's config "
                     "section with every field at its default).")

  def wrap(factory):
    register(Method(name=method, default_config=default_config, build=factory,
                    report=report, report_file=report_file, extract=extract))
    return factory
  return wrap


def names() -> list[str]:
  """The registered method names, sorted (`sparse_attn.learn` registers the built-in ones)."""
  return sorted(METHODS)


def get(name: str) -> Method:
  """The registered Method called `name`.

  Raises:
    UserError (a ValueError): `name` is "none" (no learned structure) or unknown (the
      message lists the known names and the close ones).
  """
  if name in (None, "none"):
    raise UserError("structure.method='none' learns no structure, so it has no Method; "
                     "test for 'none' before calling learn.get.")
  known = names()
  if name not in METHODS:
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise UserError(f"Unknown structure method {name!r}.{hint} Known: "
                     f"{known + ['none']}.")
  return METHODS[name]


def build(structure_config, bert_config, seq_len: int,
          lengths=None) -> Structure | None:
  """Builds the configured method, or None when `structure_config.method` is "none".

  Args:
    structure_config: the `config.structure` ConfigDict section (field `method` names one
      of `METHODS`; the other fields are the method's own).
    bert_config: the model's BertConfig (layers, heads).
    seq_len: maximum sequence length of the run (mask size n).
    lengths: [E] token counts of the training examples, or None. Methods that measure
      density over the data's valid pairs (`density_over="data"`) need it.
  """
  method = structure_config.get("method", "none")
  if method in (None, "none"):
    return None
  return get(method).build(structure_config, bert_config, seq_len, lengths=lengths)


def default_config(method: str) -> ml_collections.ConfigDict:
  """The config section of `method` with every field at its default.

  Args:
    method: "none" or a registered method name.

  Returns:
    An ml_collections.ConfigDict whose `method` field is `method`.
  """
  if method in (None, "none"):
    return ml_collections.ConfigDict({"method": "none"})
  cfg = get(method).default_config()
  cfg.method = method
  return cfg

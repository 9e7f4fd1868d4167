"""Learned attention structure: the interface the train step uses, and the method registry.

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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

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


@dataclasses.dataclass(frozen=True)
class Frozen:
  """Deterministic structure for evaluation and export."""
  masks: Any = None           # Tuple per layer of bool arrays (or None = dense).
  gates: Any = None           # Tuple per layer of {0,1} float scalars / [H] arrays, or None.
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-able.


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


# name -> factory(structure_config, bert_config, seq_len, lengths=None) -> Structure. Each method
# module registers itself here; see `build`.
METHODS: dict[str, Callable[..., Structure]] = {}


def register(name: str):
  """Decorator registering a Structure factory under `name`."""
  def wrap(factory):
    METHODS[name] = factory
    return factory
  return wrap


def build(structure_config, bert_config, seq_len: int,
          lengths=None) -> Structure | None:
  """Builds the configured method, or None when `structure_config.method` is "none".

  Args:
    structure_config: the `config.structure` ConfigDict section (field `method` names one
      of `METHODS`; the other fields are the method's own).
    bert_config: the model's BertConfig (layers, heads).
    seq_len: maximum sequence length of the run (mask size n).
    lengths: [E] token counts of the training examples, or None. Methods that measure
      density over the data's valid pairs (DAM's `density_over="data"`) need it.
  """
  method = structure_config.get("method", "none")
  if method in (None, "none"):
    return None
  _import_methods()
  if method not in METHODS:
    raise ValueError(f"Unknown structure method {method!r}; known: "
                     f"{sorted(METHODS) + ['none']}.")
  return METHODS[method](structure_config, bert_config, seq_len, lengths=lengths)


def default_config(method: str):
  """The config section of `method` with every field at its default.

  Args:
    method: "none" or a registered method name.

  Returns:
    An ml_collections.ConfigDict whose `method` field is `method`.
  """
  import ml_collections
  if method in (None, "none"):
    return ml_collections.ConfigDict({"method": "none"})
  _import_methods()
  from sparse_attn.learn import dam, prune, window
  modules = {"dam_u": dam, "dam_s": dam, "learned_window": window, "prune": prune}
  if method not in modules:
    raise ValueError(f"Unknown structure method {method!r}; known: "
                     f"{sorted(modules) + ['none']}.")
  cfg = modules[method].default_config()
  cfg.method = method
  return cfg


def _import_methods():
  # Explicit imports (no dynamic discovery): each module registers its methods.
  from sparse_attn.learn import dam  # noqa: F401
  from sparse_attn.learn import prune  # noqa: F401
  from sparse_attn.learn import window  # noqa: F401

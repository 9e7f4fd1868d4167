"""The train state: created in its sharded layout, then given its initial weights.

Resume order (the trainer's): the newest restorable checkpoint in the workdir, else
`config.init_from` (pretrained weights, another run's weights, an extracted pruned model),
else the random initialisation made here.
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_attn import checkpoint as ckpt_lib
from sparse_attn import restore
from sparse_attn import sharding
from sparse_attn.optim import path_str
from sparse_attn.train_steps import TrainState


def create_state(module, structure, tx, example: dict[str, Any], mesh, rules, seed: int
                 ) -> tuple[TrainState, Any]:
  """Initialises the train state directly in its sharded layout.

  The state is made by `jax.eval_shape` -> logical shardings -> `jax.jit(init,
  out_shardings=...)`, so no array is ever materialised unsharded.

  Args:
    module: the task module.
    structure: the run structure (its `init` gives the structure params).
    tx: the optimizer.
    example: a batch dict (input_ids / attention_mask / token_type_ids [B, L]).
    mesh, rules: the device mesh and logical-axis rules.
    seed: the initialisation seed.

  Returns:
    (state, state_shardings): state arrays placed per the logical rules on `mesh`.
  """
  def init(rng):
    r_model, r_struct, r_state = jax.random.split(rng, 3)
    variables = module.init(r_model, example["input_ids"], example["attention_mask"],
                            example["token_type_ids"])
    params = {"model": variables["params"], "structure": structure.init(r_struct)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=r_state)

  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(init, rng)  # Boxed: leaves carry logical axis names.
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def apply_init_from(state: TrainState, init_from: str, init_params: Any,
                    state_shardings: Any) -> TrainState:
  """Places `init_from`'s weights into a fresh `state`.

  Args:
    state: the freshly initialised state.
    init_from: the config value ("run:<dir>": that run's model weights, or only its
      encoder when it trained another task head (a missing pooler stays random); otherwise
      `init_params` from `restore.build_model`).
    init_params: a BertModel tree (pretrained encoder; a missing pooler stays random), a
      whole task-model tree (an extracted pruned model), or None (keep the random init).
    state_shardings: the state's shardings (the weights are placed accordingly).
  """
  kind, arg = restore.parse_init_from(init_from)
  if kind == "run":
    other = ckpt_lib.Checkpointer(pathlib.Path(arg) / "checkpoints", async_save=False,
                                  read_only=True)
    model_params = other.restore_model_params()
    other.close()
    if model_params is None:
      raise ckpt_lib.CheckpointError(f"init_from={init_from!r}: no checkpoint there.")
    if jax.tree.structure(model_params) == jax.tree.structure(state.params["model"]):
      return _with_model(state, jax.device_put(model_params,
                                               state_shardings.params["model"]))
    # Another task's run (e.g. masked-LM training, then fine-tuning): its encoder only.
    encoder = model_params.get("bert") if isinstance(model_params, dict) else None
    target = state.params["model"]["bert"]
    if encoder is None or any(
        k not in encoder or jax.tree.structure(encoder[k]) != jax.tree.structure(target[k])
        for k in target if k != "pooler"):
      raise ValueError(f"init_from={init_from!r}: that run's encoder has other parameters "
                       "than this config's (different size, heads or pruned layers).")
    init_params = {k: v for k, v in encoder.items() if k in target}
  if init_params is None:
    return state
  if "bert" in init_params:  # A whole task model (e.g. an extracted pruned model).
    return _with_model(state, jax.device_put(init_params, state_shardings.params["model"]))
  model_params = dict(state.params["model"])
  target = model_params["bert"]
  missing = sorted(set(_paths(target)) - set(_paths(init_params)))
  if any(not p.startswith("pooler") for p in missing):  # A missing pooler stays random.
    raise ValueError(f"init_from={init_from!r} lacks encoder parameters {missing[:5]}.")
  shard = state_shardings.params["model"]["bert"]
  model_params["bert"] = {
      k: jax.device_put(init_params[k], shard[k]) if k in init_params else target[k]
      for k in target}
  return _with_model(state, model_params)


def _with_model(state: TrainState, model_params: Any) -> TrainState:
  params = dict(state.params)
  params["model"] = model_params
  return state.replace(params=params)


def _paths(tree) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every float leaf of `tree` is finite (a scalar bool array)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)

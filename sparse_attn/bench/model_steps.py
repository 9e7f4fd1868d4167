"""Jitted inference and train-step thunks of BertForSequenceClassification."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sparse_attn import model as model_lib


def model_fns(cfg, batch: int, length: int, masks, mesh=None, ids=None
              ) -> tuple[Callable[[], Any], Callable[[], Any]]:
  """Jitted (inference, train step) thunks of BertForSequenceClassification.

  The inputs are `ids` [batch, length] (default: random token ids) and labels [batch],
  all 0; masks is
  passed to the model as is (None, an [L, L] array, or a BlockSparseMask). The train step
  is AdamW (lr 1e-4, weight decay 0.01) on the cross-entropy, without dropout. With a
  mesh, the parameters and optimizer state are replicated and the batch is split over
  its "data" axis. Inference returns logits [batch, 2]; the train step (params, opt, loss).
  """
  net = model_lib.BertForSequenceClassification(cfg, num_labels=2)
  if ids is None:
    ids = np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, length)).astype(
        np.int32)
  labels = np.zeros((batch,), np.int32)
  params = jax.jit(lambda i: net.init(jax.random.PRNGKey(0), i))(ids[:1])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt = jax.jit(tx.init)(params)
  if mesh is not None:
    rep = NamedSharding(mesh, P())
    params, opt = jax.device_put((params, opt), rep)
    ids = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
    labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
  else:
    ids, labels = jnp.asarray(ids), jnp.asarray(labels)

  def loss_fn(p, ids, labels, masks):
    logits, _ = net.apply({"params": p}, ids, masks=masks, deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train(p, o, ids, labels, masks):
    loss, g = jax.value_and_grad(loss_fn)(p, ids, labels, masks)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  infer = jax.jit(lambda p, ids, masks: net.apply({"params": p}, ids, masks=masks,
                                                  deterministic=True)[0])
  return (lambda: infer(params, ids, masks)), (lambda: train(params, opt, ids, labels,
                                                             masks))

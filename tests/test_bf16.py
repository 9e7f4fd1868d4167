"""bf16 mixed precision: `model.dtype="bfloat16"` computes in bfloat16 and keeps float32
parameters, structure logits, softmax statistics and losses; every attention executor takes
bfloat16 inputs and returns bfloat16 close to the float32 dense reference; tiny bf16 runs
train, evaluate and checkpoint like float32 ones."""

import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _require
import _tiny
from sparse_attn import attention
from sparse_attn import model as model_lib
from sparse_attn import train
from sparse_attn import train_steps
from sparse_attn.attention import seam
from sparse_attn.attention.kernels import cpu as cpu_kernel
from sparse_attn.attention.kernels.blocksparse import executor as blocksparse_executor
from sparse_attn.masks import patterns

BF16 = jnp.bfloat16

# ----------------------------------------------------------------- the attention executors
#
# Tolerance: inputs rounded to bfloat16 carry a relative error of 2^-9 ~ 0.002; with unit
# normal q, k (D = 16) the scores move by ~0.01, the output (a convex combination of unit
# normal values, rounded to bfloat16 once more) by about as much: every executor here
# measured at most 0.009 off the float32 reference (forward) and 0.015 (gradients). ATOL =
# 0.04 leaves 4x room, and is 50x below what a wrong mask costs (2.2 here, asserted below,
# so the bound can tell).
ATOL = 4e-2
B, L, H, D, BLOCK = 2, 48, 2, 16, 16


def _qkv(seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32) for _ in range(4))


def _band():
  return patterns.window(L, 6)   # [L, L] bool: a band; 16-blocks give partial tiles.


def _key_valid():
  return jnp.asarray(np.arange(L)[None] < np.array([[L], [L - 7]]))   # [B, L]


def _reference(q, k, v, mask, key_valid):
  """The float32 dense reference (mask: bool / float array or None)."""
  return attention.dot_product_attention(q, k, v, mask=mask, key_valid=key_valid,
                                         backend="dense")


def _bf(*xs):
  return tuple(x.astype(BF16) for x in xs)


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_the_tolerance_tells_a_wrong_mask():
  q, k, v, _ = _qkv()
  kv = _key_valid()
  assert _err(_reference(q, k, v, _band(), kv), _reference(q, k, v, None, kv)) > 5 * ATOL


@pytest.mark.parametrize("name", sorted(seam.BACKENDS))
def test_every_executor_takes_bf16_and_returns_bf16_close_to_float32(name):
  """Every registered executor, with a block-sparse mask object (partial tiles, padding)
  and without a mask: bfloat16 out, forward and gradients close to the float32 dense
  reference's."""
  q, k, v, w = _qkv()
  kv = _key_valid()
  obj = attention.BlockSparseMask.from_mask(_band(), BLOCK)
  for mask, ref_mask in ((obj, _band()), (None, None)):
    run = lambda q, k, v, mask=mask: attention.dot_product_attention(
        q, k, v, mask=mask, key_valid=kv, backend=name)
    out = jax.jit(run)(*_bf(q, k, v))
    assert out.dtype == BF16 and out.shape == (B, L, H, D)
    ref = _reference(q, k, v, ref_mask, kv)
    assert _err(out, ref) < ATOL, (name, mask is None, _err(out, ref))
    loss = lambda q, k, v, fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    grads = jax.jit(jax.grad(lambda *a: loss(*a, run), (0, 1, 2)))(*_bf(q, k, v))
    ref_grads = jax.grad(lambda *a: loss(*a, lambda q, k, v: _reference(
        q, k, v, ref_mask, kv)), (0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
      assert g.dtype == BF16
      # Gradients (up to ~2.6 here) sum over ~13 keys: the bound scales with them.
      assert _err(g, r) < ATOL * max(1.0, float(jnp.max(jnp.abs(r)))), name


def test_dense_takes_a_float32_relaxed_mask_with_bf16_inputs():
  """A learned (float) mask stays float32 with bfloat16 q / k / v: the masked softmax's
  statistics are float32, the output bfloat16."""
  q, k, v, _ = _qkv()
  kv = _key_valid()
  soft_QxK = jnp.asarray(np.random.default_rng(3).random((L, L)), jnp.float32)
  out = attention.dot_product_attention(*_bf(q, k, v), mask=soft_QxK, key_valid=kv)
  ref = _reference(q, k, v, soft_QxK, kv)
  assert out.dtype == BF16 and _err(out, ref) < ATOL
  assert _err(ref, _reference(q, k, v, soft_QxK ** 4, kv)) > 2 * ATOL


def _messages(caplog, text):
  return [r for r in caplog.records if text in r.getMessage()]


def test_the_cpu_kernel_converts_bf16_to_float32_and_back(monkeypatch, caplog):
  """bfloat16 runs the compiled kernel (float32 inside); the output and gradients come
  back bfloat16; the conversion is logged once, not per call."""
  monkeypatch.delenv("SPARSE_ATTN_CPU_KERNEL", raising=False)
  _require.cpu_kernel()   # Skips; fails under CI=true.
  monkeypatch.setattr(cpu_kernel, "_logged", set())
  q, k, v, w = _qkv()
  kv = _key_valid()
  obj = attention.BlockSparseMask.from_mask(_band(), BLOCK)
  call = lambda q, k, v: blocksparse_executor.attend(obj.plan, q, k, v, key_valid=kv,
                                                     impl="kernel")
  caplog.set_level(logging.INFO)
  out = call(*_bf(q, k, v))
  assert out.dtype == BF16
  ref = _reference(q, k, v, _band(), kv)
  assert _err(out, ref) < ATOL
  # The kernel computed in float32: on the rounded inputs it equals the float32 kernel.
  f32_on_rounded = call(*(x.astype(jnp.float32) for x in _bf(q, k, v)))
  assert _err(out, f32_on_rounded.astype(BF16)) == 0.0
  grads = jax.grad(lambda *a: jnp.sum(call(*a).astype(jnp.float32) * w), (0, 1, 2))(
      *_bf(q, k, v))
  assert all(g.dtype == BF16 for g in grads)
  assert "sparse_attn_blocksparse_fwd" in jax.jit(
      lambda q, k, v: blocksparse_executor.attend(obj.plan, q, k, v)).lower(
          *_bf(q, k, v)).as_text()
  assert len(_messages(caplog, "bfloat16 attention inputs are converted")) == 1


def test_without_the_cpu_kernel_bf16_falls_back_and_says_why_once(monkeypatch, caplog):
  """The kernel disabled: the pure-JAX executor runs bfloat16, and the log says why once
  however many calls are traced."""
  monkeypatch.setenv("SPARSE_ATTN_CPU_KERNEL", "0")
  monkeypatch.setattr(cpu_kernel, "_logged", set())
  q, k, v, _ = _qkv()
  kv = _key_valid()
  obj = attention.BlockSparseMask.from_mask(_band(), BLOCK)
  caplog.set_level(logging.INFO)
  hlo = jax.jit(lambda q, k, v: blocksparse_executor.attend(obj.plan, q, k, v)).lower(
      *_bf(q, k, v)).as_text()
  assert "sparse_attn_blocksparse_fwd" not in hlo
  for _ in range(3):   # Un-jitted: each call traces the executor again.
    out = blocksparse_executor.attend(obj.plan, *_bf(q, k, v), key_valid=kv)
  assert out.dtype == BF16
  assert _err(out, _reference(q, k, v, _band(), kv)) < ATOL
  why = _messages(caplog, "runs the pure-JAX executor, not the compiled CPU kernel")
  assert len(why) == 1 and "SPARSE_ATTN_CPU_KERNEL" in why[0].getMessage()


# -------------------------------------------------------------- the model and its heads

def test_model_computes_in_bf16_and_the_mlm_logits_and_losses_are_float32():
  config = model_lib.BertConfig(**_tiny.TINY_MODEL, dtype=BF16)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 1000, (2, 16)))
  mlm = model_lib.BertForMaskedLM(config)
  params = mlm.init(jax.random.PRNGKey(0), ids)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  hidden, _ = model_lib.BertModel(config, add_pooler=False).apply(
      {"params": params["bert"]}, ids)
  assert hidden.dtype == BF16
  logits, _ = mlm.apply({"params": params}, ids)
  assert logits.dtype == jnp.float32
  batch = {"weights": jnp.ones(2), "labels": ids, "label_mask": jnp.ones(ids.shape)}
  total, _ = train_steps.task_loss("mlm", logits, batch)
  assert total.dtype == jnp.float32
  cls = model_lib.BertForSequenceClassification(config, num_labels=2)
  cls_logits, _ = cls.apply(cls.init(jax.random.PRNGKey(0), ids), ids)
  assert cls_logits.dtype == BF16
  total, _ = train_steps.task_loss("classification", cls_logits,
                                   {"weights": jnp.ones(2), "labels": jnp.array([0, 1])})
  assert total.dtype == jnp.float32
  # The loss of bfloat16 logits equals that of the same logits in float32 (upcast first).
  ref, _ = train_steps.task_loss("classification", cls_logits.astype(jnp.float32),
                                 {"weights": jnp.ones(2), "labels": jnp.array([0, 1])})
  assert float(total) == float(ref)


STRUCTURES = {
    "dam_s": {"method": "dam_s", "per_head": True, "lam": 0.0, "target_density": 0.5,
              "target_mode": "abs"},
    "learned_window": {"method": "learned_window", "max_width": 8, "beta": 1.0},
    "prune": {"method": "prune", "unit": "head", "prune_fraction": 0.5, "beta": 1.0,
              "budget": "penalty"},
}


def _float_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                             jnp.floating)]


@pytest.mark.parametrize("method", sorted(STRUCTURES))
def test_parameters_and_structure_logits_stay_float32_under_bf16(tmp_path, method):
  """A bf16 model with a learned structure: every parameter (model and structure) is
  float32 before and after a train step, the structure's masks / gates and penalty are
  float32, the model's outputs bfloat16, and the structure logits get a gradient."""
  config = _tiny.tiny_config({"model.dtype": "bfloat16", "structure": STRUCTURES[method]})
  run = train.setup(config, tmp_path / "run", restore=False)
  run.ckpt.close()
  assert run.bert_config.dtype == BF16 and run.bert_config.param_dtype == jnp.float32
  state = run.state
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  batch = next(run.train_ds.batches(config.train.batch_size, seed=0, start_step=0))
  s = run.structure.sample(state.params["structure"], jax.random.PRNGKey(1), state.step,
                           batch)
  relaxed = _float_leaves(s.masks) + _float_leaves(s.gates)
  assert relaxed and all(x.dtype == jnp.float32 for x in relaxed), method
  assert jnp.asarray(s.penalty).dtype == jnp.float32
  logits, _ = run.module.apply({"params": state.params["model"]}, batch["input_ids"],
                               batch["attention_mask"], batch["token_type_ids"],
                               masks=s.masks, gates=s.gates)
  assert logits.dtype == BF16
  step = jax.jit(train_steps.make_train_step(run.module, run.structure, run.tx, run.task))
  new, metrics = step(state, batch)
  assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.float32)}
  assert jnp.asarray(metrics["loss"]).dtype == jnp.float32
  assert math.isfinite(float(metrics["loss"]))
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(state.params["structure"]), jax.tree.leaves(new.params["structure"]))]
  assert any(moved), method


# ------------------------------------------------------------------------ tiny runs

STEPS = 8
RUN = {"train.num_steps": STEPS, "train.eval_every": 0, "checkpoint.every_steps": 0}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """The same tiny fine-tuning (random init, same seed, same batches) through train.py,
  in float32 and in bfloat16: {dtype: workdir}."""
  root = tmp_path_factory.mktemp("bf16")
  out = {}
  for dtype in ("float32", "bfloat16"):
    out[dtype] = root / dtype
    _tiny.run(_tiny.train_cmd(out[dtype], dict(RUN, **{"model.dtype": dtype})))
  return out


# The bounds on |loss_bf16 - loss_f32|, step by step and for the dev loss. Measured on
# this tiny run (random init, losses near ln 2 = 0.69): 3.4e-6 at step 1 (the forward
# pass's rounding only), at most 3.6e-5 over the 8 steps (plus the drift of updates computed
# from bfloat16 activations), 6e-6 for the dev loss. The bounds leave ~30x room for other
# CPUs and XLA versions and stay below what a broken path costs: a loss computed in
# bfloat16 itself is rounded to the bfloat16 grid (spacing 2^-8 = 0.0039 near 0.69, an
# error of ~1e-3 at a typical step and up to 2e-3), a lost mask or a NaN far more.
FIRST_STEP_BOUND = 1e-4
LOSS_BOUND = 1e-3


@pytest.mark.slow
def test_bf16_fine_tuning_follows_float32(tiny_runs):
  f32 = _tiny.losses_by_step(tiny_runs["float32"])
  bf16 = _tiny.losses_by_step(tiny_runs["bfloat16"])
  assert sorted(f32) == sorted(bf16) and len(f32) == STEPS
  assert all(math.isfinite(x) for x in bf16.values())
  assert abs(bf16[1] - f32[1]) < FIRST_STEP_BOUND, (bf16[1], f32[1])
  diffs = {s: abs(bf16[s] - f32[s]) for s in f32}
  assert max(diffs.values()) < LOSS_BOUND, diffs
  ev = {d: _tiny.read_metrics(w, "validation")[-1] for d, w in tiny_runs.items()}
  assert abs(ev["bfloat16"]["loss"] - ev["float32"]["loss"]) < LOSS_BOUND, ev


@pytest.mark.slow
def test_a_tiny_bf16_train_run_completes(tiny_runs):
  """train.py in bf16: the results, the evaluation, a checkpoint of float32 parameters
  and the config that names bfloat16."""
  from sparse_attn import checkpoint as ckpt_lib
  workdir = tiny_runs["bfloat16"]
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == STEPS
  assert 0.0 <= results["validation"]["accuracy"] <= 1.0
  assert math.isfinite(results["validation"]["loss"])
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False, read_only=True)
  try:
    params = ck.restore_model_params()
  finally:
    ck.close()
  assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  saved = [json.loads(p.read_text()) for p in
           (workdir / "checkpoints").glob("*/config/metadata")]
  assert saved and all(c["model"]["dtype"] == "bfloat16" for c in saved)

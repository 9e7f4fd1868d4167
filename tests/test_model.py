"""Tests of the BERT modules: mask pytrees, padding, pruned sublayers, gates, heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import model

CFG = model.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=32, max_position_embeddings=16)
B, L = 2, 8


def _batch():
  ids = jax.random.randint(jax.random.PRNGKey(0), (B, L), 1, CFG.vocab_size)
  am = jnp.array([[1] * L, [1] * 5 + [0] * 3])
  return ids, am


def _init(cfg=CFG, cls=model.BertModel, **kw):
  ids, am = _batch()
  m = cls(cfg, **kw)
  return m, nn.meta.unbox(m.init(jax.random.PRNGKey(1), ids, am)["params"])


def test_none_equals_all_true_and_forms_agree():
  m, p = _init()
  ids, am = _batch()
  dense, aux = m.apply({"params": p}, ids, am)
  ones, _ = m.apply({"params": p}, ids, am, masks=jnp.ones((L, L), bool))
  np.testing.assert_allclose(dense, ones, atol=1e-6)
  np.testing.assert_allclose(aux["density"], 1.0)
  band = jnp.abs(jnp.arange(L)[:, None] - jnp.arange(L)) <= 1
  as_tuple, aux_t = m.apply({"params": p}, ids, am, masks=(None, band, None))
  as_dict, _ = m.apply({"params": p}, ids, am, masks={"layer_1": band})
  np.testing.assert_allclose(as_tuple, as_dict, atol=0)
  assert float(jnp.max(jnp.abs(as_tuple - dense))) > 1e-3
  assert aux_t["density"][0] == 1.0 and aux_t["density"][1] < 0.6


def test_per_example_and_per_head_masks():
  m, p = _init()
  ids, am = _batch()
  rng = np.random.default_rng(0)
  per_head = jnp.asarray(rng.random((CFG.num_attention_heads, L, L)) < 0.5)
  per_ex = jnp.asarray(rng.random((B, 1, L, L)) < 0.5)
  a, _ = m.apply({"params": p}, ids, am, masks=per_head)
  b, _ = m.apply({"params": p}, ids, am, masks=per_ex)
  assert np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b)).all()
  # Example 0 under its own [1,1,L,L] mask equals its row of the batched run.
  solo, _ = m.apply({"params": p}, ids[:1], am[:1], masks=per_ex[:1])
  np.testing.assert_allclose(solo[0], b[0], atol=1e-5)


def test_padding_content_does_not_leak():
  m, p = _init()
  ids, am = _batch()
  out1, _ = m.apply({"params": p}, ids, am)
  out2, _ = m.apply({"params": p}, ids.at[1, 5:].set(7), am)
  np.testing.assert_allclose(out1[1, :5], out2[1, :5], atol=1e-6)


def test_mask_pytree_errors():
  m, p = _init()
  ids, am = _batch()
  with pytest.raises(ValueError, match="3 layers"):
    m.apply({"params": p}, ids, am, masks=(None, None))
  with pytest.raises(ValueError, match="name no layer"):
    m.apply({"params": p}, ids, am, masks={"layer_7": jnp.ones((L, L), bool)})
  with pytest.raises(ValueError, match="cannot broadcast"):
    m.apply({"params": p}, ids, am, masks=jnp.ones((L, L + 1), bool))


def test_float_mask_gradient_flows():
  m, p = _init()
  ids, am = _batch()
  f = lambda mk: jnp.sum(m.apply({"params": p}, ids, am, masks=mk)[0] ** 2)
  g = jax.grad(f)(jnp.full((CFG.num_attention_heads, L, L), 0.5))
  assert float(jnp.abs(g).max()) > 0


def test_pruned_layer_has_no_attention_and_equals_zero_gate():
  for keep_ln in (False, True):
    full_cfg = CFG.replace(pruned_keep_layernorm=keep_ln) if hasattr(CFG, "replace") else None
    full_cfg = model.BertConfig(**{**CFG.__dict__, "pruned_keep_layernorm": keep_ln})
    pruned_cfg = model.BertConfig(**{**full_cfg.__dict__, "heads_per_layer": (4, 0, 4)})
    m_full, p_full = _init(full_cfg)
    m_pr = model.BertModel(pruned_cfg)
    assert "attention" not in jax.eval_shape(
        lambda: m_pr.init(jax.random.PRNGKey(1), *_batch()))["params"]["layer_1"]
    p_pr = jax.tree.map(lambda x: x, p_full)
    del p_pr["layer_1"]["attention"]
    if not keep_ln:
      del p_pr["layer_1"]["attention_LayerNorm"]
    ids, am = _batch()
    gated, _ = m_full.apply({"params": p_full}, ids, am, gates=(None, jnp.float32(0), None))
    pruned, aux = m_pr.apply({"params": p_pr}, ids, am)
    np.testing.assert_allclose(gated, pruned, atol=1e-6)
    assert aux["density"][1] == 0.0


def test_head_gate_zero_equals_dropping_head():
  m, p = _init()
  ids, am = _batch()
  g = jnp.array([1.0, 0.0, 1.0, 1.0])
  out_g, _ = m.apply({"params": p}, ids, am, gates=(g, None, None))
  mask = jnp.ones((4, L, L), bool).at[1].set(False)  # Head 1 sees nothing -> outputs 0.
  out_m, _ = m.apply({"params": p}, ids, am, masks=(mask, None, None))
  np.testing.assert_allclose(out_g, out_m, atol=1e-6)


def test_heads_shapes_and_tied_decoder():
  ids, am = _batch()
  m, p = _init(cls=model.BertForSequenceClassification, num_labels=3)
  assert m.apply({"params": p}, ids, am)[0].shape == (B, 3)
  m, p = _init(cls=model.BertForTokenClassification, num_labels=5)
  assert m.apply({"params": p}, ids, am)[0].shape == (B, L, 5)
  m, p = _init(cls=model.BertForMaskedLM)
  logits, _ = m.apply({"params": p}, ids, am)
  assert logits.shape == (B, L, CFG.vocab_size)
  assert "decoder" not in p  # Tied: the decoder reuses the word embeddings.
  p2 = jax.tree.map(lambda x: x, p)
  p2["bert"]["embeddings"]["word_embeddings"]["embedding"] *= 2.0
  assert float(jnp.abs(m.apply({"params": p2}, ids, am)[0] - logits).max()) > 1e-3


def test_dropout_is_active_in_training_and_needs_rng():
  m, p = _init()
  ids, am = _batch()
  a, _ = m.apply({"params": p}, ids, am, deterministic=False,
                 rngs={"dropout": jax.random.PRNGKey(0)})
  b, _ = m.apply({"params": p}, ids, am, deterministic=False,
                 rngs={"dropout": jax.random.PRNGKey(1)})
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_config_validation():
  with pytest.raises(ValueError, match="multiple"):
    model.BertConfig(hidden_size=10, num_attention_heads=4)
  with pytest.raises(ValueError, match="heads_per_layer"):
    model.BertConfig(num_hidden_layers=2, heads_per_layer=(12,))
  with pytest.raises(ValueError, match="hidden_act"):
    model.BertConfig(hidden_act="swish")

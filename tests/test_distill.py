"""Knowledge distillation: the loss, and a student trained from a finished teacher run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
from sparse_attn import distill
from sparse_attn import train


def _batch(b=4, l=5):
  return {"weights": jnp.array([1.0] * (b - 1) + [0.0]),
          "label_mask": jnp.ones((b, l), jnp.int32)}


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
  rng = np.random.default_rng(0)
  t = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  total, count = distill.distill_loss("classification", t, t, _batch(), 2.0)
  assert float(total) == pytest.approx(0.0, abs=1e-6) and float(count) == 3.0
  s = t + jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  total, _ = distill.distill_loss("classification", s, t, _batch(), 2.0)
  assert float(total) > 1e-3


def test_kl_matches_the_formula_with_t_squared_and_ignores_filler_rows():
  rng = np.random.default_rng(1)
  s, t = (jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(2))
  temp = 3.0
  p_t = jax.nn.softmax(t / temp)
  want = temp ** 2 * np.sum(p_t * (jax.nn.log_softmax(t / temp)
                                   - jax.nn.log_softmax(s / temp)), axis=-1)
  total, count = distill.distill_loss("classification", s, t, _batch(), temp)
  np.testing.assert_allclose(float(total), float(np.sum(want[:3])), rtol=1e-5)
  assert float(count) == 3.0  # The filler row (weight 0) counts for nothing.


def test_gradient_reaches_the_student_only():
  rng = np.random.default_rng(2)
  s, t = (jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32) for _ in range(2))
  f = lambda s_, t_: distill.distill_loss("token_classification", s_, t_, _batch(), 2.0)[0]
  g_s, g_t = jax.grad(f, argnums=(0, 1))(s, t)
  assert float(jnp.abs(g_s[:3]).sum()) > 0 and float(jnp.abs(g_s[3]).sum()) == 0
  assert float(jnp.abs(g_t).sum()) == 0  # The teacher is a fixed target.


def test_regression_distils_the_prediction():
  s = jnp.array([[1.0], [2.0], [0.0], [5.0]])
  t = jnp.array([[0.0], [2.0], [3.0], [0.0]])
  total, count = distill.distill_loss("regression", s, t, _batch(), 2.0)
  assert float(total) == pytest.approx(1.0 + 0.0 + 9.0) and float(count) == 3.0


@pytest.mark.parametrize("alpha, temp, problem", [(1.5, 2.0, "alpha"), (-0.1, 2.0, "alpha"),
                                                  (0.5, 0.0, "temperature")])
def test_bad_settings_are_named(alpha, temp, problem):
  with pytest.raises(ValueError, match=problem):
    distill.check_settings(alpha, temp)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("teacher")
  train.train_and_evaluate(_tiny.tiny_config({"train.num_steps": 8}), d)
  return d


def _student(teacher, **over):
  return _tiny.tiny_config({"distill.teacher": str(teacher), "train.num_steps": 4,
                            "train.seed": 1, **over})


def test_pure_distillation_pulls_the_student_towards_the_teacher(teacher_dir, tmp_path):
  out = train.train_and_evaluate(_student(teacher_dir, **{"distill.alpha": 1.0,
                                                          "optimizer.learning_rate": 3e-3,
                                                          "train.num_steps": 12}),
                                 tmp_path / "s")
  rows = _tiny.read_metrics(tmp_path / "s")
  d = [r["distill_loss"] for r in rows]
  assert all(np.isfinite(d)) and d[-1] < d[0]  # The student approaches the teacher.
  # With alpha = 1 the objective is the distillation loss alone (no structure penalty).
  assert rows[-1]["loss"] == pytest.approx(rows[-1]["distill_loss"], rel=1e-5)
  assert "accuracy" in out["validation"]


def test_alpha_zero_trains_exactly_like_no_teacher(teacher_dir, tmp_path):
  train.train_and_evaluate(_student(teacher_dir, **{"distill.alpha": 0.0}), tmp_path / "a")
  train.train_and_evaluate(_student("", ), tmp_path / "b")
  a, b = _tiny.losses_by_step(tmp_path / "a"), _tiny.losses_by_step(tmp_path / "b")
  assert a.keys() == b.keys()
  np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-6)


def test_missing_teacher_run_says_so_and_creates_nothing(tmp_path):
  with pytest.raises(Exception, match="distill.teacher.*no checkpoint"):
    train.train_and_evaluate(_student(tmp_path / "nowhere"), tmp_path / "s")
  assert not (tmp_path / "nowhere").exists()


def test_teacher_run_is_left_untouched(teacher_dir, tmp_path):
  before = sorted(str(p.relative_to(teacher_dir)) for p in teacher_dir.rglob("*"))
  train.train_and_evaluate(_student(teacher_dir), tmp_path / "s")
  assert sorted(str(p.relative_to(teacher_dir)) for p in teacher_dir.rglob("*")) == before


def test_teacher_of_another_task_is_refused(teacher_dir, tmp_path):
  c = _student(teacher_dir, **{"data.task": "wnut16"})
  with pytest.raises(ValueError, match="same task and tokenizer"):
    train.train_and_evaluate(c, tmp_path / "s")


def test_teacher_shorter_than_the_student_is_refused(teacher_dir, tmp_path):
  c = _student(teacher_dir, **{"data.max_len": 48})
  with pytest.raises(ValueError, match="max_len"):
    train.train_and_evaluate(c, tmp_path / "s")


def test_distill_settings_are_saved_with_the_run(teacher_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(teacher_dir.parent)  # A relative teacher path is saved absolute.
  train.train_and_evaluate(_student(teacher_dir.name), tmp_path / "s")
  from sparse_attn import checkpoint as ckpt_lib
  ck = ckpt_lib.Checkpointer(tmp_path / "s" / "checkpoints", async_save=False)
  saved = ck.restore_config()
  ck.close()
  assert saved["distill"]["teacher"] == str(teacher_dir)
  json.dumps(saved)  # Plain JSON.

"""Prediction on new text: the same labels as evaluation, the CLI, and bad input."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import _tiny
from sparse_attn import data as data_lib
from sparse_attn import predict as predict_lib
from sparse_attn import restore

RUN = {"masks.source": "pattern", "masks.pattern": "window", "masks.kwargs": {"k": 3},
       "train.num_steps": 6, "checkpoint.every_steps": 0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("predict") / "run"
  _tiny.run(_tiny.train_cmd(workdir, RUN))
  return workdir


def test_predict_gives_the_labels_evaluation_scored(run_dir):
  run = restore.load_run(run_dir)
  examples = data_lib.load_examples(run.config.data, "validation", run.task)
  texts = [t for (t,) in examples.texts]
  rows = run.predict(texts, batch_size=5)          # Another batching than evaluation's.
  assert len(rows) == len(texts)
  labels = np.array([r["label_id"] for r in rows])
  results = json.loads((run_dir / "results.json").read_text())
  assert np.mean(labels == examples.labels) == pytest.approx(
      results["validation"]["accuracy"], abs=1e-9)
  # Elementwise, the predictions of the evaluation step (the run's structure, in order).
  import jax
  from sparse_attn.train_steps import make_eval_step
  step = jax.jit(make_eval_step(run.module, run.task, run.structure))
  ds = data_lib.build_dataset(run.config.data, "validation", run.tokenizer, run.task)
  evaluated = []
  for batch in ds.batches(8, shuffle=False, drop_remainder=False):
    masks = run.structure.prepare(run.frozen.masks, batch["input_ids"].shape[1]).masks
    out = step(run.params, batch, masks, run.frozen.gates)
    evaluated += [int(p) for p, w in zip(out["predictions"], out["weights"]) if w > 0]
  np.testing.assert_array_equal(labels, evaluated)
  for r in rows:
    assert r["label"] == run.task.label_names[r["label_id"]]
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
  # Input order is kept whatever the length order: one text alone gives its own row.
  alone = run.predict([texts[3]])[0]
  assert alone["label"] == rows[3]["label"]
  assert alone["probabilities"] == pytest.approx(rows[3]["probabilities"], abs=1e-5)


def test_the_cli_writes_jsonl(run_dir, tmp_path):
  src = tmp_path / "new.txt"
  src.write_text("a gripping, funny and moving film\n\nthe dullest two hours of my life\n")
  out = tmp_path / "out.jsonl"
  p = subprocess.run([sys.executable, str(_tiny.REPO / "predict.py"), f"--workdir={run_dir}",
                      f"--input={src}", f"--output={out}"], cwd=_tiny.REPO,
                     env=_tiny.env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 2 and {r["label"] for r in rows} <= {"rotten", "fresh"}
  assert "predicted 2/2" in p.stderr
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  p = subprocess.run([sys.executable, str(_tiny.REPO / "predict.py"), f"--workdir={run_dir}",
                      f"--input={empty}"], cwd=_tiny.REPO, env=_tiny.env(),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 2 and "holds no texts" in p.stderr


def test_bad_inputs_are_clear_errors(tmp_path):
  csv = tmp_path / "x.csv"
  csv.write_text("sentence,label\nhello,1\n")
  with pytest.raises(predict_lib.PredictionError, match=r"no column \['text'\]"):
    predict_lib.read_inputs(str(csv), ("text",))
  jl = tmp_path / "x.jsonl"
  jl.write_text('{"text": "ok"}\n{"txt": "no"}\n')
  with pytest.raises(predict_lib.PredictionError, match=r"x.jsonl:2: expected an object"):
    predict_lib.read_inputs(str(jl), ("text",))
  plain = tmp_path / "x.txt"
  plain.write_text("one\n")
  with pytest.raises(predict_lib.PredictionError, match="CSV or JSONL"):
    predict_lib.read_inputs(str(plain), ("premise", "hypothesis"))
  with pytest.raises(predict_lib.PredictionError, match="No input file"):
    predict_lib.read_inputs(str(tmp_path / "missing.txt"), ("text",))
  assert predict_lib.read_inputs(str(plain), ("text",)) == ["one"]


def test_a_masked_lm_run_or_no_text_is_refused(run_dir):
  run = restore.load_run(run_dir)
  with pytest.raises(predict_lib.PredictionError, match="Nothing to predict"):
    run.predict([])
  mlm = dataclasses.replace(run, task=data_lib.get_task(
      _tiny.tiny_config({"data.task": "shakespeare"}).data))
  with pytest.raises(predict_lib.PredictionError, match="masked-LM run"):
    mlm.predict(["text"])
  with pytest.raises(predict_lib.PredictionError, match="expected 1 text field"):
    run.predict([("a", "b")])

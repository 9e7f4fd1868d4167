"""Every experiment file in configs/ and its documented variants build a valid config."""

import importlib.util
import pathlib

import numpy as np
import pytest

from sparse_attn import config as config_lib
from sparse_attn import fixed_masks, learn, model

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
MINILM = model.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                          num_attention_heads=12, intermediate_size=1536)

VARIANTS = {
    "finetune.py": ["", "runlocal", "nodiag", "task=wnut16", "task=glue/mrpc",
                    "pattern=sparsebert_bigbird", "pattern=window,kw.k=4,start=2",
                    "pattern=bigbird,kw.window=2,kw.global_tokens=1,kw.random_keys=2,"
                    "kw.seed=0,start=2", "max_len=128,nodiag",
                    "max_len=128,init=runs/mlm", "pattern=window,match=0.2,runlocal",
                    "pattern=bigbird,match=0.25,drop=random,runlocal",
                    "pattern=syntax,kw.distance=1,start=3", "pattern=lexical,kw.top_r=1"],
    "dam.py": ["", "runlocal", "method=dam_u", "official", "lam=1e-3", "target=0.1",
               "per_layer", "block=16", "nodiag", "global=0", "task=shakespeare",
               "sep,target=0.11", "teacher=runs/dense,alpha=0.7,kd_temp=3"],
    "prune.py": ["", "runlocal", "unit=head", "keep_ln", "prune=0.5", "teacher=runs/dense",
                 "shift,warm=50"],
    "window.py": ["", "runlocal", "beta=3", "soft", "start=0", "global=0", "notarget",
                  "target=0.3", "bigbird,runlocal"],
    "longdoc.py": ["", "runlocal", "pattern=longformer", "pattern=longformer,window=32,len=2048",
                   "learned_window", "len=4096,steps=10", "dam", "dam,runlocal",
                   "pattern=longformer,compare"],
    "mlm.py": ["fit_head", "fit_head,runlocal", "head=runs/h", "head=runs/h,arm=nodiag",
               "head=runs/h,arm=star,seed=2", "head=runs/h,arm=dam_u,lam=1",
               "head=runs/h,arm=dam_s,runlocal"],
}


def _load(name):
  spec = importlib.util.spec_from_file_location(name[:-3], CONFIGS / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_file_is_covered():
  assert sorted(p.name for p in CONFIGS.glob("*.py")) == sorted(VARIANTS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_config_variant_builds(name, arg):
  module = _load(name)
  assert module.__doc__ and "python train.py" in module.__doc__
  c = config_lib.validate(module.get_config(arg or None))
  bert = MINILM
  if c.model.get("pruned_keep_layernorm"):
    bert = model.BertConfig(**{**MINILM.__dict__, "pruned_keep_layernorm": True})
  fixed_masks.build(c.masks, bert, c.data.max_len)
  learn.build(c.structure, bert, c.data.max_len,
              lengths=np.arange(2, c.data.max_len + 1))  # As if from the training data.
  if "runlocal" in arg:
    assert c.train.num_steps <= 10 and c.data.max_train_examples <= 128


def test_teacher_argument_sets_the_distill_section():
  c = config_lib.validate(_load("dam.py").get_config("teacher=runs/dense,alpha=0.7,kd_temp=3"))
  assert (c.distill.teacher, c.distill.alpha, c.distill.temperature) == ("runs/dense", 0.7, 3.0)
  c = config_lib.validate(_load("finetune.py").get_config(None))
  assert c.distill.teacher == ""  # Off by default.


@pytest.mark.parametrize("name, arg, problem", [("dam.py", "alpha=0.7", "teacher="),
                                                 ("prune.py", "warm=20", "shift"),
                                                 ("mlm.py", "arm=dense", "head="),
                                                 ("mlm.py", "head=h,arm=nope", "arm="),
                                                 ("mlm.py", "fit_head,arm=dense", "fit_head"),
                                                 ("finetune.py", "drop=window", "match"),
                                                 ("finetune.py", "pattern=star,match=0.2",
                                                  "pattern=window, random or bigbird"),
                                                 ("finetune.py",
                                                  "pattern=window,match=0.2,drop=random",
                                                  "drop=")])
def test_arguments_that_need_another_are_refused(name, arg, problem):
  with pytest.raises(ValueError, match=problem):
    _load(name).get_config(arg)

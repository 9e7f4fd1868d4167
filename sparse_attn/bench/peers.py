"""Section (c): our dense BERT steps against PyTorch / Hugging Face on the same shapes."""

from __future__ import annotations

import jax
import numpy as np

from sparse_attn.bench import timing
from sparse_attn.bench.model_steps import model_fns


def _torch_fns(cfg, batch, length):
  """(inference, train step) thunks of transformers' BertForSequenceClassification."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
      max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, num_labels=2)
  tm = transformers.BertForSequenceClassification(hf)
  opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.as_tensor(np.random.default_rng(1).integers(1, cfg.vocab_size,
                                                          (batch, length)))
  labels = torch.zeros((batch,), dtype=torch.long)

  def t_train():
    tm.train()
    opt.zero_grad(set_to_none=True)
    tm(input_ids=ids, labels=labels).loss.backward()
    opt.step()

  def t_infer():
    tm.eval()
    with torch.inference_mode():
      tm(input_ids=ids)

  return t_infer, t_train


def bench_torch(cfg, batch: int, length: int, repeats: int, threads: int,
                mesh=None) -> dict:
  """Our dense train / inference steps vs Hugging Face BertForSequenceClassification.

  Both run cfg without dropout on token ids [batch, length] (ours data-parallel over
  mesh's "data" axis if given; torch on `threads` threads), AdamW for the train step.
  Returns the times, the versions and jax / torch median-time ratios per "infer" /
  "train". Needs torch and transformers.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  t_infer, t_train = _torch_fns(cfg, batch, length)
  j_infer, j_train = model_fns(cfg, batch, length, None, mesh)
  fns = {"jax/infer": j_infer, "torch/infer": t_infer, "jax/train": j_train,
         "torch/train": t_train}
  for f in fns.values():  # Warm-up (compile; torch allocator).
    jax.block_until_ready(f())
  t = timing.interleaved(fns, repeats)
  out = {"L": length, "batch": batch, "torch_threads": threads,
         "torch": torch.__version__, "transformers": transformers.__version__,
         "times": t}
  for mode in ("infer", "train"):
    out[f"{mode}_ratio_jax_over_torch"] = (t[f"jax/{mode}"]["median"] /
                                           t[f"torch/{mode}"]["median"])
    print(f"[torch] L={length} B={batch} {mode}: jax/torch = "
          f"{out[f'{mode}_ratio_jax_over_torch']:.2f}", flush=True)
  return out

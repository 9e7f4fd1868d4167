"""Writes the golden MiniLM fixture that the JAX BERT is checked against (PyTorch reference).

The fixture holds the outputs of Hugging Face ``transformers.BertModel`` (PyTorch, fp32, eval
mode, eager attention) on the real all-MiniLM-L6-v2 weights from the project's asset cache,
for a small padded batch that includes a sentence pair (token_type_ids = 1 on the second
segment). Parity tests load it with numpy alone, so neither PyTorch nor transformers is
needed to run the test suite, and this script is not run in CI.

The reference stack lives in its own virtualenv, apart from the JAX one. From the repo root:

  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch==2.13.0
  /work/venv-torch/bin/pip install torch==2.13.0 transformers==5.23.0 tokenizers==0.23.3 \
      safetensors==0.8.0 numpy==2.4.6
  /work/venv-torch/bin/python scripts/make_parity_fixture.py   # ~10 s on 2 CPU cores

Install the CPU build of torch 2.13.0 (a plain ``pip install torch`` may pull a multi-GB CUDA
build), and name ``torch==2.13.0`` again next to transformers so pip cannot swap it out.
The output is bit-identical from run to run with the same library versions.

Fixture keys (B = 4 examples, L = longest tokenised example, N = 6 layers, D = 384 hidden):
  input_ids, token_type_ids, attention_mask   int32   [B, L]   (right padding, [PAD] = 0)
  last_hidden_state                           float32 [B, L, D]
  pooler_output                               float32 [B, D]
  hidden_states                               float32 [N+1, B, L, D]  (embeddings, layer 1..N)
  sdpa_last_hidden_state, sdpa_pooler_output  float32  same run with transformers' default
                                                       "sdpa" attention, to show the spread
                                                       between two correct implementations
  attn_implementation                         str     "eager": which run the main keys hold
  sentences                                   str     [B] the raw text ("a ||| b" for a pair)
  versions                                    str     library versions and asset checksums
  notes                                       str     padding convention, eager-vs-sdpa gap

Padded positions (attention_mask == 0) are set to exactly 0 in every [.., B, L, D] array.
Their values are implementation-defined (they depend on whether padded queries are masked
too), so a parity test compares only real tokens; zeroing them also keeps the file small,
since float32 activations barely compress. The pooler reads position 0, always a real token.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys

# Set before transformers / huggingface_hub are imported: they read these at import time.
# The weights come from a local directory; no hub request may be made.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from sparse_attn import assets  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "minilm_parity.npz"

# Different lengths so that padding appears in three of the four rows; the pair exercises
# token_type_ids = 1; "unbelievably" and "MiniLM" split into several word pieces.
SENTENCES: list[str | tuple[str, str]] = [
    "The cat sat on the mat.",
    "Sparse attention lets each token see a few others.",
    ("How many layers does MiniLM have?", "Six, with twelve heads."),
    "An unbelievably moving film, though its last act drags and feels forced.",
]
MAX_LENGTH = 64  # Truncation cap; every sentence above is shorter, so nothing is cut.

# Any key other than these in the checkpoint-vs-model comparison means the weights were not
# loaded as intended. position_ids is a non-persistent buffer that old checkpoints carry.
_ALLOWED_KEY_MISMATCH = ("embeddings.position_ids",)


def tokenize(tokenizer_json: pathlib.Path) -> dict[str, np.ndarray]:
  """Tokenises ``SENTENCES`` with the model's own tokenizer.json.

  Args:
    tokenizer_json: path of the Hugging Face fast-tokenizer file.

  Returns:
    Dict of int32 arrays [B, L]: input_ids, token_type_ids, attention_mask; right-padded to
    the longest example.
  """
  tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
  # The shipped file pads to a fixed 128; pad to the batch's longest instead (length=None).
  tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=None)
  tok.enable_truncation(max_length=MAX_LENGTH)
  encs = tok.encode_batch(SENTENCES)
  for s, e in zip(SENTENCES, encs):
    if e.overflowing:
      raise ValueError(f"Sentence {s!r} was truncated; shorten it or raise MAX_LENGTH.")
  return {
      "input_ids": np.array([e.ids for e in encs], np.int32),
      "token_type_ids": np.array([e.type_ids for e in encs], np.int32),
      "attention_mask": np.array([e.attention_mask for e in encs], np.int32),
  }


def load_model(model_dir: pathlib.Path, attn_implementation: str) -> transformers.BertModel:
  """Loads BertModel from a local directory in fp32 eval mode, checking every weight loaded.

  Args:
    model_dir: directory with config.json and model.safetensors.
    attn_implementation: "eager" or "sdpa".

  Returns:
    The model, in eval mode (dropout off).
  """
  model, info = transformers.BertModel.from_pretrained(
      model_dir, attn_implementation=attn_implementation, dtype=torch.float32,
      local_files_only=True, output_loading_info=True)
  bad = {k: sorted(set(v) - set(_ALLOWED_KEY_MISMATCH))
         for k, v in info.items() if k != "error_msgs"}
  bad = {k: v for k, v in bad.items() if v}
  if bad or info.get("error_msgs"):
    raise RuntimeError(f"Checkpoint in {model_dir} does not match BertModel: {bad} "
                       f"{info.get('error_msgs')}. The fixture would not reflect the real "
                       "weights; check the asset and the transformers version.")
  if model.config._attn_implementation != attn_implementation:
    raise RuntimeError(f"Asked for {attn_implementation!r} attention, transformers gave "
                       f"{model.config._attn_implementation!r}.")
  return model.eval()


def run(model: transformers.BertModel, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Runs the model on one batch.

  Args:
    model: a BertModel in eval mode.
    batch: int32 arrays [B, L] from ``tokenize``.

  Returns:
    float32 arrays: last_hidden_state [B, L, D], pooler_output [B, D],
    hidden_states [N+1, B, L, D].
  """
  inputs = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
  with torch.inference_mode():
    out = model(**inputs, output_hidden_states=True, return_dict=True)
  return {
      "last_hidden_state": out.last_hidden_state.numpy().astype(np.float32),
      "pooler_output": out.pooler_output.numpy().astype(np.float32),
      "hidden_states": torch.stack(out.hidden_states).numpy().astype(np.float32),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help=f"where to write the .npz (default: {DEFAULT_OUT})")
  args = parser.parse_args()

  # One thread: CPU matmul reductions can be split differently with more threads, and the
  # fixture should come out bit-identical on any machine with the same library versions.
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)

  model_dir = assets.fetch_dir("minilm")
  batch = tokenize(model_dir / "tokenizer.json")
  eager = run(load_model(model_dir, "eager"), batch)
  sdpa = run(load_model(model_dir, "sdpa"), batch)

  # In BertModel the last entry of hidden_states is last_hidden_state itself.
  if not np.array_equal(eager["hidden_states"][-1], eager["last_hidden_state"]):
    raise RuntimeError("hidden_states[-1] differs from last_hidden_state.")
  real_BxL = batch["attention_mask"].astype(bool)
  diff = max(float(np.abs(eager[k] - sdpa[k])[..., real_BxL, :].max())
             for k in ("last_hidden_state", "hidden_states"))
  diff = max(diff, float(np.abs(eager["pooler_output"] - sdpa["pooler_output"]).max()))
  for out in (eager, sdpa):
    for k in ("last_hidden_state", "hidden_states"):
      out[k][..., ~real_BxL, :] = 0.0

  versions = [
      f"python={platform.python_version()}",
      f"torch={torch.__version__}",
      f"transformers={transformers.__version__}",
      f"tokenizers={tokenizers.__version__}",
      f"safetensors={safetensors.__version__}",
      f"numpy={np.__version__}",
      f"asset_package={assets.ASSETS['minilm/model.safetensors'].package}",
      f"model.safetensors sha256={assets.sha256_of(model_dir / 'model.safetensors')}",
      f"tokenizer.json sha256={assets.sha256_of(model_dir / 'tokenizer.json')}",
  ]
  notes = [
      "main keys: BertModel(attn_implementation='eager'), fp32, eval mode, 1 CPU thread",
      "padded positions (attention_mask == 0) zeroed in all [..., B, L, D] arrays",
      f"max |eager - sdpa| over real tokens, all outputs: {diff:.3e}",
  ]
  sentences = [s if isinstance(s, str) else " ||| ".join(s) for s in SENTENCES]

  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(
      args.out, **batch, **eager,
      sdpa_last_hidden_state=sdpa["last_hidden_state"],
      sdpa_pooler_output=sdpa["pooler_output"],
      attn_implementation=np.array("eager"),
      sentences=np.array(sentences),
      versions=np.array(versions),
      notes=np.array(notes))
  print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
  print(f"  shape [B, L] = {list(batch['input_ids'].shape)}, "
        f"lengths = {batch['attention_mask'].sum(1).tolist()}")
  for v in versions + notes:
    print(f"  {v}")


if __name__ == "__main__":
  main()

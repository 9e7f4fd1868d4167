"""The step-time benchmark, `python -m sparse_attn.bench`: one module per section.

What it measures and how (timing, attention share, Amdahl, FLOPs) is the command
line's help: the docstring of `sparse_attn.bench.__main__`.
"""

from __future__ import annotations

# Modules: timing (timers, matmul peak), flops (analytic FLOPs), model_steps (jitted BERT
# steps), attention_alone, long_model, pruned, peers (PyTorch), report (Markdown, plot),
# suite (runs the sections), __main__ (the command line). This package imports no jax
# itself: `main` applies the process settings (XLA_FLAGS, host memory) before importing it.

from sparse_attn.bench.flops import model_flops

__all__ = ["main", "model_flops"]


def main(argv=None) -> dict:
  """Runs `python -m sparse_attn.bench` with argv; returns the results.json dict."""
  from sparse_attn.bench import __main__ as cli  # pylint: disable=import-outside-toplevel
  return cli.main(argv)

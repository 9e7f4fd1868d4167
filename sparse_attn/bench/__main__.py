"""Step-time benchmark (the command line): attention alone and whole BERT steps vs limits.

Dense vs masked vs block-sparse vs pruned attention, against the limits the sparsity
allows (1 / rho_block, Amdahl, FLOP ratio).

  python -m sparse_attn.bench --out /tmp/bench              # full run (tens of minutes)
  python -m sparse_attn.bench --out /tmp/bench --quick      # tiny shapes, seconds
  python -m sparse_attn.bench --out /tmp/bench --only torch --torch   # vs PyTorch

Writes results.json, results.md (tables), speedup.png (attention speed-up vs block
density with the ideal 1 / rho_block line) and, with the e2e section, e2e.png (speed-up
over dense vs L with the Amdahl bounds) to --out.

Timing: every function is jitted and run once (compile + warm-up, excluded), then
`--repeats` times with block_until_ready; we report the median (and min, and process CPU
time, which is robust when other processes share the machine). Dropout is off (both
frameworks), so steps compare compute only.

Attention share f of a step is measured two ways: (i) 1 - t(model with the attention core
replaced by q + k + v) / t(model); (ii) layers x t(one attention call alone) / t(model). The
Amdahl bound uses (i): S_e2e <= 1 / ((1 - f) + f * rho_block).

FLOPs (analytic, forward; backward = 2 x forward): weights 2 * B * L * P_layer per layer
(QKV, output, FFN matmuls) plus attention 4 * B * H * L^2 * d_head per layer (QK^T and PV);
"dense-equivalent" counts the attention term in full, "density-scaled" multiplies it by
rho_block. MFU divides by the machine's own measured matmul peak (a big jnp.dot).

Shape legend: B batch, L sequence length, H heads, D head dim.
"""

from __future__ import annotations

import argparse
import os
import sys

from sparse_attn import hostmem


def parse_args(argv=None) -> argparse.Namespace:
  """The flags of `python -m sparse_attn.bench` (see --help)."""
  p = argparse.ArgumentParser(prog="python -m sparse_attn.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--quick", action="store_true", help="tiny shapes (seconds; for tests)")
  p.add_argument("--only", default="attention,long,pruned",
                 help="comma list of sections: attention,long,pruned,torch,e2e")
  p.add_argument("--e2e-lengths", default="1024,2048,4096",
                 help="e2e section: MiniLM lengths on linux_docs documents")
  p.add_argument("--e2e-learned", default="",
                 help="e2e section: a run's exported masks directory (e.g. "
                      "runs/longdoc_dam/masks) timed as the 'learned' variant")
  p.add_argument("--lengths", default="1024,2048,4096", help="attention-alone lengths")
  p.add_argument("--windows", default="32,64,128,256,512", help="band half-widths")
  p.add_argument("--block-size", type=int, default=0,
                 help="block size for the attention section (0 = the auto chooser's)")
  p.add_argument("--keep-layers", default="",
                 help="pruned section: layers that keep attention, e.g. 4,5 (the layers a "
                      "self-pruning run kept; default: 0, i.e. 5 of MiniLM's 6 removed)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--torch", action="store_true", help="also run the PyTorch section")
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--devices", type=int, default=0,
                 help="data-parallel over N virtual CPU devices for the MiniLM/torch "
                      "sections (sets --xla_force_host_platform_device_count)")
  p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this run")
  p.add_argument("--host-memory", default="auto", choices=hostmem.MODES,
                 help="host allocator (sparse_attn.hostmem): 'reuse' keeps freed memory "
                      "between calls, as train.py does; 'default' is glibc's own policy")
  return p.parse_args(argv)


def apply_process_settings(args: argparse.Namespace) -> bool:
  """Sets XLA_FLAGS (--xla-flags, --devices) and the host allocator (--host-memory).

  Both must come before jax is imported / runs its first computation. Returns whether
  freed host memory is now reused.
  """
  flags = [os.environ.get("XLA_FLAGS", ""), args.xla_flags]
  if args.devices:
    flags.append(f"--xla_force_host_platform_device_count={args.devices}")
  joined = " ".join(f for f in flags if f).strip()
  if joined != os.environ.get("XLA_FLAGS", ""):   # Unset stays unset when nothing is added.
    os.environ["XLA_FLAGS"] = joined
  return hostmem.reuse_freed_memory(args.host_memory)


def main(argv=None) -> dict:
  """Parses argv (default sys.argv), applies the settings, runs; returns the results."""
  args = parse_args(argv)
  reused = apply_process_settings(args)
  # Imports jax, so only after the settings above.
  from sparse_attn.bench import suite  # pylint: disable=import-outside-toplevel
  return suite.run(args, reused, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
  main()

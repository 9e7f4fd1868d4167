"""Lowering checks: the train and eval steps of representative configs exported for GPU / TPU.

  python -m sparse_attn.lowering --platforms cuda,tpu [--configs dense,dam] [--skip-pallas]

Each case is an experiment file of configs/ with its argument, shrunk to a tiny model
(`TINY_MODEL`, a few examples). Its run (data, structure, optimizer, initial state) is
built on the host by `train.setup`; then, per platform, inside
`attention.target_platform(...)`, its steps are made by `train_steps.jit_steps` (the ones
training runs), its frozen evaluation masks prepared by `RunStructure.prepare`, and both
steps traced and lowered by `jax.export` for that platform, with no device of that kind.
So each export holds that platform's executor choices (cuDNN and Pallas kernels
included), not the host's. One line per (case, step, platform):

  lowered   the module's op count, size and custom-call targets (the eval line also
            names the executors its masks were prepared for);
  expected  it cannot lower on this host, for the reason named in `EXPECTED` (printed as
            raised); on a host of that platform the expectation does not apply;
  skipped   with --skip-pallas, a step that does not lower and whose trace holds a
            Pallas kernel (e.g. a Pallas TPU kernel off a TPU host; Splash does lower);
  FAILED    anything else (an unexpected error, or an expected failure that lowered:
            the expectation is stale). The exit code is 1 if any line is FAILED.

Dense and block-sparse steps traced for a platform differ only in the executors the seam
and the policy pick there (`attention.platform()`); a kernel that reads that (rather than
`jax.default_backend()`) is covered without changes here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
import re
import sys
import tempfile
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jax_core
import ml_collections

from sparse_attn import attention
from sparse_attn.attention.kernels import gpu as gpu_kernel
from sparse_attn import sharding
from sparse_attn import train
from sparse_attn import train_steps

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
EXPORT_PLATFORMS = ("cuda", "rocm", "tpu", "cpu")
STEPS = ("train", "eval")
TINY_MODEL = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64)   # Head size 16.


@dataclasses.dataclass(frozen=True)
class Case:
  """A representative config: `configs/<file>:<arg>` with a tiny model.

  Attributes:
    name: the case's name on the command line and in the output.
    file, arg: the experiment file in configs/ and its argument.
    overrides: dotted config keys set after the tiny model ("model.dtype": "bfloat16").
    max_len: data.max_len (the tiny model's positions); batch: train / eval batch size.
  """
  name: str
  file: str
  arg: str = "runlocal"
  overrides: dict = dataclasses.field(default_factory=dict)
  max_len: int = 32
  batch: int = 4


@dataclasses.dataclass(frozen=True)
class Expected:
  """A step that cannot lower for `platform` on another kind of host, and why."""
  match: str    # A substring of the error message.
  why: str


CASES = {c.name: c for c in (
    Case("dense", "finetune.py"),
    Case("dam", "dam.py"),
    # A fixed window mask on the block-sparse executor (a prepared BlockSparseMask).
    Case("blocksparse", "finetune.py", "pattern=window,kw.k=4,runlocal", max_len=64,
         overrides={"model.attention_backend": "blocksparse"}),
    # 'auto' at a length where the policy prepares block-sparse masks (Splash on TPU).
    Case("blocksparse_auto", "finetune.py", "pattern=window,kw.k=32,runlocal",
         max_len=1024, batch=2, overrides={"model.attention_backend": "auto"}),
    Case("prune", "prune.py"),                     # Learned attention-layer gates.
    Case("pruned", "finetune.py",                  # An extracted pruned model.
         overrides={"model.heads_per_layer": (2, 0)}),
    Case("bf16", "finetune.py", overrides={"model.dtype": "bfloat16"}),
)}

# The library's own kernels' custom calls, which jax.export does not vouch for across
# jaxlib versions (an artifact holding them is served by the jaxlib that exported it).
OWN_CALLS = [jax.export.DisabledSafetyCheck.custom_call(gpu_kernel.CUSTOM_CALL)]

# (case, step, export platform) -> why it cannot lower off that platform's own hosts.
# Splash (Mosaic) and the Pallas GPU kernel lower on a CPU host; cuDNN attention does
# not: jax.nn looks for the cuDNN library while it lowers. The bf16 evaluation step runs
# its unmasked, padded attention on cuDNN (training has attention dropout, which cuDNN
# does not take, and the float32 cases do not use it).
EXPECTED: dict[tuple[str, str, str], Expected] = {
    ("bf16", "eval", "cuda"): Expected(
        "cuDNN is not detected",
        "its attention runs cuDNN flash attention, which lowers only where cuDNN is"),
}


@dataclasses.dataclass(frozen=True)
class Result:
  """One (case, step, platform): status 'lowered' | 'expected' | 'skipped' | 'FAILED'."""
  case: str
  step: str
  platform: str
  status: str
  detail: str

  def line(self) -> str:
    """`status case step platform detail`, in columns."""
    return f"{self.status:<8} {self.case:<16} {self.step:<5} {self.platform:<4} {self.detail}"


def build_config(case: Case, config_dir: pathlib.Path = CONFIG_DIR) -> ml_collections.ConfigDict:
  """The case's experiment config, shrunk to a tiny randomly initialised model."""
  path = pathlib.Path(config_dir) / case.file
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: run from a source checkout or pass "
                            "--config_dir.")
  spec = importlib.util.spec_from_file_location(f"_lowering_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(case.arg)
  c.init_from = ""
  c.model.update(TINY_MODEL, max_position_embeddings=case.max_len)
  c.data.max_len = case.max_len
  c.data.buckets = ()
  c.data.max_train_examples = c.data.max_eval_examples = 2 * case.batch
  c.train.batch_size = c.train.eval_batch_size = case.batch
  for key, value in case.overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _target(export_platform: str) -> str:
  return "gpu" if export_platform in ("cuda", "rocm") else export_platform


def _host() -> str:
  return _target(jax.default_backend())


def _has_pallas(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      return True
    for sub in jax_core.jaxprs_in_params(eqn.params):
      if _has_pallas(sub):
        return True
  return False


def _summary(exported) -> str:
  text = exported.mlir_module()
  ops = len(re.findall(r"^\s*(?:%[^=]*=\s*)?\"?[a-z_]+\.[a-z_.]+", text, re.M))
  calls = sorted(set(re.findall(r"custom_call @([\w.$-]+)", text))
                 | set(re.findall(r'call_target_name = "([^"]+)"', text)))
  return (f"ops={ops} bytes={len(exported.mlir_module_serialized)} "
          f"custom_calls={','.join(calls) or 'none'}")


def _reason(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:300]}"


def _lower(case: str, step: str, plat: str, fn, args, skip_pallas: bool,
           note: str = "") -> Result:
  """Exports one jitted step for `plat`; the step is traced under the target context."""
  expected = EXPECTED.get((case, step, plat)) if _host() != _target(plat) else None
  try:
    exported = jax.export.export(fn, platforms=[plat], disabled_checks=OWN_CALLS)(*args)
  except Exception as e:  # noqa: BLE001 - every reason is reported.
    why = _reason(e)
    if expected is not None and expected.match in str(e):
      return Result(case, step, plat, "expected", f"cannot lower on this host "
                    f"({expected.why}): {why}")
    if skip_pallas and _has_pallas(fn.trace(*args).jaxpr.jaxpr):
      return Result(case, step, plat, "skipped", f"holds a Pallas kernel and does not "
                    f"lower on this host (--skip-pallas): {why}")
    return Result(case, step, plat, "FAILED", why)
  if expected is not None:
    return Result(case, step, plat, "FAILED", f"lowered, but EXPECTED says it cannot "
                  f"({expected.why}): update sparse_attn/lowering.py; {_summary(exported)}")
  return Result(case, step, plat, "lowered", f"{_summary(exported)}{note}")


def check_case(case: Case, platforms: Sequence[str], *, skip_pallas: bool = False,
               config_dir: pathlib.Path = CONFIG_DIR,
               report: Callable[[Result], Any] = lambda r: None) -> list[Result]:
  """Exports the case's train and eval steps for each platform.

  Args:
    case: the config.
    platforms: export platforms ('cuda', 'rocm', 'tpu', 'cpu').
    skip_pallas: report steps that hold a Pallas kernel and do not lower as skipped,
      not FAILED.
    config_dir: where the experiment files are.
    report: called with each result as it is made.

  Returns:
    One Result per (step, platform); a case whose run cannot be built fails every step.
  """
  with tempfile.TemporaryDirectory() as workdir:
    try:
      run = train.setup(build_config(case, config_dir), workdir, restore=False)
    except Exception as e:  # noqa: BLE001 - reported per step.
      out = [Result(case.name, s, p, "FAILED", f"setup: {_reason(e)}")
             for p in platforms for s in STEPS]
      for r in out:
        report(r)
      return out
    try:
      return _check_run(run, case, platforms, skip_pallas, report)
    finally:
      run.ckpt.close()


def _check_run(run, case: Case, platforms, skip_pallas: bool, report) -> list[Result]:
  batch = sharding.global_batch(next(run.train_ds.batches(
      case.batch, seed=run.config.data.seed, start_step=0)), run.mesh)
  split = next(iter(run.eval_sets.values()))
  eval_batch = sharding.global_batch(next(split.batches(
      case.batch, shuffle=False, drop_remainder=False)), run.mesh)
  frozen = run.frozen(run.state)
  out = []
  for plat in platforms:
    with attention.target_platform(_target(plat)):
      # Fresh jitted steps per platform: jit caches traces, and the choices are made
      # when tracing.
      train_step, eval_step = train_steps.jit_steps(run.module, run.structure, run.tx,
                                                    run.task, run.state_shardings)
      prepared = run.structure.prepare(frozen.masks, eval_batch["input_ids"].shape[1])
      chosen = sorted({w.split(":")[0] for w in prepared.executors})
      for step, fn, args, note in (
          ("train", train_step, (run.state, batch, None), ""),
          ("eval", eval_step, (run.state.params, eval_batch, prepared.masks, frozen.gates),
           f" attention={','.join(chosen)}")):
        out.append(_lower(case.name, step, plat, fn, args, skip_pallas, note))
        report(out[-1])
  return out


def check(cases: Sequence[Case], platforms: Sequence[str], *, skip_pallas: bool = False,
          config_dir: pathlib.Path = CONFIG_DIR,
          report: Callable[[Result], Any] = lambda r: None) -> list[Result]:
  """`check_case` over `cases`; raises RuntimeError naming every FAILED (case, step,
  platform) after all ran."""
  results = [r for c in cases for r in check_case(
      c, platforms, skip_pallas=skip_pallas, config_dir=config_dir, report=report)]
  failed = [r for r in results if r.status == "FAILED"]
  if failed:
    raise RuntimeError("These steps did not lower as expected:\n"
                       + "\n".join(r.line() for r in failed))
  return results


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  bad = [n for n in names if n not in known]
  if bad or not names:
    raise SystemExit(f"error: unknown {what} {bad or text!r}; known: {', '.join(known)}")
  return names


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit code (1 if a step failed to lower)."""
  p = argparse.ArgumentParser(prog="python -m sparse_attn.lowering",
                              description=__doc__.splitlines()[0])
  p.add_argument("--platforms", default="cuda,tpu",
                 help=f"comma-separated, of {', '.join(EXPORT_PLATFORMS)}")
  p.add_argument("--configs", default=",".join(CASES),
                 help=f"comma-separated, of {', '.join(CASES)}")
  p.add_argument("--skip-pallas", action="store_true",
                 help="report a step that holds a Pallas kernel and does not lower as "
                      "skipped (and why), not FAILED")
  p.add_argument("--config_dir", default=str(CONFIG_DIR), help="the experiment files")
  a = p.parse_args(argv)
  platforms = _names(a.platforms, EXPORT_PLATFORMS, "platform")
  cases = [CASES[n] for n in _names(a.configs, list(CASES), "config")]
  print(f"jax {jax.__version__}, host platform {_host()}", flush=True)
  try:
    check(cases, platforms, skip_pallas=a.skip_pallas, config_dir=pathlib.Path(
        a.config_dir), report=lambda r: print(r.line(), flush=True))
  except RuntimeError as e:
    print(e, file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

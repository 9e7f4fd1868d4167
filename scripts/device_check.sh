#!/usr/bin/env bash
# The GPU check of the Pallas block-sparse kernel, for one H100 / H200 (8 minutes at most).
#
#   scripts/device_check.sh [OUT_DIR]      (from anywhere; OUT_DIR defaults to $OUT, else
#                                           ./device_check)
#
# 1. tests/test_gpu_kernel.py on the GPU, compiled (not interpreted): the kernel against
#    the dense reference, forward and dq / dk / dv, float32 and bfloat16, every layout kind,
#    dropout, and the CUDA lowering.
# 2. `python -m sparse_attn.bench.gpu`: attention alone at L = 4096 and 8192 (band +-128
#    plus global tokens, and random blocks, block density ~0.1), kernel vs cuDNN flash
#    attention, forward and forward + backward, and a MiniLM-shape train step at L = 2048.
#    Writes gpu_results.json and gpu_results.md to OUT_DIR and prints the ratios.
#
# The package runs from the checkout (PYTHONPATH), with the machine's own JAX: its
# attention, model and bench code need only jax (with CUDA), flax, optax and numpy, so the
# pinned install_requires (jax < 0.11, datasets, ...) are not installed. Where the
# machine's JAX has no GPU backend, jax[cuda12] is installed from PyPI, if reachable.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-device_check}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
deadline=$((SECONDS + 470))
left() { local n=$((deadline - SECONDS)); echo $((n < $1 ? (n > 1 ? n : 1) : $1)); }

if ! timeout "$(left 60)" "$py" -c \
    "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  echo "The machine's JAX has no GPU backend: installing jax[cuda12], flax, optax."
  timeout "$(left 150)" "$py" -m pip install -q "jax[cuda12]" flax optax \
    || { echo "install failed"; exit 2; }
fi
{ timeout "$(left 60)" "$py" -c "import jax, flax, optax; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee "$out/versions.txt"

# float32 references at full precision, as the kernel's float32 products are.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$(left 170)" "$py" -m pytest -q \
  -p no:cacheprovider tests/test_gpu_kernel.py 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}

timeout "$(left 300)" "$py" -m sparse_attn.bench.gpu --out "$out" 2>&1 \
  | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "device_check: tests exit $tests_rc, bench exit $bench_rc, ${SECONDS}s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

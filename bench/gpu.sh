#!/usr/bin/env bash
# The accelerator benchmark in one command: the grid (both variants x float32/bfloat16 x
# per-device batch 128/256/512 x host-cropped/device-cropped input, PyTorch eager and
# torch.compile beside it, each framework in processes of its own), the GPU levers, and a
# jax.profiler trace of the best configuration with a text summary. bench/gpu.py says how.
#
#     OUT=results bash bench/gpu.sh                 # on a GPU host; ends within BUDGET_S (460 s)
#     REHEARSE=1 OUT=/tmp/rehearsal bash bench/gpu.sh   # the same run on the CPU at tiny sizes
#
# Needs jax (with CUDA), flax, optax, and torch for the comparison (without torch its lines say
# so); neither TensorFlow nor ml_collections. Writes at most 8 files, all directly under $OUT,
# and prints the JSON lines (also in $OUT/gpu.jsonl). Environment knobs: bench/gpu.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${OUT:-}" ]]; then
  echo "set OUT=DIR: where the JSON lines, the log, the summaries and the trace go" >&2
  exit 2
fi
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHON OUT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# One persistent compilation cache for the run's processes: the levers' baseline and the profile
# reload a step an earlier process compiled, and XLA's autotuning results are kept there too.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/alexnet_jax_gpu_bench_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:-0}
if [[ "${REHEARSE:-0}" != "0" ]]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}  # PyTorch on the CPU as well
fi
mkdir -p "$OUT"
exec "$PYTHON" bench/gpu.py

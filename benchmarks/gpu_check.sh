#!/usr/bin/env bash
# One prepared call on a lent CUDA machine (see DEVELOPERS.md / the device tool):
#   bash benchmarks/gpu_check.sh [kernels] [inference]      (both when no part is named)
# kernels: tests/test_kernels.py compiled for the GPU, then bench_kernels.py;
# inference: tests/test_cuda_graph.py (the CUDA-graph tests run there), then bench_inference.py.
# Runs under the machine's own python3 (torch, triton, pytest, hypothesis are there); moelab is
# imported from this checkout, with kernels/ linked as moelab/kernels as pyproject's package-dir
# maps it (the link is removed at the end). Logs and RESULTS.md land in $OUT (or ./build/gpu).
set -u
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
[ -e moelab/kernels ] || { ln -s ../kernels moelab/kernels; trap 'rm -f moelab/kernels' EXIT; }
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
parts=${*:-kernels inference}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
pytest() {  # name, seconds, pytest arguments...
  local name=$1 seconds=$2; shift 2
  timeout "$seconds" python3 -m pytest -q -rs --timeout=90 --durations=8 -p no:cacheprovider "$@" \
      2>&1 | tee "$OUT/tests_$name.log" | tail -25
  echo "tests $name exit: ${PIPESTATUS[0]}"
}
bench() {  # name, seconds, script arguments...
  local name=$1 seconds=$2; shift 2
  timeout "$seconds" python3 "benchmarks/bench_$name.py" --out "$OUT/RESULTS.md" "$@" \
      2>&1 | tee "$OUT/bench_$name.log" | tail -60
  echo "bench $name exit: ${PIPESTATUS[0]}"
}
for part in $parts; do
  case $part in
    kernels) pytest kernels "${TEST_SECONDS:-150}" tests/test_kernels.py
             bench kernels "${BENCH_SECONDS:-330}" ;;
    inference) pytest inference "${TEST_SECONDS:-150}" tests/test_cuda_graph.py
               bench inference "${BENCH_SECONDS:-330}" ${BENCH_ARGS:-} ;;
    *) echo "unknown part $part (kernels, inference)"; exit 2 ;;
  esac
done

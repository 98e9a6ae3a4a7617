#!/usr/bin/env bash
# One prepared call on a lent CUDA machine (see DEVELOPERS.md / the device tool): the kernel tests
# compiled for the GPU, then bench_kernels.py. Runs under the machine's own python3 (torch,
# triton, pytest, hypothesis are there); moelab is imported from this checkout, with kernels/
# linked as moelab/kernels as pyproject's package-dir maps it (the link is removed at the end). Logs and RESULTS land in
# $OUT (or ./build/gpu when OUT is unset).
set -u
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
[ -e moelab/kernels ] || { ln -s ../kernels moelab/kernels; trap 'rm -f moelab/kernels' EXIT; }
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -rs --timeout=90 --durations=8 -p no:cacheprovider \
    tests/test_kernels.py \
    2>&1 | tee "$OUT/tests.log" | tail -25
echo "tests exit: ${PIPESTATUS[0]}"
timeout "${BENCH_SECONDS:-330}" python3 benchmarks/bench_kernels.py --out "$OUT/RESULTS.md" \
    2>&1 | tee "$OUT/bench.log" | tail -60
echo "bench exit: ${PIPESTATUS[0]}"

#!/usr/bin/env bash
# One-shot GPU check for issue 19 (the device decode step and its CUDA graph), for a session that
# has an NVIDIA GPU. Run from anywhere:   bash benchmarks/gpu_check.sh   (FULL=1 for the long runs)
#
# Ordered by what matters most, each phase under its own time limit (worst case ~14 minutes in all,
# to fit a 15-minute device lease; a warm machine is much faster), and it keeps going when a phase
# fails, so a short lease still brings back the first answers. Everything is logged to
# benchmarks/results/gpu_check_<date>.log; the tables go to benchmarks/results/ (commit them).
#
#   1. agreement on the GPU: tests/test_cuda_step.py on backend "cuda" (fused kernels vs reference,
#      numpy's greedy tokens, 2 transfers per step, no allocation after warm-up, graph capture)
#   2. the device step: tokens/s numpy / cuda plain / cuda step / cuda free (own GEMV) / cuda graph,
#      batch 1 and 16, host vs GPU time per step, transformers on the same GPU (benchmarks/gpu_step.py)
#   3. the whole backend agreement suite on "cuda" (tests/test_backends.py: generate() now decodes
#      through the device step there)
#   4. the kernel table: decode attention GB/s and % of HBM, prefill TFLOP/s, launch overhead
#      (benchmarks/cuda_kernels.py)
#   5. FULL=1 only: PTX + ptxas for this GPU's compute capability, the cuda-sim suite in its own
#      process, and the benchmark table 5 (python -m benchmarks --only gpu)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check_$(date -u +%Y%m%d_%H%M).log"
QUICK=--quick
[ "${FULL:-0}" = "1" ] && QUICK=
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM MINIKV_BACKEND

phase() {   # phase SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s"
}

{
    nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv || true
    python -c "import minikv, cupy, numba; print('backends:', minikv.available_backends(), 'cupy', cupy.__version__, 'numba', numba.__version__)"
    CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
    phase 150 "1. device step on cuda" python -m pytest -q tests/test_cuda_step.py
    phase 300 "2. device step benchmark" python -m benchmarks.gpu_step $QUICK --out "$OUT"
    phase 240 "3. backend agreement suite on cuda" python -m pytest -q tests/test_backends.py
    phase 150 "4. kernel table" python -m benchmarks.cuda_kernels --quick --out "$OUT"
    if [ "${FULL:-0}" = "1" ]; then
        phase 240 "5a. PTX for sm_${CC:-90}" python scripts/ptx_check.py --cc "${CC:-9.0}"
        phase 900 "5b. cuda-sim suite" env NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/test_cuda_step.py tests/test_backends.py
        phase 900 "5c. table 5 (gpu)" python -m benchmarks --only gpu --out "$OUT"
    fi
} 2>&1 | tee "$LOG"
echo "log: $LOG"

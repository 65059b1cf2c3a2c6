#!/usr/bin/env bash
# The prepared GPU run of issue #14 item 6, as one command on a lent GPU machine (never in CI):
#   1. tests/test_cuda.py (the CUDA path: paths agree, GPU vs CPU, defaults converge, bf16 autocast);
#   2. benchmarks/bench_step_cost.py --device cuda: SGLD step / SGD step on a 10.2M-parameter DLN (target ≤ 1.2);
#   3. benchmarks/bench_generic.py --device cuda: the generic suite (ms per chain-step, slt vs the hand loop,
#      and devinterp when it imports), memory per chain from CUDA's allocator.
# Results go to $OUT (the device tool's folder) or results/gpu.  The machine has torch, transformers and
# pytest but no network: slt runs from the checkout (PYTHONPATH); devinterp is used only if it imports
# (carry its wheels as /work/.library/device/README.md says), otherwise the devinterp column is skipped.
# Budget: about 6-8 minutes on an H200 (run it with timeout_s=540).  A CPU smoke run of the script itself:
#   DEVICE=cpu STEP_ARGS="--width 200" GENERIC_ARGS="--quick --jobs mlp --no-memory" benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_DISABLE=1
OUT="${OUT:-results/gpu}"
mkdir -p "$OUT"
PY=python3
DEVICE="${DEVICE:-cuda}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} 2>&1 | tee "$OUT/env.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py 2>&1 | tail -25 | tee "$OUT/cuda_tests.txt"
timeout 120 $PY benchmarks/bench_step_cost.py --device "$DEVICE" ${STEP_ARGS:-} --out "$OUT/step_cost.json" 2>&1 | tee "$OUT/step_cost.txt"
DI=""
$PY -c "import devinterp" 2>/dev/null || DI="--no-devinterp"
timeout 300 $PY benchmarks/bench_generic.py --device "$DEVICE" $DI --no-train-row --no-mala-row ${GENERIC_ARGS:-} --out "$OUT/generic.json" \
  2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/generic.txt"
echo "gpu_suite done"
